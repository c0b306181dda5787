#!/usr/bin/env bash
# Run an aarch64 wheel of llmdist on this x86_64 host: install it into an aarch64 CPython 3.11
# running under qemu-user, import llmdist, run the local demo (small sizes) and the transfer,
# validation and block-op tests.
#
#   bash tools/check_aarch64.sh dist/llmdist-*-cp311-*aarch64.whl
#
# The aarch64 CPython is Debian 12's python3.11 (arm64 packages unpacked into a sysroot, no
# chroot and no docker); qemu-aarch64-static (Debian's qemu-user-static) runs it with the sysroot
# as its library prefix. The sysroot is cached in $LLMDIST_AARCH64_ROOT (default
# build/aarch64-sysroot). pip, on this host, installs the wheel and the tests' dependencies
# (numpy, pytest, hypothesis: their manylinux2014 aarch64 wheels) into a fresh directory with
# `--platform manylinux2014_aarch64 --python-version 3.11`; that directory is the aarch64
# Python's only site directory, and the tests run from a copy of tests/ outside the source tree,
# so they import the installed wheel.
set -euo pipefail

[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: bash tools/check_aarch64.sh WHEEL (a cp311 aarch64 wheel)" >&2; exit 2; }
case "$(basename "$1")" in
    *-cp311-*aarch64*.whl) ;;
    *) echo "check_aarch64: $1 is not a cp311 aarch64 wheel (Debian 12's arm64 Python is 3.11)" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
sysroot=${LLMDIST_AARCH64_ROOT:-$root/build/aarch64-sysroot}
mkdir -p "$sysroot"
sysroot=$(cd "$sysroot" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/llmdist-aarch64.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

# qemu-user and the arm64 packages.
if ! command -v qemu-aarch64-static >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "check_aarch64: qemu-aarch64-static is missing: apt-get install qemu-user-static (as root)" >&2; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static
fi
if [ ! -x "$sysroot/usr/bin/python3.11" ]; then
    echo "check_aarch64: unpacking Debian's arm64 python3.11 into $sysroot" >&2
    dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
    debs=$work/debs
    mkdir -p "$debs"
    pkgs=(python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libc6:arm64
          libgcc-s1:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64
          liblzma5:arm64 libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64
          libuuid1:arm64 libstdc++6:arm64)
    (cd "$debs" && apt-get download -qq "${pkgs[@]}") \
        || { apt-get update -qq && (cd "$debs" && apt-get download -qq "${pkgs[@]}"); }
    for d in "$debs"/*.deb; do dpkg -x "$d" "$sysroot"; done
fi
py=(qemu-aarch64-static -L "$sysroot" "$sysroot/usr/bin/python3.11")
echo "aarch64 python: $("${py[@]}" -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"

# The wheel and the tests' dependencies, for aarch64 CPython 3.11.
site=$work/site
python3 -m pip install -q --disable-pip-version-check --no-compile --target "$site" \
    --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    --only-binary=:all: "$wheel" pytest hypothesis
cp -r "$root/tests" "$work/tests"
rm -rf "$work/tests/__pycache__"

cd "$work"
export PYTHONPATH=$site PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
"${py[@]}" -c '
import platform, llmdist, llmdist._core as core
assert platform.machine() == "aarch64", platform.machine()
assert core.__file__.startswith("'"$site"'/"), core.__file__
print("import: llmdist", llmdist.__version__, "from", core.__file__)'
echo "demo (local, 4 layers x 256 tokens):"
"${py[@]}" -m llmdist demo --mode local --layers 4 --tokens 256 --dim 128
echo "tests:"
# host runtime only: the fake vendor libraries of the device-runtime variants would be built by
# this machine's compiler, for x86_64, which the emulated aarch64 Python cannot load
LLMDIST_TEST_RUNTIMES=host "${py[@]}" -m pytest -q -p no:cacheprovider tests/test_transfer.py tests/test_validation.py \
    tests/test_block_ops.py
echo "check_aarch64: passed in $(( $(date +%s) - started )) s"
