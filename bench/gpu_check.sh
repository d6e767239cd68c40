#!/usr/bin/env bash
# The GPU check of issue 7, run once on a GPU machine (CUDA toolkit, cmake, gcc; no network,
# no other library): builds the bare CUDA compute core in a fresh directory, runs every parity
# program (tests/gpu and the whole-model one: PARITY lines against the CPU reference) and the
# 512m training-step benchmark (bench/gpu_train_step with its default arguments), and writes
#   ${OUT:-.}/gpu_results.md   markdown summary: device, build, every check, the benchmark
#   ${OUT:-.}/gpu_check.log    everything the steps printed
#   ${OUT:-.}/nvidia-smi.txt   the card before the run
# The summary is written whatever happens; the exit status is non-zero if any step failed
# (configure, build, a parity FAIL, a crash or timeout, a missing program).
#
# Time: well under 8 minutes on an H100 (one architecture built with -j16, a timeout per step,
# later steps skipped once GPU_CHECK_BUDGET seconds are spent).
# Environment: OUT (results folder), GPU_CHECK_BUILD (build folder, default build-gpu-check,
# removed first), JOBS (16), GPU_CHECK_BUDGET (450 s), GPU_TRAIN_ARGS (extra arguments for
# gpu_train_step, default none: its own B=32 T=1024 steps=3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
BUILD="${GPU_CHECK_BUILD:-$ROOT/build-gpu-check}"
JOBS="${JOBS:-16}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/gpu_results.md"
: >"$LOG"

FAILED=0
STEPS=()   # "name|status|seconds|note" rows of the summary table
PARITY_FAILS=()
PARITY_PASS=0
PARITY_FAIL=0
TRAIN_OUT=""

log() { printf '%s\n' "$*" | tee -a "$LOG"; }

# step NAME TIMEOUT CMD...: runs CMD with a timeout, its output into the log (and into
# $OUT_DIR/step_NAME.out); records status and time. Returns CMD's status.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -le 10 ]; then
        STEPS+=("$name|SKIPPED|0|time budget of ${BUDGET}s spent")
        FAILED=1
        log "=== $name: skipped, time budget spent"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    log "=== $name (timeout ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/step_$name.out" 2>&1
    rc=$?
    cat "$OUT_DIR/step_$name.out" >>"$LOG"
    local dt=$((SECONDS - t0)) status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
    fi
    [ "$rc" -ne 0 ] && FAILED=1
    STEPS+=("$name|$status|$dt|")
    log "=== $name: $status in ${dt}s"
    return "$rc"
}

# shellcheck disable=SC2317 # called by the EXIT trap
summary() {
    {
        echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
        echo
        echo "- commit: \`$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (working tree modified)')"
        echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1 || echo unknown)"
        echo "- CUDA: $(nvcc --version 2>/dev/null | tail -1 || echo unknown); architectures built: ${ARCHS:-?}"
        echo "- result: $([ "$FAILED" -eq 0 ] && echo '**PASS**' || echo '**FAIL**') in ${SECONDS}s"
        echo "- parity checks: $PARITY_PASS passed, $PARITY_FAIL failed"
        echo
        echo "| step | status | seconds | note |"
        echo "| --- | --- | ---: | --- |"
        local row
        for row in "${STEPS[@]}"; do
            IFS='|' read -r n s t note <<<"$row"
            echo "| $n | $s | $t | $note |"
        done
        if [ "${#PARITY_FAILS[@]}" -gt 0 ]; then
            echo
            echo "## Failed parity checks"
            echo
            echo '```'
            printf '%s\n' "${PARITY_FAILS[@]}"
            echo '```'
        fi
        if [ -n "$TRAIN_OUT" ]; then
            echo
            echo "## Training step (bench/gpu_train_step)"
            echo
            cat "$TRAIN_OUT"
        fi
        echo
        echo "## Parity lines"
        echo
        echo '```'
        grep -h '^PARITY\|^SKIP\|checks,' "$OUT_DIR"/step_parity_*.out 2>/dev/null || echo "(none)"
        echo '```'
        echo
        echo "Full output: gpu_check.log; the card before the run: nvidia-smi.txt."
    } >"$SUMMARY"
}
trap summary EXIT

