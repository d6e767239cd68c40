#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan, coverage on every library) and runs each
# for a bounded time, starting from its committed seeds in tests/fuzz/corpus/<target>/.
#   FUZZ_SECONDS   seconds per target (default 30)
#   FUZZ_TARGETS   space-separated subset (default: every target)
#   FUZZ_BUILD_DIR build directory (default build-fuzz)
#   JOBS           build parallelism (default 2)
# New inputs go to $FUZZ_BUILD_DIR/fuzz-work/<target>/ (not the repository); a crash leaves its
# input in $FUZZ_BUILD_DIR/fuzz-artifacts/. Exit status: 0 when no target crashed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
SECS="${FUZZ_SECONDS:-30}"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_C_COMPILER=clang -DQUILLAN_FUZZ=ON \
        -DQUILLAN_SANITIZE=ON -DQUILLAN_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link"
fi
cmake --build "$BUILD" -j "${JOBS:-2}" --target fuzz_all
TARGETS="${FUZZ_TARGETS:-$(cat "$BUILD/tests/fuzz/fuzz_targets.txt")}"
mkdir -p "$BUILD/fuzz-artifacts"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
failed=()
for t in $TARGETS; do
    work="$BUILD/fuzz-work/$t"
    mkdir -p "$work"
    seeds="$ROOT/tests/fuzz/corpus/$t"
    max_len=65536
    [ "$t" = fuzz_qpolicy ] && max_len=262144 # its seed is a whole (small) policy
    echo "=== $t: ${SECS} s ==="
    if ! "$BUILD/tests/fuzz/$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
        -max_len="$max_len" -print_final_stats=1 -artifact_prefix="$BUILD/fuzz-artifacts/$t-" \
        "$work" "$seeds" >"$BUILD/fuzz-artifacts/$t.log" 2>&1; then
        echo "FAIL $t (log: $BUILD/fuzz-artifacts/$t.log)"
        tail -40 "$BUILD/fuzz-artifacts/$t.log"
        failed+=("$t")
    else
        grep -E '^stat::number_of_executed_units|^Done' "$BUILD/fuzz-artifacts/$t.log" | tr '\n' ' '
        echo
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets that crashed: ${failed[*]}"
    exit 1
fi
echo "all fuzz targets ran ${SECS} s without a crash"
