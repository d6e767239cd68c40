#!/usr/bin/env bash
# Regenerates tests/fuzz/corpus: the binary seeds with fuzz_make_seeds (a QUILLAN_FUZZ build,
# e.g. the one run_all.sh configures), the text seeds from the repository's own files and a
# small byte-level BPE tokenizer written here. Regression seeds of fixed findings
# (corpus/<target>/regress-*) are kept as they are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
C="$ROOT/tests/fuzz/corpus"
mkdir -p "$C"
"$BUILD/tests/fuzz/fuzz_make_seeds" "$C" 2>/dev/null

mkdir -p "$C/fuzz_config" "$C/fuzz_jsonl" "$C/fuzz_allow_list" "$C/fuzz_tokenizer_bpe" \
    "$C/fuzz_tokenizer_json"
cp "$ROOT/configs/tiny.yaml" "$C/fuzz_config/tiny.yaml"
for f in syntax_error preset_override duplicate_key wrong_type rl_group_size; do
    cp "$ROOT/tests/data/config/$f.yaml" "$C/fuzz_config/$f.yaml"
done
printf 'security.curve=true\nlogging:\n  level: debug\n' >"$C/fuzz_config/set_line.yaml"
printf "reward.services=[{address: 'tcp://127.0.0.1:5557', weight: 1, name: m}]\n" \
    >"$C/fuzz_config/set_list.yaml"
cp "$ROOT/tests/data/files/rl_small.jsonl" "$C/fuzz_jsonl/rl_small.jsonl"
cp "$ROOT/tests/data/files/sft_small.jsonl" "$C/fuzz_jsonl/sft_small.jsonl"
cat >"$C/fuzz_allow_list/two_keys.txt" <<'KEYS'
# admitted workers
rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7  worker-1
  Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID

KEYS
/usr/bin/python3 - "$C" <<'PY'
import json, sys
c = sys.argv[1]
# GPT-2's byte <-> unicode map: printable bytes stand for themselves, the rest move to 256+.
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
     list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
byte_char = {b: chr(u) for b, u in zip(bs, cs)}
vocab = {byte_char[b]: i for i, b in enumerate(range(256))}
merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("ll", "o")]
for a, b in merges:
    vocab[a + b] = len(vocab)
vocab["<|endoftext|>"] = len(vocab)
vj = json.dumps(vocab, ensure_ascii=False)
mt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
with open(f"{c}/fuzz_tokenizer_bpe/small.bin", "wb") as f:
    f.write(vj.encode() + b"\0" + mt.encode())
hf = {"version": "1.0",
      "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>",
                        "special": True}],
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
      "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}
with open(f"{c}/fuzz_tokenizer_json/small.json", "w") as f:
    json.dump(hf, f, ensure_ascii=False)
PY
