#!/usr/bin/env bash
# Multi-host fault test on one machine (issue 8, acceptance 3; docs/TESTING-netns.md).
#   netns_test.sh BUILD_DIR SOURCE_DIR WORK_DIR LEDGER
# The learner, two rollout workers and quillan-reward each run in a network namespace of their
# own, joined by a bridge in a fifth one (10.199.0.0/24). Then, on the learner's link, in turn:
#   1. 5% packet loss both ways (nftables numgen rules) and a bandwidth cap (tbf, both ways),
#      kept for the rest of the run; training must go on (steps advance);
#   2. the link cut for 10 s (ip link set down); steps advance afterwards;
#   3. worker w1 frozen (SIGSTOP) for longer than the lease time-out and the heartbeat liveness,
#      then SIGCONT; its leases expire and are re-leased, steps advance, w1 sends groups again.
# The workers then stop, the learner checkpoints on SIGTERM, and netns_ledger + netns_check.py
# hold its lease table and batcher counters against every daemon's JSON log: no unit lost,
# none accepted twice, every expired lease re-leased or pending, the log counts match.
# Exits 77 (SKIP) without root / CAP_NET_ADMIN, iproute2 (ip, tc) or nftables (nft). Every
# namespace (and with it its nft table and qdiscs) is removed on exit, failure included.
set -euo pipefail

BUILD="$1"
SRC="$2"
W="$3"
LEDGER="$4"
SKIP=77
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

skip() {
    echo "SKIP: $*"
    exit $SKIP
}

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# ---- probe: what this test needs, skipped visibly where it is missing ----
[ "$(id -u)" -eq 0 ] || skip "not root (network namespaces need CAP_NET_ADMIN)"
for tool in ip tc nft; do
    command -v "$tool" >/dev/null ||
        skip "'$tool' not found (Debian packages iproute2 and nftables)"
done
NS_PREFIX="qn$$"
PROBE="${NS_PREFIX}probe"
ip netns add "$PROBE" 2>/dev/null || skip "cannot create a network namespace (no CAP_NET_ADMIN?)"
probe_ok=1
ip netns exec "$PROBE" nft add table inet qnprobe 2>/dev/null || probe_ok=0
ip netns del "$PROBE"
[ "$probe_ok" -eq 1 ] || skip "nftables does not work in a namespace (kernel nf_tables?)"

LEARNER="$BUILD/learner/quillan-learner"
ROLLOUT="$BUILD/rollout/quillan-rollout"
REWARD="$BUILD/reward/quillan-reward"
Q="$BUILD/common/quillan"
for b in "$LEARNER" "$ROLLOUT" "$REWARD" "$Q" "$LEDGER"; do
    [ -x "$b" ] || fail "$b is not built"
done

rm -rf "$W"
mkdir -p "$W"
cd "$W"

# ---- topology ----
NET=10.199.0
BR="${NS_PREFIX}br"
NODES=(L W1 W2 R)
declare -A ADDR=([L]=$NET.1 [W1]=$NET.2 [W2]=$NET.3 [R]=$NET.4)
PIDS=()

cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do
        kill -CONT "$p" 2>/dev/null || true
        kill -KILL "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    for n in "${NODES[@]}"; do
        ip netns del "${NS_PREFIX}$n" 2>/dev/null || true
    done
    ip netns del "$BR" 2>/dev/null || true
    if [ "$rc" -ne 0 ] && [ "$rc" -ne $SKIP ]; then
        for f in learner.log w1.log w2.log reward.log; do
            [ -f "$f" ] && { echo "--- last lines of $W/$f:" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

ip netns add "$BR"
ip -n "$BR" link add name br0 type bridge
ip -n "$BR" link set br0 up
for n in "${NODES[@]}"; do
    ns="${NS_PREFIX}$n"
    ip netns add "$ns"
    # eth0 inside the node, b<node> on the bridge.
    ip -n "$BR" link add name "b$n" type veth peer name eth0 netns "$ns"
    ip -n "$BR" link set "b$n" master br0 up
    ip -n "$ns" addr add "${ADDR[$n]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done
for n in W1 W2 R; do
    # A refused TCP connection proves the path (no ping on minimal systems).
    ip netns exec "${NS_PREFIX}$n" "$PY" -c '
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    pass' "${ADDR[L]}" ||
        fail "namespace $n cannot reach the learner at ${ADDR[L]}"
done
echo "topology: learner ${ADDR[L]}, workers ${ADDR[W1]} ${ADDR[W2]}, reward ${ADDR[R]}"

# ---- the run ----
"$Q" data make-task addition --n 4000 --test 10 --out data >/dev/null
LEASE_S=5
LIVENESS=8
FREEZE_S=16
CFG="$SRC/configs/tiny.yaml"
SETS=(--set "network.dispatcher=tcp://${ADDR[L]}:5555" --set "network.weights=tcp://${ADDR[L]}:5556"
      --set "network.log_in=tcp://${ADDR[L]}:5559" --set "network.log_out=tcp://${ADDR[L]}:5558"
      --set "reward.services.0.address=tcp://${ADDR[R]}:5557"
      --set "reward.builtin.bind=tcp://${ADDR[R]}:5557"
      --set security.bind_any=true
      --set "network.lease_timeout_s=$LEASE_S" --set network.heartbeat_ivl_s=1
      --set "network.heartbeat_liveness=$LIVENESS"
      --set "data.train=$W/data/train.jsonl" --set "learner.checkpoint_dir=$W/ck"
      --set learner.checkpoint_interval=100000 --set learner.max_steps=100000
      --set learner.eval_interval=0 --set learner.minibatches=2 --set learner.ppo_epochs=1
      --set learner.dynamic_sampling=false)
SPB=2 # learner.step records per batch: minibatches x ppo_epochs

start_in() { # NODE LOGFILE CMD... : starts CMD in NODE's namespace; sets STARTED
    local node="$1" log="$2"
    shift 2
    ip netns exec "${NS_PREFIX}$node" "$@" 2>"$log" >>stdout.txt &
    STARTED=$!
    PIDS+=("$STARTED")
}

steps() {
    grep -c '"event":"learner.step"' learner.log 2>/dev/null || true
}

# Waits until the learner has logged at least $1 steps, up to $2 seconds.
wait_steps() {
    local i
    for ((i = 0; i < $2 * 2; i++)); do
        [ "$(steps)" -ge "$1" ] && return 0
        for p in "${PIDS[@]}"; do
            kill -0 "$p" 2>/dev/null || fail "process $p ended early"
        done
        sleep 0.5
    done
    fail "the learner reached $(steps) steps, not $1, within $2 s ($3)"
}

# The learner first, on its namespace's address (security.bind_any).
start_in L learner.log "$LEARNER" --config "$CFG" "${SETS[@]}" --set logging.level=debug
LP=$STARTED
for ((i = 0; i < 120; i++)); do
    grep -q '"event":"dispatch.listen"' learner.log && break
    kill -0 "$LP" 2>/dev/null || fail "the learner did not start (see learner.log)"
    sleep 0.5
done
grep -q '"event":"dispatch.listen"' learner.log ||
    fail "the learner did not start its dispatcher within 60 s"
start_in R reward.log "$REWARD" --config "$CFG" "${SETS[@]}" --bind "tcp://${ADDR[R]}:5557"
RP=$STARTED
start_in W1 w1.log "$ROLLOUT" --config "$CFG" "${SETS[@]}" --id w1 --threads 1
W1P=$STARTED
start_in W2 w2.log "$ROLLOUT" --config "$CFG" "${SETS[@]}" --id w2 --threads 1
W2P=$STARTED
wait_steps 1 240 "warm-up"
echo "warm-up: $(steps) steps"

# 1. Loss and a bandwidth cap on the learner's link, both ways, for the rest of the run.
ip netns exec "${NS_PREFIX}L" nft -f - <<'EOF'
table inet qnloss {
    chain in { type filter hook input priority 0; policy accept; numgen random mod 100 < 5 counter drop; }
    chain out { type filter hook output priority 0; policy accept; numgen random mod 100 < 5 counter drop; }
}
EOF
tc -n "${NS_PREFIX}L" qdisc add dev eth0 root tbf rate 8mbit burst 32kbit latency 400ms
tc -n "$BR" qdisc add dev bL root tbf rate 8mbit burst 32kbit latency 400ms
# grep without -q reads all of nft's output: -q would exit at the first match and, under
# pipefail, nft's SIGPIPE would fail the check.
ip netns exec "${NS_PREFIX}L" nft list table inet qnloss | grep "numgen random mod 100 < 5" >/dev/null ||
    fail "the loss rules are not in place"
s0=$(steps)
wait_steps $((s0 + 2)) 240 "under 5% loss and an 8 Mbit/s cap"
dropped=$(ip netns exec "${NS_PREFIX}L" nft list table inet qnloss |
          sed -n 's/.*packets \([0-9]*\).*/\1/p' | head -1)
echo "1. loss + cap: steps $s0 -> $(steps)"

# 2. The learner's link cut for 10 s.
ip -n "$BR" link set bL down
sleep 10
ip -n "$BR" link set bL up
s1=$(steps)
wait_steps $((s1 + 1)) 240 "after the 10 s link cut"
echo "2. link cut 10 s: steps $s1 -> $(steps)"

# 3. w1 frozen past its lease time-out and its heartbeat liveness.
kill -STOP "$W1P"
t_stop=$(date +%s.%N)
sleep "$FREEZE_S"
kill -CONT "$W1P"
w1_before=$(grep -c '"event":"rollout.group"' w1.log || true)
s2=$(steps)
wait_steps $((s2 + 1)) 240 "after w1 was frozen for $FREEZE_S s"
for ((i = 0; i < 240; i++)); do
    [ "$(grep -c '"event":"rollout.group"' w1.log || true)" -gt "$w1_before" ] && break
    sleep 0.5
done
[ "$(grep -c '"event":"rollout.group"' w1.log || true)" -gt "$w1_before" ] ||
    fail "w1 sent no group after SIGCONT"
echo "3. w1 frozen $FREEZE_S s (lease $LEASE_S s, liveness $LIVENESS s): steps $s2 -> $(steps)"
expiry=$("$PY" - "$t_stop" <<'EOF'
import json, sys
t0 = float(sys.argv[1])
n = 0
for line in open("learner.log"):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("time", 0) >= t0 and r.get("event") in ("dispatch.lease_expired", "dispatch.worker_dead"):
        n += 1
print(n)
EOF
)
[ "$expiry" -ge 1 ] || fail "no lease expired and no worker was declared dead while w1 was frozen"

# ---- stop: workers first (their last groups reach the learner), then the learner ----
kill -TERM "$W1P" "$W2P"
wait "$W1P" || fail "w1 exited $?"
wait "$W2P" || fail "w2 exited $?"
# The dispatcher declares both dead (liveness) and releases their leases before it saves.
sleep $((LIVENESS + 3))
kill -TERM "$LP"
wait "$LP" || fail "the learner exited $? on SIGTERM"
kill -TERM "$RP"
wait "$RP" || fail "quillan-reward exited $? on SIGTERM"
[ ! -s stdout.txt ] || fail "a daemon wrote to stdout: $(head -c 300 stdout.txt)"
echo "loss rule drops (inbound): ${dropped:-?} packets"

[ -s "$W/ck/latest" ] || fail "the learner left no checkpoint in $W/ck"
"$LEDGER" "$W/ck/$(cat "$W/ck/latest")" "$CFG" "${SETS[@]}" >ledger.json || fail "netns_ledger failed"
"$PY" "$SRC/tests/e2e/netns_check.py" --steps-per-batch $SPB ledger.json learner.log w1.log w2.log ||
    fail "the books do not balance (see above)"
echo "PASS"
