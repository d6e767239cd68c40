#!/usr/bin/env python3
"""Writes gpt2_extra.jsonl: texts chosen to stress GPT-2's pre-tokenizer (Unicode letters,
numbers, marks, every kind of whitespace, contractions, emoji) with the ids that OpenAI's
reference encoder (gpt-2 src/encoder.py, reproduced below with the same `regex` pattern) gives.

    python3 gen_gpt2_extra.py VOCAB_JSON MERGES_TXT > gpt2_extra.jsonl

Needs the `regex` module (Debian: python3-regex). The texts come from a fixed seed, so the
output is reproducible. Lines are {"text": ..., "ids": [...]}, like ../shared golden.jsonl."""
import json
import random
import sys

import regex as re


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def get_pairs(word):
    return set(zip(word, word[1:]))


class Encoder:
    """OpenAI's encoder.py, without the decoder."""

    def __init__(self, encoder, bpe_merges):
        self.encoder = encoder
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = dict(zip(bpe_merges, range(len(bpe_merges))))
        self.cache = {}
        self.pat = re.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = get_pairs(word)
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        ids = []
        for token in re.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


WORDS = [
    "the", "The", "THE", "quick", "Hello", "world", "naïve", "café", "Straße", "ﬁnance",
    "e\u0301", "n\u0303o", "Ωmega", "λόγος", "Москва", "中文字符", "日本語", "한국어", "مرحبا",
    "שָׁלוֹם", "हिन्दी", "ภาษาไทย", "ǅungla", "ⅫⅣ", "x²", "½", "٣٤٥", "０１２", "123", "4567890",
    "3.14", "1,000", "🙂", "👩\u200d💻", "❤\ufe0f", "🇫🇷", "—", "–", "“quoted”", "‘single’",
    "<|endoftext|>", "<s>", "def", "f(x):", "x*2", "a_b", "#include", "{}", "[]", "...", "!!",
    "?!", "@user", "http://example.com/a?b=c", "\u200b", "\ufeff", "\u00ad", "don't", "I'm",
    "WE'LL", "they've", "it's", "she'd", "you're", "'S", "''", "’s", "O'Neil", "\x00", "\x07",
    "\x7f", "\ufffd", "\U0010ffff", "\U0001d400bold", "ǈ", "ʰ", "々", "〆", "ー",
]
SPACES = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e",
    "\x1f", "\x85", "\xa0", "\u1680", "\u180e", "\u2000", "\u2007", "\u200a", "\u2028", "\u2029",
    "\u202f", "\u205f", "\u3000", " \xa0", "\xa0 ", "\t ", " \t",
]


def texts(rng, count):
    out = []
    for w in WORDS:
        out.append(w)
        out.append(" " + w)
    for s in SPACES:
        out.append("a" + s + "b")
        out.append(s + "x" + s)
        out.append("end" + s)
    while len(out) < count:
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(SPACES) if rng.random() < 0.4 else " ")
        out.append("".join(parts[:-1] if rng.random() < 0.5 else parts))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        encoder = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
    enc = Encoder(encoder, merges)
    for text in texts(random.Random(20260101), 600):
        print(json.dumps({"text": text, "ids": enc.encode(text)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
