#!/usr/bin/env bash
# Benchmarks of the RL loop with real processes on loopback (issue 5, acceptance 5). Not a test:
# run by hand, record the figures in bench/RESULTS.md ("RL loop").
#
#   bench/bench_rl.sh snapshot BUILD_DIR [WORK_DIR]
#       quillan-learner on configs/quillan-512m.yaml + one quillan-rollout + quillan-reward: the
#       full snapshot v1 and, after one real RL step, v2 (a delta against v1): bytes on the wire,
#       publish seconds (learner), fetch seconds (worker), publish-to-applied (from the start of
#       the learner's publish to the worker's "loaded" record; both stamp the same clock).
#       Tiny batch (1 group of 4, 4 new tokens). Needs ~20 GB of memory (the learner peaks at
#       ~19 GB) and, on 2 loaded cores, ~20 min.
#       The learner is SIGKILLed at the end (a 512m checkpoint is ~8 GB of disk).
#   bench/bench_rl.sh throughput BUILD_DIR [WORK_DIR] [STEPS]
#       configs/tiny.yaml, STEPS steps (default 12) with 1 and then 2 workers: learner wait
#       fraction (sum of perf/wait_seconds over wait + step seconds), steps/s, rollout tokens/s
#       per worker (rollout.stop) and the learner's perf/rollout_tokens_per_s.
#
# Figures print as Markdown table rows. Everything runs on free loopback ports.
set -euo pipefail

MODE="${1:?usage: bench_rl.sh snapshot|throughput BUILD_DIR [WORK_DIR] [STEPS]}"
BUILD="$(cd "${2:?BUILD_DIR}" && pwd)"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
W="${3:-/tmp/bench_rl}/$MODE"
STEPS="${4:-12}"
PY=/usr/bin/python3
rm -rf "$W"
mkdir -p "$W"
cd "$W"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The addition task, written here (prompt "a+b=", answer the sum).
"$PY" - <<'EOF'
import json, random
r = random.Random(1234)
with open("train.jsonl", "w") as f:
    for _ in range(400):
        x, y = r.randrange(1000), r.randrange(1000)
        f.write(json.dumps({"prompt": "%d+%d=" % (x, y), "answer": str(x + y)}) + "\n")
EOF

# Waits until file $1 has a line matching $2 (up to $3 s); fails with the file's tail.
wait_for() {
    local i
    for ((i = 0; i < $3 * 5; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.2
    done
    tail -5 "$1" >&2
    echo "bench_rl: '$2' did not appear in $1 within $3 s" >&2
    exit 1
}

sets() {
    local d w li lo r
    d=$(free_port) w=$(free_port) li=$(free_port) lo=$(free_port) r=$(free_port)
    SETS=(--set "network.dispatcher=tcp://127.0.0.1:$d" --set "network.weights=tcp://127.0.0.1:$w"
          --set "network.log_in=tcp://127.0.0.1:$li" --set "network.log_out=tcp://127.0.0.1:$lo"
          --set "reward.services.0.address=tcp://127.0.0.1:$r"
          --set "reward.builtin.bind=tcp://127.0.0.1:$r"
          --set "data.train=$W/train.jsonl" --set "data.test=" --set "learner.checkpoint_dir=$W/ck"
          --set learner.warmup_steps=0 --set learner.minibatches=1 --set learner.overlong.enabled=false
          --set reward.builtin.exact.weight=0 --set reward.builtin.format.weight=2
          --set "reward.builtin.format.regex=^" --set reward.builtin.length.weight=-1
          --set reward.builtin.length.unit=bytes --set "reward.builtin.eos_text=")
}

case "$MODE" in
snapshot)
    sets
    GPT2="$SRC/../shared/data/gpt2"
    [ -f "$GPT2/vocab.json" ] || { echo "bench_rl: no GPT-2 tokenizer in $GPT2" >&2; exit 1; }
    CFG=(--config "$SRC/configs/quillan-512m.yaml" "${SETS[@]}"
         --set "model.tokenizer.vocab=$GPT2/vocab.json" --set "model.tokenizer.merges=$GPT2/merges.txt"
         --set learner.batch_groups=1
         --set learner.group_size=4 --set rollout.max_new_tokens=4 --set rollout.credits=1
         --set learner.checkpoint_interval=1000 --set learner.threads=1
         --set reward.builtin.length.target=8 --set reward.builtin.length.window=32)
    "$BUILD/reward/quillan-reward" "${CFG[@]}" 2>reward.log &
    PIDS+=($!)
    "$BUILD/learner/quillan-learner" "${CFG[@]}" 2>learner.log &
    LP=$!
    PIDS+=($LP)
    wait_for learner.log '"event":"learner.start"' 3600
    "$BUILD/rollout/quillan-rollout" "${CFG[@]}" --id w1 --threads 1 2>w1.log &
    WP=$!
    PIDS+=($WP)
    wait_for w1.log '"snapshot_version":2,' 3600
    echo "peak RSS: learner $(sed -n 's/VmHWM:\s*//p' /proc/$LP/status), worker" \
        "$(sed -n 's/VmHWM:\s*//p' /proc/$WP/status)"
    ;;
throughput)
    for n in 1 2; do
        sets
        CFG=(--config "$SRC/configs/tiny.yaml" "${SETS[@]}" --set learner.batch_groups=4
             --set learner.group_size=8 --set rollout.max_new_tokens=16 --set learner.threads=1
             --set learner.checkpoint_interval=1000 --set "learner.max_steps=$STEPS"
             --set reward.builtin.length.target=16 --set reward.builtin.length.window=32)
        "$BUILD/reward/quillan-reward" "${CFG[@]}" 2>"reward$n.log" &
        RP=$!
        PIDS+=($RP)
        "$BUILD/learner/quillan-learner" "${CFG[@]}" 2>"learner$n.log" &
        LP=$!
        PIDS+=($LP)
        wait_for "learner$n.log" '"event":"learner.start"' 120
        WP=()
        for ((i = 1; i <= n; i++)); do
            "$BUILD/rollout/quillan-rollout" "${CFG[@]}" --id "w$i" --threads 1 2>"w$n-$i.log" &
            WP+=($!)
            PIDS+=($!)
        done
        wait "$LP"
        kill -TERM "${WP[@]}" "$RP"
        wait "${WP[@]}" "$RP" || true
    done
    ;;
