#!/usr/bin/env bash
# Soak bench (issue 8, acceptance 4; not in CI): learner + quillan-reward + rollout workers on
# loopback with the tiny preset, workers killed (SIGKILL) and restarted at random for a bounded
# time, the learner's RSS sampled throughout.
#   bench/soak.sh [BUILD_DIR]            (default: build)
# Environment (defaults in brackets):
#   SOAK_SECONDS [600]     how long the workers are killed and restarted
#   SOAK_WORKERS [2]       rollout workers (1 thread each)
#   SOAK_SAMPLE_S [5]      RSS sampling interval
#   SOAK_KILL_MIN_S [10]   a worker is killed every KILL_MIN..KILL_MAX seconds (uniform)
#   SOAK_KILL_MAX_S [40]
#   SOAK_SEED [1]          seed of the kill schedule (bash $RANDOM)
#   SOAK_OUT [/tmp/quillan-soak]  work directory: logs, rss.csv, ledger.json, summary.txt
# Prints the RSS over time (one row a minute; every sample is in SOAK_OUT/rss.csv), the growth
# after the first minute (target < 5%), and the books of the run (tests/e2e/netns_check.py on
# the learner's final checkpoint read by netns_ledger: no group lost or accepted twice, every
# lease completed or re-leased). Exits 1 when the books do not balance or RSS grows by 5% or
# more.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$(cd "${1:-$SRC/build}" && pwd)"
SECONDS_TOTAL="${SOAK_SECONDS:-600}"
N_WORKERS="${SOAK_WORKERS:-2}"
SAMPLE_S="${SOAK_SAMPLE_S:-5}"
KILL_MIN="${SOAK_KILL_MIN_S:-10}"
KILL_MAX="${SOAK_KILL_MAX_S:-40}"
RANDOM="${SOAK_SEED:-1}"
OUT="${SOAK_OUT:-/tmp/quillan-soak}"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

LEARNER="$BUILD/learner/quillan-learner"
ROLLOUT="$BUILD/rollout/quillan-rollout"
REWARD="$BUILD/reward/quillan-reward"
Q="$BUILD/common/quillan"
LEDGER="$BUILD/tests/netns_ledger"
for b in "$LEARNER" "$ROLLOUT" "$REWARD" "$Q" "$LEDGER"; do
    [ -x "$b" ] || { echo "soak: $b is not built" >&2; exit 1; }
done

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"

