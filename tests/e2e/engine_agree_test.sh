#!/bin/sh
# Issue 4, acceptance 2, on a trained checkpoint: SFT trains the tiny model on the addition task
# for a few hundred steps, then `bench_engine agree --check` decodes the held-out prompts with
# the quantized engine (sampled at temperature 1 and greedy) and recomputes every token with the
# learner's forward: greedy agreement and mean |log p_worker - log p_learner| over a few
# thousand tokens must meet the bounds of tests/unit/test_engine.c.
# Usage: engine_agree_test.sh QUILLAN_BINARY BENCH_ENGINE_BINARY CONFIGS_DIR
set -u
Q="$1"
B="$2"
CONF="$3"
DIR=$(mktemp -d /tmp/quillan_agree_e2e.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$Q" data make-task addition --n 4000 --test 300 --seed 5 --out "$DIR/data" >/dev/null ||
    fail "make-task"
"$Q" sft "$CONF/tiny.yaml" --set "data.train=$DIR/data/train.jsonl" \
    --set "learner.checkpoint_dir=$DIR/ck" --set learner.lr=1e-3 --set learner.warmup_steps=20 \
    --max-steps 300 --batch 32 --eval-every 0 --log-every 100 >"$DIR/sft.txt" 2>&1 || {
    cat "$DIR/sft.txt" >&2
    fail "sft"
}
"$B" agree "$DIR/ck" --data "$DIR/data/test.jsonl" --prompts 300 --samples 4 --tokens 8 \
    --check >"$DIR/agree.txt" 2>&1
rc=$?
cat "$DIR/agree.txt"
[ "$rc" -eq 0 ] || fail "agreement bounds (exit $rc)"
n=$(sed -n 's/.*sampled at T 1.00: \([0-9]*\) tokens.*/\1/p' "$DIR/agree.txt")
[ "${n:-0}" -ge 1000 ] || fail "only ${n:-0} sampled tokens compared"
echo "ok: agreement on a trained checkpoint"
