#!/usr/bin/env bash
# Monitoring end to end (issue 6), with real processes on loopback.
#   monitor_test.sh CASE QUILLAN SOURCE_DIR WORK_DIR TB_PYTHON_DIR
# CASE:
#   run    a short real run (quillan launch: learner, two workers, reward service) watched by
#          `quillan monitor` under tmux, started before the learner: the captured screen shows
#          the step counter advancing, both workers in the worker table and a reward value.
#          A second monitor with --jsonl --tensorboard: every line parses as JSON
#          (/usr/bin/python3 json.loads) and tests/e2e/tb_read.py reads its event files
#          (python3-protobuf, masked CRC-32C of every record) with scalars equal to the
#          learner's JSON log. `quillan plot` of that log: xmllint accepts the SVG, with one
#          <path> per metric; rsvg-convert renders it when installed.
#          Exits 77 (skipped) while quillan-learner or quillan-rollout is not built, or
#          without tmux.
#   units  `systemd-analyze verify` accepts every deploy/*.service; exits 77 (skipped) when
#          systemd-analyze is missing or cannot run here.
set -euo pipefail

CASE="$1"
Q="$2"
SRC="$3"
W="$4/$CASE"
TBPY="$5"
BUILD="$(cd "$(dirname "$Q")/.." && pwd)"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

