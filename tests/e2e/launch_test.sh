#!/usr/bin/env bash
# `quillan launch` and `quillan eval` driven as a user would, with real processes on loopback.
#   launch_test.sh CASE QUILLAN SOURCE_DIR WORK_DIR
# CASE:
#   config  bad configs are refused with a message naming the key and file, before anything
#           starts (no process, no log directory)
#   eval    eval of a tiny checkpoint and of its .qst: scores agree with the answers, a test set
#           whose answers are the policy's own greedy completions scores 100%, checkpoint and
#           .qst give the same completions, sampling is reproducible, pass@k >= pass@1, the
#           reward-service path agrees with the in-process scorers
#   procs   process management without a learner: quillan-reward (and a rollout worker when
#           built) stop cleanly on SIGINT with exit 0; a child killed or failing at start makes
#           launch exit 1 showing its last output lines; quillan-learner in SFT mode stops on
#           SIGINT with a checkpoint and exit 0
#   run     a short real run (learner + worker + reward): steps advance, a checkpoint appears,
#           SIGINT stops everything with exit 0 and leaves no process behind; exits 77 (skipped)
#           while quillan-learner or quillan-rollout is not built
set -euo pipefail

CASE="$1"
Q="$2"
SRC="$3"
W="$4/$CASE"
TINY="$SRC/configs/tiny.yaml"
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

# A TCP port nobody listens on now.
free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Loopback addresses of every socket, so parallel tests never collide.
net_sets() {
    local d w li lo r
    d=$(free_port) w=$(free_port) li=$(free_port) lo=$(free_port) r=$(free_port)
    NET=(--set "network.dispatcher=tcp://127.0.0.1:$d" --set "network.weights=tcp://127.0.0.1:$w"
         --set "network.log_in=tcp://127.0.0.1:$li" --set "network.log_out=tcp://127.0.0.1:$lo"
         --set "reward.builtin.bind=tcp://127.0.0.1:$r"
         --set "reward.services.0.address=tcp://127.0.0.1:$r")
    REWARD_PORT=$r
}

# Waits up to $2 seconds for process $1 to end; returns 1 if it is still alive.
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

# The pids launch printed ("started NAME (pid N ...").
started_pids() {
    sed -n 's/.*started [a-z0-9-]* (pid \([0-9]*\).*/\1/p' "$1"
}

# Runs launch in the background with its output in $1; sets LPID.
launch_bg() {
    local out="$1"
    shift
    "$Q" launch "$@" >"$out" 2>&1 &
    LPID=$!
}

# Waits until file $1 contains pattern $2 (up to $3 seconds).
wait_for() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "--- $1:" >&2
    cat "$1" >&2 || true
    fail "'$2' did not appear in $1 within $3 s"
}

