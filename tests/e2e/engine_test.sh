#!/bin/sh
# `quillan quantize` and `quillan generate` as a user runs them: a good policy works; a missing
# file, a file of another format, a truncated policy and a prompt longer than the context each
# give a clear error and a non-zero exit.
# Usage: engine_test.sh QUILLAN_BINARY GENERATE_EXAMPLE_BINARY
set -u
Q="$1"
EX="$2"
DIR=$(mktemp -d /tmp/quillan_engine_e2e.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_error DESCRIPTION PATTERN COMMAND...: non-zero exit and PATTERN in stderr.
expect_error() {
    desc="$1"; pat="$2"; shift 2
    "$@" >"$DIR/out" 2>"$DIR/err" && fail "$desc: exit status 0"
    grep -q -- "$pat" "$DIR/err" || fail "$desc: stderr lacks '$pat': $(cat "$DIR/err")"
    echo "ok: $desc: $(head -c 200 "$DIR/err")"
}

"$Q" quantize --random tiny --seed 3 -o "$DIR/tiny.qst" >/dev/null || fail "quantize --random"
"$Q" generate "$DIR/tiny.qst" --prompt "hello" --n 3 --max-new-tokens 8 --threads 1 \
    >"$DIR/gen" || fail "generate on a good policy"
grep -q "tokens/s" "$DIR/gen" || fail "generate prints no tokens/s"
grep -q "peak memory" "$DIR/gen" || fail "generate prints no peak memory"
[ "$(grep -c '^\[prompt 0 sample' "$DIR/gen")" = 3 ] || fail "expected 3 completions"
echo '{"prompt": "a"}' >"$DIR/p.jsonl"
echo '{"prompt": "bb"}' >>"$DIR/p.jsonl"
"$Q" generate "$DIR/tiny.qst" --file "$DIR/p.jsonl" --n 2 --max-new-tokens 4 --threads 1 \
    >"$DIR/gen2" || fail "generate --file"
[ "$(grep -c '^\[prompt' "$DIR/gen2")" = 4 ] || fail "expected 4 completions from the file"

expect_error "missing policy" "$DIR/nope.qst" \
    "$Q" generate "$DIR/nope.qst" --prompt hi
echo "this is not a policy" >"$DIR/text.qst"
expect_error "text file" "$DIR/text.qst" "$Q" generate "$DIR/text.qst" --prompt hi
"$Q" quantize --random tiny -o "$DIR/full.qst" >/dev/null || fail "quantize"
head -c 100000 "$DIR/full.qst" >"$DIR/trunc.qst"
expect_error "truncated policy" "$DIR/trunc.qst" "$Q" generate "$DIR/trunc.qst" --prompt hi
LONG=$(head -c 400 /dev/zero | tr '\0' 'x')
expect_error "prompt longer than the context" "context" \
    "$Q" generate "$DIR/tiny.qst" --prompt "$LONG" --threads 1
expect_error "bad jsonl" "p2.jsonl:1" sh -c "echo '[1]' >'$DIR/p2.jsonl'; \
    '$Q' generate '$DIR/tiny.qst' --file '$DIR/p2.jsonl'"
expect_error "missing checkpoint" "nonexistent" "$Q" quantize /nonexistent/ckpt -o "$DIR/x.qst"
"$Q" generate "$DIR/tiny.qst" --n 0 --prompt hi >/dev/null 2>&1
[ $? -eq 2 ] || fail "bad --n: expected usage exit status 2"
"$EX" "$DIR/tiny.qst" "hi" 2 >"$DIR/ex" || fail "generate_example"
[ "$(grep -c '^sample' "$DIR/ex")" = 2 ] || fail "generate_example printed no samples"
expect_error "example on a missing policy" "nope" "$EX" "$DIR/nope.qst" hi
echo "all engine e2e checks passed"