rm -rf "$W"
mkdir -p "$W"
cd "$W"

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case_run() {
    if [ ! -x "$BUILD/learner/quillan-learner" ] || [ ! -x "$BUILD/rollout/quillan-rollout" ]; then
        echo "SKIPPED: quillan-learner or quillan-rollout is not built in $BUILD"
        exit 77
    fi
    command -v tmux >/dev/null || { echo "SKIPPED: tmux is not installed"; exit 77; }
    "$Q" data make-task addition --n 200 --test 16 --out data >/dev/null
    local d w li lo r
    d=$(free_port) w=$(free_port) li=$(free_port) lo=$(free_port) r=$(free_port)
    local hub="tcp://127.0.0.1:$lo"
    # Globals: the EXIT trap uses them after this function returned.
    SESSION="quillan-mon-$$"
    SOCK="$W/tmux.sock"
    tm() { tmux -S "$SOCK" "$@"; }
    cleanup() {
        tm kill-server 2>/dev/null || true
        [ -n "${LPID:-}" ] && kill -INT "$LPID" 2>/dev/null || true
        [ -n "${JPID:-}" ] && kill -INT "$JPID" 2>/dev/null || true
    }
    trap cleanup EXIT
    # The monitors start before the learner exists.
    tm -u new-session -d -s "$SESSION" -x 150 -y 50 \
        "env LANG=C.UTF-8 '$Q' monitor $hub --interval 0.5 2>'$W/dash.err'; sleep 60"
    "$Q" monitor "$hub" --jsonl --tensorboard "$W/tb" >stream.jsonl 2>stream.err &
    JPID=$!
    sleep 1
    "$Q" launch "$SRC/configs/tiny.yaml" --workers 2 --grace 60 \
        --set "network.dispatcher=tcp://127.0.0.1:$d" --set "network.weights=tcp://127.0.0.1:$w" \
        --set "network.log_in=tcp://127.0.0.1:$li" --set "network.log_out=$hub" \
        --set "reward.builtin.bind=tcp://127.0.0.1:$r" \
        --set "reward.services.0.address=tcp://127.0.0.1:$r" \
        --set "data.train=$W/data/train.jsonl" --set "data.test=$W/data/test.jsonl" \
        --set "learner.checkpoint_dir=$W/ck" --set learner.batch_groups=2 \
        --set learner.minibatches=1 --set learner.group_size=4 --set learner.warmup_steps=0 \
        --set learner.eval_interval=4 --set learner.eval_samples=8 \
        --set rollout.max_new_tokens=12 --set reward.builtin.length.weight=1 \
        --set reward.builtin.length.target=2 --set reward.builtin.length.window=8 \
        --set reward.builtin.eos_text= >launch.txt 2>&1 &
    LPID=$!
    # The screen: the step counter advancing, both workers, a reward value.
    local i first="" last="" screen=""
    for ((i = 0; i < 600; i++)); do
        sleep 0.5
        kill -0 "$LPID" 2>/dev/null || { cat launch.txt >&2; fail "launch ended early"; }
        screen=$(tm capture-pane -p -t "$SESSION")
        echo "$screen" >screen.txt
        local s
        s=$(sed -n 's/^learner .*  step \([0-9][0-9]*\)  policy .*/\1/p' <<<"$screen" | head -1)
        [ -n "$s" ] || continue
        [ -n "$first" ] || first=$s
        last=$s
        if [ "$last" -ge $((first + 3)) ] && grep -q "^  rollout-0 " <<<"$screen" &&
            grep -q "^  rollout-1 " <<<"$screen" &&
            grep -Eq "^  reward/mean +-?[0-9]" <<<"$screen" &&
            grep -q "^  quillan-reward " <<<"$screen"; then
            break
        fi
    done
    echo "$screen" >screen.txt
    cat screen.txt
    [ -n "$first" ] || fail "no step counter on the monitor's screen"
    [ "$last" -ge $((first + 3)) ] || fail "the step counter did not advance: $first -> $last"
    grep -q "^workers (2)" screen.txt || fail "the worker table does not show two workers"
    grep -q "^  rollout-0 " screen.txt && grep -q "^  rollout-1 " screen.txt ||
        fail "rollout-0 and rollout-1 are not both in the worker table"
    grep -Eq "^  reward/mean +-?[0-9]" screen.txt || fail "no reward value on screen"
    grep -q "^  quillan-reward " screen.txt || fail "the reward service is not in its table"
    echo "screen: step $first -> $last, two workers, a reward value"
    # Enough steps for the event files, then a clean stop of everything.
    kill -INT "$LPID"
    local rc=0
    wait "$LPID" || rc=$?
    LPID=""
    [ "$rc" -eq 0 ] || { cat launch.txt >&2; fail "launch exited $rc after SIGINT"; }
    sleep 0.5
    kill -INT "$JPID"
    rc=0
    wait "$JPID" || rc=$?
    JPID=""
    [ "$rc" -eq 0 ] || { cat stream.err >&2; fail "monitor --jsonl exited $rc"; }
    tm has-session -t "$SESSION" 2>/dev/null || fail "the dashboard monitor is gone"
    tm send-keys -t "$SESSION" C-c
    sleep 0.5
    # --jsonl: one JSON object per line, with the learner's, workers' and reward's records.
    "$PY" - stream.jsonl <<'PYEOF' || fail "--jsonl output"
import json, sys
n = 0
procs = set()
for line in open(sys.argv[1]):
    r = json.loads(line)
    assert isinstance(r, dict) and isinstance(r["event"], str), line
    procs.add(r["process"])
    n += 1
assert n > 10, n
assert {"quillan-learner", "quillan-rollout", "quillan-reward"} <= procs, procs
print("jsonl: %d lines, processes %s" % (n, sorted(procs)))
PYEOF
    # TensorBoard files written from the stream, read back independently.
    local log="$W/ck/logs/learner.log"
    [ -f "$log" ] || fail "no learner log at $log"
    if [ -f "$TBPY/tensorboard_pb2.py" ]; then
        "$PY" "$SRC/tests/e2e/tb_read.py" "$TBPY" "$W/tb" "$log" 3 ||
            fail "the TensorBoard event files do not match the learner's log"
    else
        echo "SKIPPED part: no $TBPY/tensorboard_pb2.py (protoc missing): event files not read"
    fi
    # quillan plot: valid SVG, one path per metric.
    "$Q" plot "$log" -o curves.svg
    if command -v xmllint >/dev/null; then
        xmllint --noout curves.svg || fail "xmllint refuses curves.svg"
    else
        echo "SKIPPED part: xmllint is not installed"
    fi
    local panels paths
    panels=$(grep -c 'class="panel"' curves.svg)
    paths=$(grep -c '<path ' curves.svg)
    [ "$panels" -ge 4 ] && [ "$paths" -eq "$panels" ] ||
        fail "$paths paths for $panels panels in curves.svg"
    "$Q" plot "$log" -o two.svg --metrics reward/mean,policy/entropy >/dev/null
    [ "$(grep -c '<path ' two.svg)" -eq 2 ] || fail "--metrics with two names: not two paths"
    grep -q '>reward/mean<' two.svg && grep -q '>policy/entropy<' two.svg ||
        fail "panel titles missing"
    local rc2=0
    "$Q" plot "$log" -o none.svg --metrics no/such 2>err.txt || rc2=$?
    [ "$rc2" -eq 1 ] && grep -q "no metric 'no/such'" err.txt || fail "an unknown metric: $rc2"
    if command -v rsvg-convert >/dev/null; then
        rsvg-convert -o curves.png curves.svg || fail "rsvg-convert refuses curves.svg"
        [ -s curves.png ] || fail "empty PNG"
    fi
    echo "plot: $panels panels, $paths paths"
}

