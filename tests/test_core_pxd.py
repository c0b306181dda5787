"""llmdist/_core.pxd declares the compiled classes: another Cython module cimports them and
reads their C attributes directly (as uvloop's modules share one declaration)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULE = """\
# cython: language_level=3
from llmdist._core cimport Plan, Runtime


def runtime_facts(Runtime rt):
    return rt.name, rt.rt.device_is_host, rt.device_id


def plan_runs(Plan p):
    return [(p.runs[i].src_off, p.runs[i].dst_off, p.runs[i].nbytes) for i in range(p.count)]
"""

SETUP = """\
from setuptools import Extension, setup
from Cython.Build import cythonize

setup(name="pxd_user", ext_modules=cythonize(
    [Extension("pxd_user", ["pxd_user.pyx"], include_dirs=[{include!r}])],
    include_path=[{root!r}], quiet=True))
"""


def test_another_cython_module_cimports_the_compiled_classes(tmp_path):
    pytest.importorskip("Cython")
    if not os.path.exists(os.path.join(ROOT, "llmdist", "_core.pxd")):
        pytest.skip("not a source tree")
    (tmp_path / "pxd_user.pyx").write_text(MODULE)
    (tmp_path / "setup.py").write_text(
        SETUP.format(include=os.path.join(ROOT, "include"), root=ROOT)
    )
    res = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    probe = textwrap.dedent("""
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        from llmdist import _core
        import pxd_user
        print(pxd_user.runtime_facts(_core.Runtime.host()))
        print(pxd_user.plan_runs(_core.plan_one(8, 16, 64)))
    """)
    res = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[:2] == ["('host', 1, 0)", "[(8, 16, 64)]"]
