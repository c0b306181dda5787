#!/bin/sh
# Build the fake ACL runtime: build.sh [OUTDIR]  ->  OUTDIR/libascendcl.so (prints the path).
# OUTDIR defaults to build/fake_acl under the repository root. FAKE_ACL_CFLAGS adds compiler
# flags (-DFAKE_ACL_NO_IPC: a library without the device-IPC symbols, as older CANN).
exec sh "$(dirname "$0")/../fake_runtime/build.sh" acl "$@"