PIDS=()
declare -A WPID
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}" "${WPID[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

"$Q" data make-task addition --n 4000 --test 10 --out data >/dev/null
LIVENESS=5
CFG="$SRC/configs/tiny.yaml"
rp=$(free_port)
SETS=(--set "network.dispatcher=tcp://127.0.0.1:$(free_port)"
      --set "network.weights=tcp://127.0.0.1:$(free_port)"
      --set "network.log_in=tcp://127.0.0.1:$(free_port)"
      --set "network.log_out=tcp://127.0.0.1:$(free_port)"
      --set "reward.services.0.address=tcp://127.0.0.1:$rp"
      --set "reward.builtin.bind=tcp://127.0.0.1:$rp"
      --set network.lease_timeout_s=30 --set "network.heartbeat_liveness=$LIVENESS"
      --set "data.train=$OUT/data/train.jsonl" --set "learner.checkpoint_dir=$OUT/ck"
      --set learner.checkpoint_interval=100000 --set learner.max_steps=100000
      --set learner.eval_interval=0 --set learner.minibatches=2 --set learner.ppo_epochs=1
      --set learner.dynamic_sampling=false)
SPB=2 # learner.step records per batch: minibatches x ppo_epochs

"$REWARD" --config "$CFG" "${SETS[@]}" --bind "tcp://127.0.0.1:$rp" 2>reward.log &
RP=$!
PIDS+=("$RP")
"$LEARNER" --config "$CFG" "${SETS[@]}" --set logging.level=debug 2>learner.log &
LP=$!
PIDS+=("$LP")

start_worker() { # ID: (re)starts worker ID, its log appended to ID.log
    "$ROLLOUT" --config "$CFG" "${SETS[@]}" --id "$1" --threads 1 2>>"$1.log" &
    WPID[$1]=$!
}
for ((i = 1; i <= N_WORKERS; i++)); do
    start_worker "w$i"
done

steps() {
    grep -c '"event":"learner.step"' learner.log 2>/dev/null || true
}

echo "t_s,rss_kib,steps,kills" >rss.csv
t0=$(date +%s)
kills=0
next_sample=0
next_kill=$((KILL_MIN + RANDOM % (KILL_MAX - KILL_MIN + 1)))
while :; do
    now=$(($(date +%s) - t0))
    [ "$now" -lt "$SECONDS_TOTAL" ] || break
    kill -0 "$LP" 2>/dev/null || { echo "soak: the learner died" >&2; tail -5 learner.log >&2; exit 1; }
    if [ "$now" -ge "$next_sample" ]; then
        rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$LP/status")
        echo "$now,$rss,$(steps),$kills" >>rss.csv
        next_sample=$((next_sample + SAMPLE_S))
    fi
    if [ "$now" -ge "$next_kill" ]; then
        id="w$((1 + RANDOM % N_WORKERS))"
        kill -KILL "${WPID[$id]}" 2>/dev/null || true
        wait "${WPID[$id]}" 2>/dev/null || true
        kills=$((kills + 1))
        # Half the restarts come back at once (the dispatcher sees a new incarnation), half
        # after the heartbeat liveness (it has declared the worker dead first).
        if ((RANDOM % 2)); then
            echo "$now: SIGKILL $id, restarted at once" >>kills.txt
        else
            echo "$now: SIGKILL $id, restarted after $((LIVENESS + 2)) s" >>kills.txt
            sleep $((LIVENESS + 2))
        fi
        start_worker "$id"
        next_kill=$((now + KILL_MIN + RANDOM % (KILL_MAX - KILL_MIN + 1)))
    fi
    sleep 1
done

# Workers stop first so their last groups arrive, then the learner checkpoints on SIGTERM.
for id in "${!WPID[@]}"; do
    kill -TERM "${WPID[$id]}" 2>/dev/null || true
    wait "${WPID[$id]}" || echo "soak: worker $id exited $?" >&2
done
sleep $((LIVENESS + 3))
kill -TERM "$LP"
wait "$LP" || { echo "soak: the learner exited $? on SIGTERM" >&2; exit 1; }
kill -TERM "$RP"
wait "$RP" || echo "soak: quillan-reward exited $?" >&2
PIDS=()

"$LEDGER" "$OUT/ck/$(cat "$OUT/ck/latest")" "$CFG" "${SETS[@]}" >ledger.json
books=0
"$PY" "$SRC/tests/e2e/netns_check.py" --steps-per-batch $SPB ledger.json learner.log w*.log >books.txt || books=1
cat books.txt

rss_ok=0
"$PY" - "$SECONDS_TOTAL" "$kills" >summary.txt <<'EOF' || rss_ok=1
import csv, sys
rows = [r for r in csv.DictReader(open("rss.csv"))]
t = [int(r["t_s"]) for r in rows]
rss = [int(r["rss_kib"]) for r in rows]
base_i = next(i for i, x in enumerate(t) if x >= 60)
base = rss[base_i]
print(f"soak: {sys.argv[1]} s, {sys.argv[2]} worker kills, {rows[-1]['steps']} learner steps")
print("| t (s) | learner RSS (MiB) | steps | kills |")
print("|---:|---:|---:|---:|")
last_min = -1
for i, r in enumerate(rows):
    if t[i] // 60 != last_min or i == len(rows) - 1:
        last_min = t[i] // 60
        print(f"| {t[i]} | {rss[i] / 1024:.1f} | {r['steps']} | {r['kills']} |")
after = rss[base_i:]
growth_end = 100.0 * (rss[-1] - base) / base
growth_max = 100.0 * (max(after) - base) / base
print(f"RSS at {t[base_i]} s: {base / 1024:.1f} MiB; at the end {rss[-1] / 1024:.1f} MiB "
      f"({growth_end:+.2f}%); peak after the first minute {max(after) / 1024:.1f} MiB "
      f"({growth_max:+.2f}%); first sample {rss[0] / 1024:.1f} MiB")
print("RSS growth after the first minute: " + ("PASS (< 5%)" if growth_max < 5 else "FAIL (>= 5%)"))
sys.exit(0 if growth_max < 5 else 1)
EOF
cat summary.txt
[ "$books" -eq 0 ] || { echo "soak: the books do not balance" >&2; exit 1; }
[ "$rss_ok" -eq 0 ] || exit 1
echo "soak: PASS"