log "gpu_check: $ROOT -> $OUT_DIR (build $BUILD, -j$JOBS, budget ${BUDGET}s)"
if ! timeout 30 nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1; then
    STEPS+=("nvidia-smi|FAILED|0|no usable GPU")
    FAILED=1
    log "nvidia-smi failed: no usable GPU"
    exit 1
fi
cat "$OUT_DIR/nvidia-smi.txt" >>"$LOG"

# Only the card's own architecture: a third of the device code to compile (CI builds all three).
ARCHS="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
case "$ARCHS" in
'' | *[!0-9]*) ARCHS="75;80;90" ;;
esac

rm -rf "$BUILD"
step configure 120 cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DQUILLAN_CUDA=ON \
    -DQUILLAN_NET=OFF -DQUILLAN_BLAS=OFF -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON \
    -DQUILLAN_WERROR=OFF "-DQUILLAN_CUDA_ARCHITECTURES=$ARCHS" || exit 1

# The GPU programs this tree defines: parity programs and the benchmark.
mapfile -t TARGETS < <(cmake --build "$BUILD" --target help 2>/dev/null |
    sed -n 's/^\.\.\. \(gpu_parity_[A-Za-z0-9_]*\|gpu_train_step\)$/\1/p' | sort -u)
for f in "$ROOT"/tests/gpu/*.cu; do
    t="$(basename "$f" .cu)"
    if ! printf '%s\n' "${TARGETS[@]}" | grep -qx "$t"; then
        STEPS+=("$t|MISSING|0|tests/gpu/$t.cu is not a build target")
        FAILED=1
    fi
done
log "targets: ${TARGETS[*]}"
step build 330 cmake --build "$BUILD" -j "$JOBS" --target quillan_cuda "${TARGETS[@]}" || exit 1

for t in "${TARGETS[@]}"; do
    case "$t" in gpu_parity_*) ;; *) continue ;; esac
    exe="$(find "$BUILD" -type f -name "$t" -perm -u+x | head -1)"
    if [ -z "$exe" ]; then
        STEPS+=("parity_$t|MISSING|0|built but not found")
        FAILED=1
        continue
    fi
    step "parity_$t" 120 "$exe"
    rc=$?
    out="$OUT_DIR/step_parity_$t.out"
    PARITY_PASS=$((PARITY_PASS + $(grep -c '^PARITY .* PASS$' "$out")))
    PARITY_FAIL=$((PARITY_FAIL + $(grep -c '^PARITY .* FAIL$' "$out")))
    while IFS= read -r line; do PARITY_FAILS+=("$t: $line"); done < <(grep '^PARITY .* FAIL$' "$out")
    # A program that exits 0 without a single PARITY line checked nothing.
    if [ "$rc" -eq 0 ] && ! grep -q '^PARITY ' "$out"; then
        STEPS+=("parity_$t|FAILED|0|no PARITY line printed")
        FAILED=1
    fi
done

exe="$(find "$BUILD" -type f -name gpu_train_step -perm -u+x | head -1)"
if [ -n "$exe" ]; then
    # shellcheck disable=SC2086 # GPU_TRAIN_ARGS is a list of words
    step train_step 300 "$exe" ${GPU_TRAIN_ARGS:-}
    TRAIN_OUT="$OUT_DIR/step_train_step.out"
else
    STEPS+=("train_step|MISSING|0|bench/gpu_train_step is not a build target in this tree")
    FAILED=1
fi

timeout 30 nvidia-smi --query-gpu=memory.used,memory.total,temperature.gpu --format=csv \
    >>"$LOG" 2>&1
log "gpu_check: $([ "$FAILED" -eq 0 ] && echo PASS || echo FAIL) in ${SECONDS}s; summary $SUMMARY"
exit "$FAILED"
