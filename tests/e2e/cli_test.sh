#!/usr/bin/env bash
# End-to-end checks of the `quillan` front door: exit codes, messages, round trips.
# usage: cli_test.sh QUILLAN_BINARY SOURCE_DIR
set -uo pipefail
Q="$1"
SRC="$2"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
fails=0
check() { # name, condition command...
    local name="$1"
    shift
    if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}

"$Q" --help >"$TMP/help" 2>&1
check "--help exits 0 and lists commands" grep -q "config" "$TMP/help"
"$Q" --version | grep -qE '^quillan [0-9]+\.[0-9]+\.[0-9]+$'
check "--version prints the version" test $? -eq 0
"$Q" no-such-command >/dev/null 2>&1
check "unknown command exits 2" test $? -eq 2

"$Q" config check "$SRC/configs/tiny.yaml" >"$TMP/resolved.yaml" 2>"$TMP/err"
check "config check tiny.yaml exits 0" test $? -eq 0
check "resolved config names every section" \
    bash -c "for s in model learner rollout reward data network security logging; do grep -q \"^\$s:\" '$TMP/resolved.yaml' || exit 1; done"
"$Q" config check "$TMP/resolved.yaml" >"$TMP/resolved2.yaml" 2>&1
check "resolved config loads back to the same config" cmp -s "$TMP/resolved.yaml" "$TMP/resolved2.yaml"
"$Q" config check "$SRC/configs/quillan-512m.yaml" >/dev/null 2>&1
check "config check quillan-512m.yaml exits 0" test $? -eq 0

printf 'learner:\n  lr: 0.001\n  bogus_key: 3\n' >"$TMP/bad.yaml"
"$Q" config check "$TMP/bad.yaml" >/dev/null 2>"$TMP/err"
check "unknown key exits 1" test $? -eq 1
check "unknown key message names file, line and key" grep -q "bad.yaml:3.*learner.bogus_key" "$TMP/err"
"$Q" config check "$SRC/configs/tiny.yaml" --set learner.lr=-1 >/dev/null 2>"$TMP/err"
check "out-of-range --set exits 1 naming the key" bash -c "grep -q 'learner.lr' '$TMP/err'"
"$Q" config check "$TMP/missing.yaml" >/dev/null 2>"$TMP/err"
check "missing file exits 1 naming it" bash -c "grep -q 'missing.yaml' '$TMP/err'"

ids="$("$Q" tokenize '12+34=')"
check "byte tokenizer encodes" test "$ids" = "49 50 43 51 52 61"
text="$("$Q" tokenize --decode "$ids")"
check "byte tokenizer decodes back" test "$text" = "12+34="
"$Q" tokenize --decode 99999 >/dev/null 2>"$TMP/err"
check "out-of-range id exits 1" test $? -eq 1

GPT2="$SRC/../shared/data/gpt2"
if [ -f "$GPT2/vocab.json" ]; then
    ids="$("$Q" tokenize --vocab "$GPT2/vocab.json" --merges "$GPT2/merges.txt" 'Hello world')"
    check "gpt2 tokenizer encodes 'Hello world'" test "$ids" = "15496 995"
else
    echo "SKIP gpt2 tokenizer: $GPT2 is absent on this machine"
fi

# Ctrl-C during `quillan sft`: a clean stop with a checkpoint, exit 0, and a resume goes on.
"$Q" data make-task addition --n 200 --test 20 --out "$TMP/data" >/dev/null
SFT=("$Q" sft "$SRC/configs/tiny.yaml" --set "data.train=$TMP/data/train.jsonl"
    --set "learner.checkpoint_dir=$TMP/ck" --set learner.checkpoint_interval=0 --batch 4
    --eval-every 0 --eval-n 4 --log-every 1)
"${SFT[@]}" --max-steps 1000000 >"$TMP/sft.out" 2>"$TMP/sft.err" &
pid=$!
for _ in $(seq 600); do
    grep -q '"sft/step"' "$TMP/sft.err" && break
    sleep 0.1
done
kill -INT "$pid"
wait "$pid"
check "sft stopped by SIGINT exits 0" test $? -eq 0
check "sft says it stopped by signal" grep -q "stopped by signal after step" "$TMP/sft.out"
ck_dir="$(ls -d "$TMP"/ck/step-* 2>/dev/null | tail -1)"
check "sft wrote a checkpoint on the stop" test -n "$ck_dir"
done_steps=$((10#${ck_dir##*step-}))
"${SFT[@]}" --resume "$TMP/ck" --max-steps $((done_steps + 2)) >"$TMP/sft2.out" 2>&1
check "sft resumes from the stop's checkpoint" \
    grep -q "^sft: $((done_steps + 2)) steps" "$TMP/sft2.out"

[ "$fails" -eq 0 ] || { echo "$fails check(s) failed"; exit 1; }
echo "all cli checks passed"