*)
    echo "bench_rl: unknown mode '$MODE' (snapshot, throughput)" >&2
    exit 2
    ;;
esac

"$PY" - "$MODE" <<'EOF'
import glob, json, sys

def recs(path):
    out = []
    for line in open(path, errors="replace"):
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out

def ev(rs, name):
    return [r for r in rs if r.get("event") == name]

if sys.argv[1] == "snapshot":
    L, Wk = recs("learner.log"), recs("w1.log")
    pub = {int(r["fields"]["policy/version"]): r for r in ev(L, "snapshot.publish")}
    got = {int(r["fields"]["snapshot_version"]): r for r in ev(Wk, "rollout.snapshot")}
    print("| version | kind | full bytes | wire bytes | wire / full | changed blocks | changed bytes "
          "| publish s | fetch s | publish-to-applied s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in sorted(got):
        p, g = pub[v]["fields"], got[v]["fields"]
        start = pub[v]["time"] - p["sync/publish_seconds"]
        # v1 is published before the worker starts: its publish-to-applied is publish + fetch
        p2a = p["sync/publish_seconds"] + g["fetch_seconds"] if v == 1 else got[v]["time"] - start
        print("| v%d | %s | %d | %d | %.4f | %.4f | %.4f | %.2f | %.2f | %.2f |" % (
            v, "delta" if g["delta"] else "full", g["bytes"], g["transfer_bytes"],
            g["transfer_bytes"] / g["bytes"], p["snapshot/changed_frac"],
            p["snapshot/changed_bytes_frac"], p["sync/publish_seconds"], g["fetch_seconds"], p2a))
    for r in ev(L, "learner.step"):
        f = r["fields"]
        print("step %d: %.1f s (prep %.1f s), wait %.1f s, rewards [%g, %g], grad_norm %g, lr %g" % (
            f["step"], f["perf/step_seconds"], f["perf/prep_seconds"], f["perf/wait_seconds"],
            f["reward/min"], f["reward/max"], f["grad_norm"], f["lr"]))
    st = ev(Wk, "rollout.group")
    if st:
        print("worker: %.2f tokens/s over %d groups" % (st[-1]["fields"]["tokens_per_s"], len(st)))
else:
    print("| workers | steps | wall s | steps/s | learner wait fraction | learner rollout tokens/s "
          "| tokens/s per worker (rollout.stop) | groups per worker |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for n in (1, 2):
        L = recs("learner%d.log" % n)
        steps = ev(L, "learner.step")
        wait = sum(r["fields"]["perf/wait_seconds"] for r in steps)
        work = sum(r["fields"]["perf/step_seconds"] for r in steps)
        wall = steps[-1]["time"] - ev(L, "learner.start")[0]["time"]
        tps = [r["fields"]["perf/rollout_tokens_per_s"] for r in steps[1:]]
        per, groups = [], []
        for i in range(1, n + 1):
            s = ev(recs("w%d-%d.log" % (n, i)), "rollout.stop")
            per.append("%.0f" % s[-1]["fields"]["tokens_per_s"] if s else "?")
            groups.append("%d" % s[-1]["fields"]["groups_done"] if s else "?")
        print("| %d | %d | %.1f | %.3f | %.2f | %.0f | %s | %s |" % (
            n, len(steps), wall, len(steps) / wall, wait / (wait + work),
            sum(tps) / max(len(tps), 1), ", ".join(per), ", ".join(groups)))
EOF
