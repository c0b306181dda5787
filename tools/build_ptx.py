"""Compile the CUDA copy kernel (src/cuda/copy_runs.cu) to PTX with NVRTC, into
llmdist/copy_runs.ptx, the file the wheel ships and the CUDA runtime adapter loads.

NVRTC comes from the nvidia-cuda-nvrtc-cu12 wheel (no GPU and no CUDA toolkit needed); the
`test` extra pins the version the shipped file was made with, so that the test comparing the
shipped PTX with a fresh build sees the same compiler. Two settings keep the PTX loadable by
every driver from CUDA 12.0 on:
  - a low virtual architecture (compute_70), so the driver can JIT it for Volta and anything newer;
  - the PTX ISA `.version` directive pinned to 8.0, the ISA of CUDA 12.0: a driver JIT-compiles
    only ISA versions it knows, and a new NVRTC writes its own (8.8 for 12.9) even when the code
    uses nothing newer. ptxas rejects an instruction that needs a newer ISA than the directive
    says, so the test that assembles the file with ptxas also proves the pin is honest.

Usage: python tools/build_ptx.py [--nvrtc LIB] [--out PATH]   (prints the path written)"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "src", "cuda", "copy_runs.cu")
HEADER = os.path.join(ROOT, "include", "llmdist", "copy_kernel.h")
HEADER_NAME = "llmdist/copy_kernel.h"
OUTPUT = os.path.join(ROOT, "llmdist", "copy_runs.ptx")
ARCH = "compute_70"
PTX_ISA = "8.0"  # CUDA 12.0


def find_nvrtc() -> Optional[str]:
    """libnvrtc.so.12 of the nvidia-cuda-nvrtc-cu12 wheel (or LLMDIST_NVRTC_LIBRARY)."""
    override = os.environ.get("LLMDIST_NVRTC_LIBRARY")
    if override:
        return override
    for entry in sys.path:
        hits = sorted(
            glob.glob(os.path.join(entry or ".", "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1*"))
        )
        if hits:
            return hits[0]
    return None


def nvrtc_version(lib: str) -> str:
    """NVRTC's own version, "major.minor"."""
    nvrtc = ctypes.CDLL(lib)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
        raise RuntimeError("nvrtcVersion failed")
    return f"{major.value}.{minor.value}"


def pin_isa(ptx: str) -> str:
    """Set the `.version` directive to PTX_ISA unless NVRTC already wrote an older one."""
    m = re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.M)
    if m is None:
        raise RuntimeError("NVRTC output has no .version directive")
    have = (int(m.group(1)), int(m.group(2)))
    want = tuple(int(x) for x in PTX_ISA.split("."))
    if have <= want:
        return ptx
    return ptx[: m.start()] + f".version {PTX_ISA}" + ptx[m.end() :]


def compile_ptx(lib: str) -> str:
    """The kernel's PTX, as NVRTC at lib makes it, with the ISA version pinned."""
    nvrtc = ctypes.CDLL(lib)
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed: {nvrtc.nvrtcGetErrorString(rc).decode()}")

    with open(SOURCE, "rb") as f:
        source = f.read()
    with open(HEADER, "rb") as f:
        header = f.read()
    headers = (ctypes.c_char_p * 1)(header)
    names = (ctypes.c_char_p * 1)(HEADER_NAME.encode())
    check(
        nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"copy_runs.cu", 1, headers, names),
        "nvrtcCreateProgram",
    )
    try:
        opts = [f"--gpu-architecture={ARCH}".encode(), b"--std=c++11"]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), argv)
        if rc != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(
                "NVRTC could not compile the kernel:\n" + log.value.decode("utf-8", "replace")
            )
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        buf = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return pin_isa(buf.value.decode("ascii"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvrtc", help="path of libnvrtc.so.12 (default: the pip wheel's)")
    ap.add_argument("--out", default=OUTPUT, help="where to write the PTX")
    args = ap.parse_args(argv)
    lib = args.nvrtc or find_nvrtc()
    if lib is None:
        print(
            "NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (see pyproject.toml, "
            "extra 'test', for the pinned version)",
            file=sys.stderr,
        )
        return 1
    ptx = compile_ptx(lib)
    with open(args.out, "w") as f:
        f.write(ptx)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
