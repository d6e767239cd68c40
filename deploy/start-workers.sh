#!/usr/bin/env bash
# Starts N Quillan rollout workers on this host with the cores split between them, and stops
# them all (SIGINT, so each finishes cleanly) when it is stopped itself.
#
#   start-workers.sh [-n N] [-c CONFIG] [--env FILE] [--bin DIR] [--log-dir DIR]
#                    [--reserve K] [--cores C] [--no-pin] [--dry-run] [-- EXTRA ARGS...]
#
#   -n N          workers (default: QUILLAN_WORKERS from the env file, else 1)
#   -c CONFIG     the run's YAML (default: QUILLAN_CONFIG from the env file)
#   --env FILE    addresses and keys (default /etc/quillan/quillan.env when it exists);
#                 its QUILLAN_* values become --set overrides, as in the systemd units
#   --bin DIR     where quillan-rollout is (default: next to this script's ../build, or PATH)
#   --log-dir D   each worker's stderr (JSON lines) goes to D/worker-K.log (default ./logs)
#   --reserve K   cores left free for the rest of the host (default 0)
#   --cores C     cores to split (default: nproc)
#   --no-pin      do not pin workers to disjoint core ranges (taskset)
#   --dry-run     print the commands instead of running them
#   EXTRA ARGS    passed to every worker (e.g. --set rollout.credits=4)
#
# Each worker gets T = (C - K) / N threads (at least 1) and, unless --no-pin, the cores
# [k*T, (k+1)*T) through taskset, so workers do not fight over caches. Worker ids are
# HOST-1 .. HOST-N. Exit status: 0 when every worker stopped cleanly, 1 otherwise, 2 on a
# usage error.
set -euo pipefail

n="" config="" env_file="" bin="" log_dir="./logs" reserve=0 cores="" pin=1 dry=0
extra=()
usage() { sed -n '2,24s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case "$1" in
    -n) n="$2"; shift 2 ;;
    -c) config="$2"; shift 2 ;;
    --env) env_file="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --reserve) reserve="$2"; shift 2 ;;
    --cores) cores="$2"; shift 2 ;;
    --no-pin) pin=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "start-workers.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

if [ -z "$env_file" ] && [ -f /etc/quillan/quillan.env ]; then
    env_file=/etc/quillan/quillan.env
fi
sets=()
if [ -n "$env_file" ]; then
    [ -r "$env_file" ] || { echo "start-workers.sh: cannot read $env_file" >&2; exit 2; }
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
    add() { [ -n "${2:-}" ] && sets+=(--set "$1=$2") || true; }
    add network.dispatcher "${QUILLAN_DISPATCHER:-}"
    add network.weights "${QUILLAN_WEIGHTS:-}"
    add network.log_in "${QUILLAN_LOG_IN:-}"
    add reward.services.0.address "${QUILLAN_REWARD_ADDR:-}"
    add security.curve "${QUILLAN_CURVE:-}"
    add security.keys.client "${QUILLAN_CLIENT_KEY:-}"
    add security.keys.server "${QUILLAN_SERVER_KEY:-}"
    add logging.level "${QUILLAN_LOG_LEVEL:-}"
fi
n="${n:-${QUILLAN_WORKERS:-1}}"
config="${config:-${QUILLAN_CONFIG:-}}"
cores="${cores:-$(nproc)}"
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_int "$n" && [ "$n" -ge 1 ] || { echo "start-workers.sh: -n must be >= 1, got '$n'" >&2; exit 2; }
is_int "$cores" && [ "$cores" -ge 1 ] || { echo "start-workers.sh: bad --cores '$cores'" >&2; exit 2; }
is_int "$reserve" || { echo "start-workers.sh: bad --reserve '$reserve'" >&2; exit 2; }
[ -n "$config" ] || { echo "start-workers.sh: no config (-c, or QUILLAN_CONFIG in --env)" >&2; exit 2; }

exe=quillan-rollout
if [ -n "$bin" ]; then
    exe="$bin/quillan-rollout"
elif [ -x "$(dirname "$0")/../build/rollout/quillan-rollout" ]; then
    exe="$(dirname "$0")/../build/rollout/quillan-rollout"
fi
avail=$((cores - reserve))
[ "$avail" -ge 1 ] || avail=1
threads=$((avail / n))
[ "$threads" -ge 1 ] || threads=1
if [ "$pin" -eq 1 ] && { ! command -v taskset >/dev/null || [ $((threads * n)) -gt "$cores" ]; }; then
    pin=0 # no taskset, or more workers than cores: let the kernel place them
fi
host=$(hostname -s 2>/dev/null || hostname)

pids=()
stop() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
}
trap stop INT TERM
[ "$dry" -eq 1 ] || mkdir -p "$log_dir"
echo "start-workers.sh: $n workers x $threads threads on $cores cores (reserve $reserve)" >&2
for ((k = 1; k <= n; k++)); do
    cmd=()
    if [ "$pin" -eq 1 ]; then
        first=$(((k - 1) * threads))
        cmd+=(taskset -c "$first-$((first + threads - 1))")
    fi
    cmd+=("$exe" --config "$config" --id "$host-$k" --threads "$threads" "${sets[@]}" "${extra[@]}")
    if [ "$dry" -eq 1 ]; then
        line=$(printf '%q ' "${cmd[@]}")
        echo "${line% }"
        continue
    fi
    "${cmd[@]}" 2>"$log_dir/worker-$k.log" &
    pids+=($!)
    echo "start-workers.sh: worker $host-$k (pid ${pids[-1]}) logs to $log_dir/worker-$k.log" >&2
done
[ "$dry" -eq 1 ] && exit 0
status=0
for p in "${pids[@]}"; do
    wait "$p" || status=1
done
exit "$status"
