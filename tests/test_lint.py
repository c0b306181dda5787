"""The tree passes its own lint and format checks (rules in pyproject.toml, [tool.ruff])."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .helpers import ROOT

HAVE_TREE = os.path.exists(os.path.join(ROOT, "pyproject.toml"))


def ruff(*args: str) -> subprocess.CompletedProcess:
    """`ruff ARGS` on the source tree; skips where ruff (the `test` extra) is missing."""
    exe = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (it comes with the `test` extra)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not HAVE_TREE, reason="runs on a source tree (pyproject.toml)")
def test_ruff_check_has_no_findings():
    res = ruff("check", "--output-format", "concise", ".")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.mark.skipif(not HAVE_TREE, reason="runs on a source tree (pyproject.toml)")
def test_ruff_format_leaves_the_tree_as_it_is():
    res = ruff("format", "--check", ".")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
