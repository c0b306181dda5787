#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run. Builds llmdist._core with both sanitizers in
# a scratch copy of the tree, copying with memcpy alone (AddressSanitizer does not see streaming
# stores, so the host copy engine's streaming path is compiled out), then runs the transfer,
# cluster, reliability and pull/push suites on that build (the last covers the layer loop's read
# direction). A sanitizer report aborts the process that made it, which fails the run. Needs gcc
# (its libasan and libubsan come with it), Cython and setuptools>=77 in the Python that runs it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/llmdist-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r "$root/setup.py" "$root/pyproject.toml" "$root/llmdist" "$root/src" "$root/include" \
    "$root/tests" "$work/"
rm -f "$work"/llmdist/*.so "$work"/llmdist/_core.c
cd "$work"

san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
CC=gcc CFLAGS="$san -DLLMD_NO_STREAM_STORES" LDFLAGS="$san" LLMDIST_DEBUG_BUILD=1 \
    "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || { cat build.log; exit 1; }

# Python itself is not instrumented: the runtimes are preloaded, leak checks (Python keeps
# memory until exit) are off, and the first report ends the process.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The host runtime only: the suites' runs on the fake device runtimes belong to the main run.
LLMDIST_TEST_RUNTIMES=host "$PY" -m pytest -q -p no:cacheprovider tests/test_transfer.py tests/test_cluster.py \
    tests/test_reliability.py tests/test_pull_push.py -k "not mooncake and not transport_option"