case_config() {
    "$Q" data make-task addition --n 20 --test 10 --out data >/dev/null
    BASE=(--set "data.train=$W/data/train.jsonl" --set "learner.checkpoint_dir=$W/ck")
    # expect_refused SUBSTRING... -- launch args: exit 1, every substring in stderr, nothing made.
    expect_refused() {
        local subs=()
        while [ "$1" != "--" ]; do
            subs+=("$1")
            shift
        done
        shift
        local rc=0
        "$Q" launch "$@" >out.txt 2>err.txt || rc=$?
        [ "$rc" -eq 1 ] || { cat err.txt >&2; fail "launch $* exited $rc, expected 1"; }
        for s in "${subs[@]}"; do
            grep -qF -- "$s" err.txt || { cat err.txt >&2; fail "no '$s' in the error of $*"; }
        done
        [ ! -e "$W/ck" ] || fail "launch $* created $W/ck although the config was refused"
        ! grep -q "started" out.txt || fail "launch $* started a process"
        echo "refused as expected: $(cat err.txt)"
    }
    expect_refused "learner.group_size" "--set learner.group_size=1" "RL needs at least 2" -- \
        "$TINY" "${BASE[@]}" --set learner.group_size=1
    cat >nosvc.yaml <<EOF
learner:
  checkpoint_dir: $W/ck
data:
  train: $W/data/train.jsonl
reward:
  services:
    - weight: 1
      name: judge
EOF
    expect_refused "nosvc.yaml:7" "reward.services[0]" "'address' is required" -- nosvc.yaml
    cat >nosvc2.yaml <<EOF
data:
  train: $W/data/train.jsonl
reward:
  services: []
EOF
    expect_refused "nosvc2.yaml:4" "reward.services" "at least one reward service" -- nosvc2.yaml \
        --set "learner.checkpoint_dir=$W/ck"
    head -5 data/train.jsonl >small.jsonl
    expect_refused "tiny.yaml:" "learner.batch_groups" "8 groups per batch is more than the 5" \
        "data.train" -- "$TINY" --set "learner.checkpoint_dir=$W/ck" \
        --set "data.train=$W/small.jsonl"
    expect_refused "--set learner.batch_groups=64" "more than the 20 prompts" -- \
        "$TINY" "${BASE[@]}" --set learner.batch_groups=64 --set learner.minibatches=1
    expect_refused "tiny.yaml:" "data.train" "no training set" -- \
        "$TINY" --set "learner.checkpoint_dir=$W/ck"
    expect_refused "data.train" "missing.jsonl" -- \
        "$TINY" "${BASE[@]}" --set "data.train=$W/missing.jsonl"
    printf '{"prompt": "1+1=", "answer": 2}\n' >badtype.jsonl
    expect_refused "data.train" "badtype.jsonl:1" -- \
        "$TINY" "${BASE[@]}" --set "data.train=$W/badtype.jsonl" --set learner.batch_groups=1 \
        --set learner.minibatches=1
    expect_refused "learner.mode" "quillan sft" -- "$TINY" "${BASE[@]}" --set learner.mode=sft
    # Usage errors: exit 2.
    local rc=0
    "$Q" launch >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 2 ] || fail "launch without CONFIG exited $rc, expected 2"
    rc=0
    "$Q" launch "$TINY" --workers -1 >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 2 ] || fail "launch --workers -1 exited $rc, expected 2"
    "$Q" launch --help | grep -q "usage: quillan launch" || fail "launch --help"
}

