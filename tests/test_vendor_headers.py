"""Our ACL and CUDA declarations (include/llmdist/acl.h, cuda.h) against the vendors' headers.

The headers come from wheels on PyPI: ACL's from torch-npu, CUDA's from nvidia-cuda-runtime-cu12
(12.9) and nvidia-cuda-runtime (13), with the crt/ headers they include from the matching
nvcc/crt wheel. Each wheel is fetched once into build/vendor_headers and only its headers are
kept. tests/vendor_headers/*.c assign every vendor function to our table's member (a signature
mismatch does not compile) and compare struct layouts and constants. Skipped, saying why, when
a wheel cannot be fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import List, NamedTuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, "build", "vendor_headers")
CC = os.environ.get("CC", "cc")
# Headers do not depend on the interpreter or the machine: always fetch the same files.
PLATFORM_ARGS = [
    "--python-version",
    "3.11",
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
]


class Wheel(NamedTuple):
    spec: str  # what pip downloads
    prefix: str  # the part of the wheel kept: headers only
    include: str  # the include directory inside the kept part


TORCH_NPU = Wheel("torch-npu==2.14.0", "torch_npu/include/acl/", "torch_npu/include")
CUDA12 = [
    Wheel(
        "nvidia-cuda-runtime-cu12==12.9.79",
        "nvidia/cuda_runtime/include/",
        "nvidia/cuda_runtime/include",
    ),
    Wheel(
        "nvidia-cuda-nvcc-cu12==12.9.86",
        "nvidia/cuda_nvcc/include/crt/",
        "nvidia/cuda_nvcc/include",
    ),
]
CUDA13 = [
    Wheel("nvidia-cuda-runtime==13.0.96", "nvidia/cu13/include/", "nvidia/cu13/include"),
    Wheel("nvidia-cuda-crt==13.0.88", "nvidia/cu13/include/crt/", "nvidia/cu13/include"),
]


def fetch(wheel: Wheel) -> str:
    """The include directory of wheel's headers, fetched and extracted on first use."""
    dest = os.path.join(CACHE, wheel.spec.replace("==", "-"))
    done = os.path.join(dest, ".complete")
    if not os.path.exists(done):
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    "-d",
                    tmp,
                    *PLATFORM_ARGS,
                    wheel.spec,
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )
            files = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if res.returncode != 0 or not files:
                why = (res.stderr or res.stdout).strip().splitlines()
                pytest.skip(
                    f"could not fetch {wheel.spec} from PyPI: {why[-1] if why else 'no wheel'}"
                )
            shutil.rmtree(dest, ignore_errors=True)
            with zipfile.ZipFile(os.path.join(tmp, files[0])) as z:
                kept = [
                    n for n in z.namelist() if n.startswith(wheel.prefix) and not n.endswith("/")
                ]
                assert kept, f"{files[0]} has no {wheel.prefix}"
                for name in kept:
                    z.extract(name, dest)
        open(done, "w").close()
    return os.path.join(dest, wheel.include)


def check(
    source: str, includes: List[str], tmp_path, header_dir: str = ""
) -> subprocess.CompletedProcess:
    """Build tests/vendor_headers/<source> against includes and run it."""
    exe = str(tmp_path / source.replace(".c", ""))
    args = [CC, "-std=gnu11", "-Wall", "-Werror", "-I", header_dir or os.path.join(ROOT, "include")]
    for inc in includes:
        args += ["-I", inc]
    res = subprocess.run(
        args + [os.path.join(HERE, "vendor_headers", source), "-o", exe],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        return res
    return subprocess.run([exe], capture_output=True, text=True)


def test_acl_declarations_match_the_vendor_headers(tmp_path):
    res = check("acl_check.c", [fetch(TORCH_NPU)], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize(
    "wheels,version", [(CUDA12, 12090), (CUDA13, 13000)], ids=["cuda12", "cuda13"]
)
def test_cuda_declarations_match_the_vendor_headers(tmp_path, wheels, version):
    res = check("cuda_check.c", [fetch(w) for w in wheels], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", str(version)]


def test_a_wrong_declaration_fails_the_check(tmp_path):
    """The check catches a parameter of the wrong type (a copy of our header, altered)."""
    inc = fetch(TORCH_NPU)
    ours = tmp_path / "include" / "llmdist"
    ours.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "include", "llmdist", "runtime.h"), ours)
    text = open(os.path.join(ROOT, "include", "llmdist", "acl.h")).read()
    altered = text.replace("size_t destMax, const void *src", "uint32_t destMax, const void *src")
    assert altered != text
    (ours / "acl.h").write_text(altered)
    res = check("acl_check.c", [inc], tmp_path, str(tmp_path / "include"))
    assert res.returncode != 0
    assert "aclrtMemcpyAsync" in res.stderr and "incompatible" in res.stderr
