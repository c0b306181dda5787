#!/bin/sh
# Build the fake CUDA runtime: build.sh [OUTDIR]  ->  OUTDIR/libcudart.so (prints the path), and
# OUTDIR/libcuda.so.1, a link to it (the driver calls it also answers: LLMDIST_CUDA_DRIVER_LIBRARY).
# OUTDIR defaults to build/fake_cuda under the repository root. FAKE_CUDA_CFLAGS adds compiler
# flags.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-"$root/build/fake_cuda"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"
${CC:-cc} -O2 -Wall -Wextra -Wno-unused-parameter ${FAKE_CUDA_CFLAGS:-} -I"$root/include" -I"$here/../fake_runtime" \
    -shared -fPIC -o "$out/libcudart.so" fake_cudart.c -lpthread
ln -sf libcudart.so "$out/libcuda.so.1"
echo "$out/libcudart.so"