case_eval() {
    "$Q" data make-task addition --n 400 --test 24 --out data >/dev/null
    "$Q" sft "$TINY" --set "data.train=$W/data/train.jsonl" --set "learner.checkpoint_dir=$W/ck" \
        --set learner.lr=3e-3 --set learner.warmup_steps=0 --max-steps 25 --batch 8 \
        --eval-every 0 --eval-n 4 --log-every 25 >sft.txt 2>&1 || {
        cat sft.txt >&2
        fail "sft"
    }
    "$Q" eval ck --data data/test.jsonl --json greedy.json --predictions greedy.jsonl --show 3 |
        tee eval.txt
    grep -q "accuracy: " eval.txt || fail "no accuracy line"
    "$PY" - <<'EOF' || fail "greedy predictions and summary disagree"
import json
s = json.load(open("greedy.json"))
p = [json.loads(l) for l in open("greedy.jsonl")]
assert s["prompts"] == 24 and len(p) == 24, (s["prompts"], len(p))
assert s["samples_per_prompt"] == 1 and s["temperature"] == 0
for x in p:
    # the built-in exact scorer: trimmed completion equals trimmed answer
    want = x["completion"].strip() == x["answer"].strip()
    assert x["correct"] == want and x["reward"] == (1.0 if want else 0.0), x
acc = sum(x["correct"] for x in p) / len(p)
assert abs(s["accuracy"] - acc) < 1e-12 and s["pass@1"] == s["accuracy"], (s, acc)
# A test set whose answers are the policy's own completions: every one must be correct.
with open("self.jsonl", "w") as f:
    n = 0
    for x in p:
        if "\ufffd" in x["completion"]:
            continue  # bytes that are not UTF-8 cannot be an answer in JSON
        f.write(json.dumps({"prompt": x["prompt"], "answer": x["completion"]}) + "\n")
        n += 1
assert n >= 12, n
print("greedy: accuracy %.3f, self-answer set of %d prompts" % (acc, n))
EOF
    "$Q" eval ck --data self.jsonl --json self.json >/dev/null
    "$PY" -c 'import json; a = json.load(open("self.json"))["accuracy"]; assert a == 1.0, a' ||
        fail "the policy's own completions did not all score as correct"
    # The .qst of the checkpoint gives the same completions (same quantization, same engine).
    "$Q" quantize ck -o policy.qst >/dev/null
    "$Q" eval policy.qst --data data/test.jsonl --max-new-tokens 64 --predictions qst.jsonl \
        >/dev/null
    cmp greedy.jsonl qst.jsonl || fail "checkpoint and .qst evals differ"
    # Sampling: pass@k >= pass@1; the same seed gives the same samples, another seed others.
    "$Q" eval ck --data data/test.jsonl --samples 4 --k 2 --temperature 1 --seed 7 \
        --json s1.json --predictions s1.jsonl >/dev/null
    "$Q" eval ck --data data/test.jsonl --samples 4 --k 2 --temperature 1 --seed 7 \
        --predictions s2.jsonl >/dev/null
    "$Q" eval ck --data data/test.jsonl --samples 4 --k 2 --temperature 1 --seed 8 \
        --predictions s3.jsonl >/dev/null
    cmp s1.jsonl s2.jsonl || fail "sampled eval is not reproducible with the same seed"
    ! cmp -s s1.jsonl s3.jsonl || fail "another seed gave the same samples"
    "$PY" - <<'EOF' || fail "sampled summary"
import json
from math import comb
s = json.load(open("s1.json"))
p = [json.loads(l) for l in open("s1.jsonl")]
assert len(p) == 24 * 4 and s["samples_per_prompt"] == 4 and s["k"] == 2
by = {}
for x in p:
    by.setdefault(x["index"], []).append(x["correct"])
p1 = sum(sum(v) / len(v) for v in by.values()) / len(by)
pk = sum(1 - comb(len(v) - sum(v), 2) / comb(len(v), 2) for v in by.values()) / len(by)
assert abs(s["accuracy"] - p1) < 1e-9 and abs(s["pass@2"] - pk) < 1e-9, (s, p1, pk)
assert s["pass@2"] >= s["accuracy"]
print("sampled: pass@1 %.3f pass@2 %.3f" % (p1, pk))
# Answers = each prompt's sample 0 (same order, so the same sampling streams): that sample
# must score as correct when the same seed draws it again.
with open("self_s.jsonl", "w") as f:
    for x in p:
        if x["sample"] == 0:
            ok = "\ufffd" not in x["completion"]
            f.write(json.dumps({"prompt": x["prompt"], "answer": x["completion"] if ok else "\u0000"}) + "\n")
EOF
    "$Q" eval ck --data self_s.jsonl --samples 4 --k 2 --temperature 1 --seed 7 \
        --json s4.json --predictions s4.jsonl >/dev/null
    "$PY" - <<'EOF' || fail "sampled self-answer set"
import json
from math import comb
s = json.load(open("s4.json"))
p = [json.loads(l) for l in open("s4.jsonl")]
good = [x for x in p if x["sample"] == 0 and x["answer"] != "\u0000"]
assert len(good) >= 12 and all(x["correct"] for x in good), good
by = {}
for x in p:
    by.setdefault(x["index"], []).append(x["correct"])
pk = sum(1 - comb(len(v) - sum(v), 2) / comb(len(v), 2) for v in by.values()) / len(by)
assert abs(s["pass@2"] - pk) < 1e-9 and s["pass@2"] > s["accuracy"] > 0, (s, pk)
print("sampled self-answer set: pass@1 %.3f pass@2 %.3f" % (s["accuracy"], s["pass@2"]))
EOF
    # Through a real reward service: the same scores as in process.
    net_sets
    "$BUILD/reward/quillan-reward" --bind "tcp://127.0.0.1:$REWARD_PORT" 2>reward.log &
    local rpid=$!
    "$Q" eval ck --data data/test.jsonl --reward-services \
        --set "reward.services.0.address=tcp://127.0.0.1:$REWARD_PORT" --predictions svc.jsonl \
        >svc.txt || {
        kill "$rpid"
        fail "eval --reward-services"
    }
    kill -INT "$rpid"
    wait "$rpid" || fail "quillan-reward did not stop cleanly"
    grep -q "scored by reward.services" svc.txt || fail "eval did not use the services"
    cmp greedy.jsonl svc.jsonl || fail "reward service and built-in scorers disagree"
    # Bad input.
    local rc=0
    "$Q" eval ck --data data/test.jsonl --samples 2 --temperature 0 >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 2 ] || fail "--samples 2 --temperature 0 exited $rc, expected 2"
    rc=0
    "$Q" eval ck --data data/test.jsonl --samples 2 --k 3 >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 2 ] || fail "--k 3 --samples 2 exited $rc, expected 2"
    rc=0
    "$Q" eval nowhere --data data/test.jsonl >/dev/null 2>err.txt || rc=$?
    [ "$rc" -eq 1 ] && grep -q "nowhere" err.txt || fail "a missing policy: exit $rc"
    rc=0
    "$Q" eval ck --data nothing.jsonl >/dev/null 2>err.txt || rc=$?
    [ "$rc" -eq 1 ] && grep -q "nothing.jsonl" err.txt || fail "a missing test set: exit $rc"
}

