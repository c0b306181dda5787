#!/bin/sh
# Build the fake ACL runtime: build.sh [OUTDIR]  ->  OUTDIR/libascendcl.so (prints the path).
# OUTDIR defaults to build/fake_acl under the repository root. FAKE_ACL_CFLAGS adds compiler
# flags (-DFAKE_ACL_NO_IPC: a library without the device-IPC symbols, as older CANN).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-"$root/build/fake_acl"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"
${CC:-cc} -O2 ${FAKE_ACL_CFLAGS:-} -I"$here/../fake_runtime" -shared -fPIC -o "$out/libascendcl.so" fake_ascendcl.c -lpthread
echo "$out/libascendcl.so"