case_units() {
    # deploy/start-workers.sh: the cores split between the workers, disjoint pinning.
    "$SRC/deploy/start-workers.sh" --dry-run -n 3 --cores 8 -c run.yaml --env "$SRC/deploy/quillan.env" \
        -- --set rollout.credits=4 >workers.txt
    cat workers.txt
    [ "$(grep -c -- '--threads 2 ' workers.txt)" -eq 3 ] || fail "3 workers on 8 cores: not 2 threads each"
    if command -v taskset >/dev/null; then
        grep -q '^taskset -c 0-1 ' workers.txt && grep -q '^taskset -c 4-5 ' workers.txt ||
            fail "workers not pinned to disjoint cores"
    fi
    grep -q -- '--set network.dispatcher=tcp://t4box.example:5555' workers.txt ||
        fail "the env file's addresses are not passed"
    grep -q -- '--set rollout.credits=4$' workers.txt || fail "extra arguments are not passed"
    local rc=0
    "$SRC/deploy/start-workers.sh" -n 0 -c x >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 2 ] || fail "start-workers.sh -n 0 exited $rc, expected 2"
    command -v systemd-analyze >/dev/null || { echo "SKIPPED: no systemd-analyze"; exit 77; }
    # verify checks that ExecStart's binary exists: the units' /usr/local/bin/ is pointed at
    # the build tree's binaries (copies of the units in the work directory).
    local src_units=("$SRC"/deploy/*.service)
    [ -e "${src_units[0]}" ] || fail "no unit files in $SRC/deploy"
    mkdir -p bin
    local b
    for b in learner/quillan-learner rollout/quillan-rollout reward/quillan-reward; do
        if [ -x "$BUILD/$b" ]; then
            ln -sf "$BUILD/$b" "bin/$(basename "$b")"
        else
            ln -sf /bin/true "bin/$(basename "$b")"
        fi
    done
    local units=() u
    for u in "${src_units[@]}"; do
        sed "s#/usr/local/bin/#$W/bin/#g" "$u" >"$(basename "$u")"
        units+=("$W/$(basename "$u")")
    done
    local probe=0
    systemd-analyze verify --man=no "${units[0]}" >probe.txt 2>&1 || probe=$?
    if grep -qiE "failed to (connect|initialize|create)|not been booted|no such file or directory.*(bus|systemd)" probe.txt; then
        cat probe.txt
        echo "SKIPPED: systemd-analyze cannot run in this environment"
        exit 77
    fi
    local out
    for u in "${units[@]}"; do
        out=$(systemd-analyze verify --man=no "$u" 2>&1) || {
            echo "$out" >&2
            fail "systemd-analyze verify refuses $u"
        }
        # verify exits 0 on some warnings: none is accepted either
        if [ -n "$out" ]; then
            echo "$out" >&2
            fail "systemd-analyze verify warns about $u"
        fi
        echo "verified: $u"
    done
}

"case_$CASE"
echo "PASS: monitor $CASE"