case_procs() {
    net_sets
    local workers=0
    [ -x "$BUILD/rollout/quillan-rollout" ] && workers=1
    local args=("$TINY" --no-learner --workers "$workers" --set "learner.checkpoint_dir=$W/ck"
                "${NET[@]}")
    # 1. SIGINT: every child stops, exit 0.
    launch_bg out1.txt "${args[@]}"
    wait_for out1.txt "Ctrl-C stops" 30
    mapfile -t pids < <(started_pids out1.txt)
    [ "${#pids[@]}" -eq $((1 + workers)) ] || fail "expected $((1 + workers)) children: ${pids[*]}"
    local pgid
    pgid=$(ps -o pgid= -p "${pids[0]}" | tr -d ' ')
    [ "$pgid" != "$(ps -o pgid= -p "$LPID" | tr -d ' ')" ] ||
        fail "the children share launch's process group"
    sleep 1
    kill -INT "$LPID"
    local rc=0
    wait "$LPID" || rc=$?
    cat out1.txt
    [ "$rc" -eq 0 ] || fail "launch exited $rc after SIGINT, expected 0"
    for p in "${pids[@]}"; do
        ! kill -0 "$p" 2>/dev/null || fail "child $p is still running"
    done
    ! pgrep -g "$pgid" >/dev/null || fail "processes left in group $pgid"
    grep -q '"event":"reward.stop"' ck/logs/reward.log || fail "reward did not stop cleanly"
    # 2. A child killed: launch stops the rest and exits 1 with the child's last lines.
    launch_bg out2.txt "${args[@]}"
    wait_for out2.txt "Ctrl-C stops" 30
    mapfile -t pids < <(started_pids out2.txt)
    sleep 1
    kill -KILL "${pids[0]}"
    rc=0
    wait "$LPID" || rc=$?
    cat out2.txt
    [ "$rc" -eq 1 ] || fail "launch exited $rc after a child was killed, expected 1"
    grep -q "reward (pid ${pids[0]}) killed by signal 9" out2.txt || fail "no report of the kill"
    grep -q "last lines of .*reward.log" out2.txt || fail "no tail of the child's output"
    for p in "${pids[@]}"; do
        wait_gone "$p" 5 || fail "child $p is still running"
    done
    # 3. A child that fails at start (its port is taken): exit 1 with its error shown.
    local port
    port=$(free_port)
    "$PY" -c "
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $port)); s.listen(); print('ready', flush=True); time.sleep(120)" >holder.txt &
    local holder=$!
    wait_for holder.txt ready 30
    rc=0
    timeout -s INT 60 "$Q" launch "${args[@]}" --workers 0 \
        --set "reward.builtin.bind=tcp://127.0.0.1:$port" \
        --set "reward.services.0.address=tcp://127.0.0.1:$port" >out3.txt 2>&1 || rc=$?
    kill "$holder"
    cat out3.txt
    [ "$rc" -eq 1 ] || fail "launch exited $rc when the reward service could not bind"
    grep -q "reward (pid [0-9]*) exited with status 1 unexpectedly" out3.txt ||
        fail "no report of the failed start"
    grep -q "| .*$port" out3.txt || fail "the child's error is not shown"
    # 4. quillan-learner in SFT mode: SIGINT stops it after the step under way, with a
    # checkpoint, exit 0.
    local learner="$BUILD/learner/quillan-learner"
    [ -x "$learner" ] || return 0
    "$Q" data make-task addition --n 200 --test 20 --out sdata >/dev/null
    "$learner" --config "$TINY" --set learner.mode=sft --set "data.train=$W/sdata/train.jsonl" \
        --set "learner.checkpoint_dir=$W/sck" --set learner.checkpoint_interval=0 \
        --set learner.total_steps=1000000 >sft.out 2>sft.err &
    local spid=$!
    wait_for sft.err '"sft/step"' 60
    kill -INT "$spid"
    rc=0
    wait "$spid" || rc=$?
    [ "$rc" -eq 0 ] || fail "quillan-learner (sft) exited $rc after SIGINT, expected 0"
    grep -q '"event":"learner.stop"' sft.err || fail "no learner.stop record"
    ls -d sck/step-* >/dev/null 2>&1 || fail "no checkpoint written on the stop"
}

