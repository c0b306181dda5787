#!/bin/sh
# Build the fake CUDA runtime: build.sh [OUTDIR]  ->  OUTDIR/libcudart.so (prints the path), and
# OUTDIR/libcuda.so.1, a link to it (the driver calls it also answers: LLMDIST_CUDA_DRIVER_LIBRARY).
# OUTDIR defaults to build/fake_cuda under the repository root. FAKE_CUDA_CFLAGS adds compiler
# flags.
exec sh "$(dirname "$0")/../fake_runtime/build.sh" cuda "$@"
