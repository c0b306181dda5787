#!/bin/sh
# Build one fake vendor runtime: build.sh VENDOR [OUTDIR]  ->  OUTDIR/LIB (prints the path).
# VENDOR is acl (tests/fake_acl/fake_ascendcl.c -> libascendcl.so) or cuda
# (tests/fake_cuda/fake_cudart.c -> libcudart.so). OUTDIR defaults to build/fake_VENDOR under the
# repository root. FAKE_ACL_CFLAGS or FAKE_CUDA_CFLAGS add compiler flags.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
case "${1:-}" in
acl) src=fake_ascendcl.c lib=libascendcl.so extra=${FAKE_ACL_CFLAGS:-} ;;
cuda) src=fake_cudart.c lib=libcudart.so extra=${FAKE_CUDA_CFLAGS:-} ;;
*) echo "usage: build.sh acl|cuda [OUTDIR]" >&2; exit 2 ;;
esac
vendor=$1
out=${2:-"$root/build/fake_$vendor"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root/tests/fake_$vendor"
${CC:-cc} -O2 -Wall -Wextra -Wno-unused-parameter $extra -I"$root/include" -I"$here" \
    -shared -fPIC -o "$out/$lib" "$src" -lpthread
if [ "$vendor" = cuda ]; then
    ln -sf libcudart.so "$out/libcuda.so.1"  # the fake answers the driver's calls too
fi
echo "$out/$lib"
