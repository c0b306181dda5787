"""The CUDA copy kernel's PTX: the file shipped in the package is what tools/build_ptx.py makes
from src/cuda/copy_runs.cu now, it assembles for the GPUs we target (ptxas, sm_80 and sm_90),
and it stays loadable by drivers from CUDA 12.0 on (PTX ISA 8.0 at most). NVRTC and ptxas
come from the nvidia-cuda-nvrtc-cu12 / nvidia-cuda-nvcc-cu12 wheels of the `test` extra; no
GPU is needed."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import llmdist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the PTX the imported llmdist ships (the checkout's, or an installed wheel's)
SHIPPED = os.path.join(os.path.dirname(llmdist.__file__), "copy_runs.ptx")


def _build_ptx():
    spec = importlib.util.spec_from_file_location(
        "build_ptx", os.path.join(ROOT, "tools", "build_ptx.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptxas():
    for entry in sys.path:
        hits = glob.glob(os.path.join(entry or ".", "nvidia", "cuda_nvcc", "bin", "ptxas"))
        if hits:
            return hits[0]
    return None


def _shipped() -> str:
    with open(SHIPPED) as f:
        return f.read()


def test_shipped_ptx_is_current():
    bp = _build_ptx()
    lib = bp.find_nvrtc()
    if lib is None:
        pytest.skip("NVRTC wheel not installed (pip install '.[test]' brings the pinned one)")
    shipped = _shipped()
    made_by = re.search(r"release (\d+\.\d+)", shipped).group(1)
    have = bp.nvrtc_version(lib)
    assert have == made_by, (
        f"the shipped PTX was made by NVRTC {made_by}, the installed NVRTC is "
        f"{have}: install the version pinned in pyproject.toml's test extra"
    )
    assert bp.compile_ptx(lib) == shipped, (
        "llmdist/copy_runs.ptx is stale: run python tools/build_ptx.py and commit the result"
    )


def test_shipped_ptx_targets_old_drivers_and_matches_the_launch_layout():
    ptx = _shipped()
    version = tuple(int(x) for x in re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.M).groups())
    assert version <= (8, 0), "drivers of CUDA 12.0 JIT-compile PTX ISA 8.0 at most"
    assert re.search(r"^\.target sm_70$", ptx, re.M)
    # the four parameters of include/llmdist/copy_kernel.h, in order
    params = re.findall(r"\.param \.(\w+) llmd_copy_runs_param_(\d+)", ptx)
    assert params == [("u64", "0"), ("u32", "1"), ("u64", "2"), ("u32", "3")]
    assert ".maxntid 256, 1, 1" in ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptxas_assembles_the_shipped_ptx(arch, tmp_path):
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip(
            "ptxas wheel not installed (pip install '.[test]' brings nvidia-cuda-nvcc-cu12)"
        )
    out = tmp_path / f"copy_runs_{arch}.cubin"
    proc = subprocess.run(
        [ptxas, "--gpu-name", arch, SHIPPED, "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


def test_isa_pin_keeps_older_versions_and_lowers_newer_ones():
    bp = _build_ptx()
    assert ".version 8.0\n" in bp.pin_isa("//x\n.version 8.8\n.target sm_70\n")
    assert ".version 7.8\n" in bp.pin_isa("//x\n.version 7.8\n.target sm_70\n")
    with pytest.raises(RuntimeError, match="no .version"):
        bp.pin_isa(".target sm_70\n")