case_run() {
    if [ ! -x "$BUILD/learner/quillan-learner" ] || [ ! -x "$BUILD/rollout/quillan-rollout" ]; then
        echo "SKIPPED: quillan-learner or quillan-rollout is not built in $BUILD"
        exit 77
    fi
    "$Q" data make-task addition --n 200 --test 20 --out data >/dev/null
    net_sets
    # From a random policy exact match almost never pays, so the length scorer gives the groups
    # unequal rewards (dynamic sampling would filter every group otherwise).
    launch_bg out.txt "$TINY" --workers 1 --grace 60 "${NET[@]}" \
        --set "data.train=$W/data/train.jsonl" --set "data.test=$W/data/test.jsonl" \
        --set "learner.checkpoint_dir=$W/ck" --set learner.checkpoint_interval=2 \
        --set learner.batch_groups=2 --set learner.minibatches=1 --set learner.group_size=4 \
        --set learner.warmup_steps=0 --set rollout.max_new_tokens=12 \
        --set reward.builtin.length.weight=1 --set reward.builtin.length.target=2 \
        --set reward.builtin.length.window=8 --set reward.builtin.eos_text=
    wait_for out.txt "Ctrl-C stops" 60
    mapfile -t pids < <(started_pids out.txt)
    [ "${#pids[@]}" -eq 3 ] || fail "expected 3 children: ${pids[*]}"
    local pgid
    pgid=$(ps -o pgid= -p "${pids[0]}" | tr -d ' ')
    wait_for out.txt "^step [3-9][0-9]*/" 400
    local i
    for ((i = 0; i < 600; i++)); do
        [ -f ck/latest ] && break
        sleep 0.1
    done
    [ -f ck/latest ] || fail "no checkpoint after 3 steps with checkpoint_interval 2"
    kill -INT "$LPID"
    local rc=0
    wait "$LPID" || rc=$?
    cat out.txt
    [ "$rc" -eq 0 ] || fail "launch exited $rc after SIGINT, expected 0"
    for p in "${pids[@]}"; do
        ! kill -0 "$p" 2>/dev/null || fail "child $p is still running"
    done
    ! pgrep -g "$pgid" >/dev/null || fail "processes left in group $pgid"
    grep -q "^checkpoint: .*/ck/$(cat ck/latest)" out.txt || fail "launch did not report the checkpoint"
    local last
    last=$(sed -n 's/^step-0*\([0-9][0-9]*\)$/\1/p' ck/latest)
    [ "${last:-0}" -ge 3 ] || fail "the last checkpoint is $(cat ck/latest), expected step >= 3"
    # Steps advanced monotonically in the progress lines.
    sed -n 's/^step \([0-9]*\)\/.*/\1/p' out.txt | "$PY" -c '
import sys
s = [int(x) for x in sys.stdin]
assert s == sorted(s) and s[-1] >= 3, s
print("steps seen:", s)'
}

"case_$CASE"
echo "PASS: launch $CASE"
