#!/usr/bin/env bash
# The fair baseline for the demo's RL gain (issue 5, acceptance 1): SFT continued from the demo's
# SFT checkpoint for the same wall time the RL phase took, evaluated on the same held-out set
# with the same command (`quillan eval`, quantized policy, greedy).
#
#   bench/demo_baseline.sh BUILD_DIR [DEMO_DIR] [SECONDS]
#
# DEMO_DIR is what `./run demo` left (default BUILD_DIR/demo, with BUILD_DIR/demo-data beside
# it): DEMO_DIR/sft is the warm start, DEMO_DIR/rl/logs/learner.log times the RL phase (first
# to last learner record) unless SECONDS is given. The SFT continuation runs with the demo's
# SFT settings (configs/demo.yaml, lr 1e-3, batch 32, loss-free balancing on) on REPLICAS
# data-parallel replicas (default 2: the RL phase had both cores, one learner and one worker),
# checkpoints every 100 steps, and the last checkpoint written within SECONDS of its start is
# evaluated.
# Prints the SFT-only, continued-SFT and (if present) after-RL accuracies as one Markdown row.
set -euo pipefail

BUILD="$(cd "${1:?usage: demo_baseline.sh BUILD_DIR [DEMO_DIR] [SECONDS]}" && pwd)"
DEMO="${2:-$BUILD/demo}"
DATA="$(dirname "$DEMO")/demo-data"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
Q="$BUILD/common/quillan"
REPLICAS="${REPLICAS:-2}"
OUT="$DEMO/baseline-r$REPLICAS"

for f in "$DEMO/sft/latest" "$DATA/train.jsonl" "$DATA/test.jsonl"; do
    [ -e "$f" ] || { echo "demo_baseline: $f is missing (run ./run demo first)" >&2; exit 1; }
done

secs="${3:-}"
if [ -z "$secs" ]; then
    log="$DEMO/rl/logs/learner.log"
    [ -e "$log" ] || { echo "demo_baseline: $log is missing; give SECONDS" >&2; exit 1; }
    secs=$(sed -n 's/^{"time":\([0-9.]*\),.*/\1/p' "$log" | awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%.0f", b - a }')
fi
echo "demo_baseline: continuing SFT for $secs s (the RL phase's wall time), $REPLICAS replica(s)" >&2

rm -rf "$OUT"
mkdir -p "$OUT"
cp -r "$DEMO/sft" "$OUT/start"
start=$(date +%s.%N)
# Steps far beyond what fits: the run is cut at the time limit; a SIGTERM mid-step only loses
# the steps after the last checkpoint, which the selection below ignores anyway.
timeout -s TERM "$secs" "$Q" sft "$SRC/configs/demo.yaml" \
    --set "data.train=$DATA/train.jsonl" --set "data.test=$DATA/test.jsonl" \
    --set learner.lr=1e-3 --set learner.warmup_steps=50 --set learner.total_steps=1000000 \
    --set "learner.checkpoint_dir=$OUT/ck" --set learner.checkpoint_interval=100 \
    --batch 32 --eval-every 0 --eval-n 0 --log-every 100 --balance-bias --replicas "$REPLICAS" \
    --resume "$OUT/start" >"$OUT/sft.log" 2>&1 || true

last=""
for ck in "$OUT"/ck/step-*; do
    [ -e "$ck/model.safetensors" ] || continue
    t=$(stat -c %Y "$ck/model.safetensors")
    awk -v t="$t" -v s="$start" -v l="$secs" 'BEGIN { exit !(t - s <= l) }' && last="$ck"
done
[ -n "$last" ] || { echo "demo_baseline: no checkpoint within $secs s (see $OUT/sft.log)" >&2; exit 1; }
"$Q" eval "$last" --data "$DATA/test.jsonl" --json "$OUT/eval.json" >"$OUT/eval.log" 2>&1

acc() { sed -n 's/^ *"accuracy": *\([0-9.e+-]*\).*/\1/p' "$1" 2>/dev/null; }
sft=$(acc "$DEMO/eval-sft.json")
base=$(acc "$OUT/eval.json")
rl=$(acc "$DEMO/eval-rl.json")
echo "| SFT only | SFT continued ${secs} s, $REPLICAS replica(s) ($(basename "$last")) | after RL |"
echo "| --- | --- | --- |"
awk -v a="${sft:-nan}" -v b="$base" -v c="${rl:-nan}" \
    'BEGIN { printf "| %.1f%% | %.1f%% | %.1f%% |\n", 100 * a, 100 * b, 100 * c }'
