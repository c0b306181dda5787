#!/usr/bin/env bash
# Install a wheel (or the sdist) of llmdist into a fresh virtual environment of the given Python
# and run what the README runs there: the demo and the test suite, against the installed package.
#
#   bash tools/check_wheel.sh WHEEL_OR_SDIST PYTHON [PYTEST_ARGS...]
#
# The tests run from a copy of tests/ (with the include/, src/, tools/, bench/ and README files some of
# them read) outside the source tree, and LLMDIST_TEST_INSTALLED=1 makes them refuse to start
# unless llmdist was imported from the environment's site-packages. PYTEST_ARGS replace the
# default `tests` (e.g. tests/test_transfer.py to run one file).
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: bash tools/check_wheel.sh WHEEL_OR_SDIST PYTHON [PYTEST_ARGS...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
dist=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
python=$2
shift 2
[ -f "$dist" ] || { echo "check_wheel: no such file: $dist" >&2; exit 2; }
command -v "$python" >/dev/null || { echo "check_wheel: no such Python: $python" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/llmdist-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

"$python" -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --disable-pip-version-check "llmdist[test] @ file://$dist"
mkdir -p "$work/tree"
for d in tests include src tools bench README.md; do cp -r "$root/$d" "$work/tree/$d"; done
find "$work/tree" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/tree"
echo "check_wheel: $(basename "$dist") on $(python -c 'import platform; print("CPython", platform.python_version())'): llmdist $(python -c "import llmdist; print(llmdist.__version__)") from $(python -c 'import llmdist, os; print(os.path.dirname(llmdist.__file__))')"
python -m llmdist demo
LLMDIST_TEST_INSTALLED=1 python -m pytest -q -p no:cacheprovider "${@:-tests}"
echo "check_wheel: $(basename "$dist") passed in $(( $(date +%s) - started )) s"
