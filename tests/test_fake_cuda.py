"""The fake CUDA runtime (tests/fake_cuda): builds it, loads it with ctypes and checks its rules.

The fake stands in for libcudart.so on machines without a GPU; the CUDA backend's tests rely on
it behaving like the real runtime (argument checks, stream order, IPC across processes) and on it
running the copy kernel's semantics exactly as src/cuda/copy_runs.cu defines them.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llmdist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PTX = os.path.join(os.path.dirname(llmdist.__file__), "copy_runs.ptx")

H2H, H2D, D2H, D2D, DEFAULT = 0, 1, 2, 3, 4
INVALID_VALUE, INVALID_CONFIGURATION, INVALID_DIRECTION = 1, 9, 21
INVALID_DEVICE_FUNCTION, DEVICE_UNINITIALIZED = 98, 201
UNSUPPORTED_PTX, INVALID_HANDLE, SYMBOL_NOT_FOUND = 222, 400, 500
NOT_READY, ILLEGAL_ADDRESS, OUT_OF_RESOURCES, LAUNCH_FAILURE = 600, 700, 701, 719

P = ctypes.c_void_p
PP = ctypes.POINTER(ctypes.c_void_p)
SZ = ctypes.c_size_t


class Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", MemLocation),
        ("dstLocHint", MemLocation),
        ("flags", ctypes.c_uint),
    ]


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


SIGNATURES = {
    "cudaSetDevice": [ctypes.c_int],
    "cudaStreamCreateWithFlags": [PP, ctypes.c_uint],
    "cudaStreamDestroy": [P],
    "cudaStreamSynchronize": [P],
    "cudaStreamWaitEvent": [P, P, ctypes.c_uint],
    "cudaEventCreateWithFlags": [PP, ctypes.c_uint],
    "cudaEventDestroy": [P],
    "cudaEventRecord": [P, P],
    "cudaEventQuery": [P],
    "cudaEventElapsedTime": [ctypes.POINTER(ctypes.c_float), P, P],
    "cudaMalloc": [PP, SZ],
    "cudaFree": [P],
    "cudaMallocHost": [PP, SZ],
    "cudaFreeHost": [P],
    "cudaMemcpyAsync": [P, P, SZ, ctypes.c_int, P],
    "cudaMemcpyBatchAsync": [
        PP,
        PP,
        ctypes.POINTER(SZ),
        SZ,
        ctypes.POINTER(MemcpyAttributes),
        ctypes.POINTER(SZ),
        SZ,
        P,
        P,
    ],
    "cudaIpcGetMemHandle": [ctypes.POINTER(IpcHandle), P],
    "cudaIpcOpenMemHandle": [PP, IpcHandle, ctypes.c_uint],
    "cudaIpcCloseMemHandle": [P],
    "cudaLibraryLoadData": [PP, ctypes.c_char_p, P, P, ctypes.c_uint, P, P, ctypes.c_uint],
    "cudaLibraryGetKernel": [PP, P, ctypes.c_char_p],
    "cudaLibraryUnload": [P],
    "cudaLaunchKernel": [P, Dim3, Dim3, PP, SZ, P],
    "fake_cuda_inject": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
    "fake_cuda_calls": [ctypes.c_char_p],
    "fake_cuda_live": [ctypes.c_char_p],
}


@pytest.fixture
def cuda(fake_cuda, monkeypatch):
    for var in ("FAKE_CUDA_MAX_PTX_ISA", "FAKE_CUDA_VERSION", "FAKE_CUDA_NO_BATCH", "FAKE_CUDA_SM"):
        monkeypatch.delenv(var, raising=False)
    lib = ctypes.CDLL(fake_cuda)
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
    lib.fake_cuda_calls.restype = ctypes.c_long
    lib.fake_cuda_live.restype = ctypes.c_long
    lib.fake_cuda_kernel_bytes.restype = ctypes.c_long
    lib.fake_cuda_last_message.restype = ctypes.c_char_p
    lib.fake_cuda_reset()
    yield lib
    lib.fake_cuda_reset()


def malloc(cuda, n: int) -> int:
    p = P()
    assert cuda.cudaMalloc(ctypes.byref(p), n) == 0
    return p.value


def view(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


def stream(cuda) -> int:
    s = P()
    assert cuda.cudaStreamCreateWithFlags(ctypes.byref(s), 1) == 0
    return s.value


def load_kernel(cuda, ptx: bytes):
    lib, kern = P(), P()
    rc = cuda.cudaLibraryLoadData(ctypes.byref(lib), ptx, None, None, 0, None, None, 0)
    if rc != 0:
        return rc, None, None
    rc = cuda.cudaLibraryGetKernel(ctypes.byref(kern), lib, b"llmd_copy_runs")
    return rc, lib.value, kern.value


def shipped_ptx() -> bytes:
    with open(PTX, "rb") as f:
        return f.read()


class Launch:
    """Device tables for one launch of the copy kernel, and its argument array."""

    def __init__(self, cuda, pieces, pairs):
        self.cuda = cuda
        ptab = b"".join(struct.pack("<QQQ", *p) for p in pieces) or b"\0"
        qtab = b"".join(struct.pack("<QQ", *q) for q in pairs) or b"\0"
        self.ptab, self.qtab = malloc(cuda, len(ptab)), malloc(cuda, len(qtab))
        view(self.ptab, len(ptab))[:] = np.frombuffer(ptab, np.uint8)
        view(self.qtab, len(qtab))[:] = np.frombuffer(qtab, np.uint8)
        self.vals = [
            ctypes.c_uint64(self.ptab),
            ctypes.c_uint(len(pieces)),
            ctypes.c_uint64(self.qtab),
            ctypes.c_uint(len(pairs)),
        ]
        self.args = (P * 4)(*[ctypes.cast(ctypes.byref(v), P) for v in self.vals])

    def __call__(self, kern, grid, block=(256, 1, 1), s=None) -> int:
        return self.cuda.cudaLaunchKernel(kern, Dim3(*grid), Dim3(*block), self.args, 0, s)

    def free(self):
        self.cuda.cudaFree(self.ptab)
        self.cuda.cudaFree(self.qtab)


# --------------------------------------------------------------------------------------------
# copies
# --------------------------------------------------------------------------------------------
def test_copy_kinds_are_checked_against_the_pointers(cuda):
    d = malloc(cuda, 4096)
    h = np.zeros(4096, np.uint8)
    s = stream(cuda)
    assert cuda.cudaMemcpyAsync(d, h.ctypes.data, 16, 7, s) == INVALID_DIRECTION
    assert cuda.cudaMemcpyAsync(d, h.ctypes.data, 16, D2D, s) == INVALID_VALUE  # src is host
    assert b"pageable host" in cuda.fake_cuda_last_message()
    assert (
        cuda.cudaMemcpyAsync(d + 4090, h.ctypes.data, 16, H2D, s) == INVALID_VALUE
    )  # past the end
    assert cuda.cudaMemcpyAsync(d, h.ctypes.data, 0, H2D, s) == 0
    # pageable host memory: the copy has happened when the call returns, as the real runtime stages it
    h[:] = 7
    assert cuda.cudaMemcpyAsync(d, h.ctypes.data, 4096, H2D, s) == 0
    h[:] = 9
    assert cuda.cudaStreamSynchronize(s) == 0
    assert (view(d, 4096) == 7).all()
    assert cuda.cudaStreamDestroy(s) == 0
    assert cuda.cudaFree(d) == 0
    assert cuda.cudaFree(d) == INVALID_VALUE


def test_batch_copy_reports_the_failing_entry_with_the_12x_prototype(cuda):
    a, b = malloc(cuda, 1024), malloc(cuda, 1024)
    s = stream(cuda)
    dsts = (P * 2)(b, b + 1000)
    srcs = (P * 2)(a, a)
    sizes = (SZ * 2)(512, 512)  # the second leaves b's allocation
    attr = MemcpyAttributes(1, MemLocation(1, 0), MemLocation(1, 0), 0)
    idx = (SZ * 1)(0)
    fail = SZ(99)
    assert (
        cuda.cudaMemcpyBatchAsync(
            dsts, srcs, sizes, 2, ctypes.byref(attr), idx, 1, ctypes.cast(ctypes.byref(fail), P), s
        )
        == INVALID_VALUE
    )
    assert fail.value == 1
    assert (
        cuda.cudaMemcpyBatchAsync(
            dsts,
            srcs,
            sizes,
            2,
            ctypes.byref(attr),
            idx,
            1,
            ctypes.cast(ctypes.byref(fail), P),
            None,
        )
        == INVALID_VALUE
    )
    cuda.cudaStreamDestroy(s)


def test_stream_waits_for_an_event_recorded_on_another_stream(cuda):
    a, b, c = malloc(cuda, 1 << 20), malloc(cuda, 1 << 20), malloc(cuda, 1 << 20)
    view(a, 1 << 20)[:] = 1
    view(b, 1 << 20)[:] = 0
    s1, s2 = stream(cuda), stream(cuda)
    ev = P()
    assert cuda.cudaEventCreateWithFlags(ctypes.byref(ev), 2) == 0
    assert cuda.cudaEventQuery(ev) == 0  # never recorded: complete
    cuda.fake_cuda_set_copy_delay_us(200000)
    assert cuda.cudaMemcpyAsync(b, a, 1 << 20, D2D, s1) == 0
    assert cuda.cudaEventRecord(ev, s1) == 0
    assert cuda.cudaEventQuery(ev) == NOT_READY
    cuda.fake_cuda_set_copy_delay_us(0)
    assert cuda.cudaStreamWaitEvent(s2, ev, 0) == 0
    assert cuda.cudaMemcpyAsync(c, b, 1 << 20, D2D, s2) == 0
    assert cuda.cudaStreamSynchronize(s2) == 0
    assert (view(c, 1 << 20) == 1).all()  # copied after s1's copy landed
    assert cuda.cudaStreamWaitEvent(s2, ev, 1) == INVALID_VALUE
    ms = ctypes.c_float()
    assert cuda.cudaEventElapsedTime(ctypes.byref(ms), ev, ev) == INVALID_HANDLE  # timing disabled
    for h in (s1, s2):
        cuda.cudaStreamDestroy(h)
    cuda.cudaEventDestroy(ev)


# --------------------------------------------------------------------------------------------
# loading PTX and the copy kernel's semantics
# --------------------------------------------------------------------------------------------
def test_ptx_loading_refuses_what_a_driver_refuses(cuda, monkeypatch):
    ptx = shipped_ptx()
    rc, lib, kern = load_kernel(cuda, ptx)
    assert rc == 0 and kern
    missing = P()
    assert (
        cuda.cudaLibraryGetKernel(ctypes.byref(missing), lib, b"no_such_kernel") == SYMBOL_NOT_FOUND
    )
    assert cuda.cudaLibraryUnload(lib) == 0
    assert cuda.cudaLibraryUnload(lib) == INVALID_HANDLE
    # an older driver: the PTX ISA is too new
    monkeypatch.setenv("FAKE_CUDA_MAX_PTX_ISA", "7.8")
    assert load_kernel(cuda, ptx)[0] == UNSUPPORTED_PTX
    monkeypatch.delenv("FAKE_CUDA_MAX_PTX_ISA")
    assert load_kernel(cuda, b"not ptx at all")[0] == 218
    assert cuda.fake_cuda_live(b"library") == 0


def test_copy_kernel_semantics_follow_the_grid(cuda):
    rc, lib, kern = load_kernel(cuda, shipped_ptx())
    assert rc == 0
    n = 64 * 1024
    srcs = [malloc(cuda, n) for _ in range(5)]
    dsts = [malloc(cuda, n) for _ in range(5)]
    rng = np.random.default_rng(3)
    for a in srcs:
        view(a, n)[:] = rng.integers(0, 256, n, dtype=np.uint8)
    for a in dsts:
        view(a, n)[:] = 0
    pieces = [(0, 4096, 8192), (8192, 0, 3), (20000, 30001, 777)]  # unaligned ones included
    pairs = [(s, d) for s, d in zip(srcs, dsts)]
    go = Launch(cuda, pieces, pairs)
    s = stream(cuda)
    # grid.y smaller than the pairs: every pair is still copied (the y-stride loop)
    assert go(kern, (3, 2, 1), s=s) == 0
    assert cuda.cudaStreamSynchronize(s) == 0
    for sa, da in zip(srcs, dsts):
        sv, dv = view(sa, n), view(da, n)
        expect = np.zeros(n, np.uint8)
        for so, do, nb in pieces:
            expect[do : do + nb] = sv[so : so + nb]
        assert (dv == expect).all()
    assert cuda.fake_cuda_kernel_bytes() == 5 * sum(p[2] for p in pieces)
    # grid.x smaller than the pieces: only the first pieces move
    for a in dsts:
        view(a, n)[:] = 0
    assert go(kern, (1, 5, 1), s=s) == 0
    assert cuda.cudaStreamSynchronize(s) == 0
    assert (view(dsts[0], n)[4096 : 4096 + 8192] == view(srcs[0], n)[0:8192]).all()
    assert (view(dsts[0], n)[:3] == 0).all()
    go.free()
    cuda.cudaStreamDestroy(s)
    cuda.cudaLibraryUnload(lib)


def test_launch_arguments_are_checked_and_failures_are_injectable(cuda):
    rc, lib, kern = load_kernel(cuda, shipped_ptx())
    a, b = malloc(cuda, 4096), malloc(cuda, 4096)
    view(a, 4096)[:] = 5
    view(b, 4096)[:] = 0
    go = Launch(cuda, [(0, 0, 4096)], [(a, b)])
    s = stream(cuda)
    assert go(kern, (0, 1, 1), s=s) == INVALID_CONFIGURATION
    assert go(kern, (1, 70000, 1), s=s) == INVALID_CONFIGURATION
    assert go(kern, (1, 1, 1), block=(512, 1, 1), s=s) == OUT_OF_RESOURCES  # .maxntid 256
    assert go(a, (1, 1, 1), s=s) == INVALID_DEVICE_FUNCTION
    assert cuda.fake_cuda_inject(b"cudaLaunchKernel", 0, LAUNCH_FAILURE) == 0
    assert go(kern, (1, 1, 1), s=s) == LAUNCH_FAILURE
    assert cuda.cudaStreamSynchronize(s) == 0
    assert (view(b, 4096) == 0).all()  # nothing ran
    assert go(kern, (1, 1, 1), s=s) == 0
    assert cuda.cudaStreamSynchronize(s) == 0
    assert (view(b, 4096) == 5).all()
    assert cuda.fake_cuda_calls(b"cudaLaunchKernel") == 6
    go.free()
    cuda.cudaStreamDestroy(s)
    cuda.cudaLibraryUnload(lib)


def run_child(fake_cuda: str, script: str, stdin: str = "") -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import ctypes, sys, struct
        import numpy as np
        from tests.test_fake_cuda import *
        class _L: pass
        cuda = ctypes.CDLL({fake_cuda!r})
        for name, args in SIGNATURES.items():
            getattr(cuda, name).argtypes = args
    """)
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_a_kernel_touching_host_memory_is_a_sticky_illegal_address(fake_cuda):
    proc = run_child(
        fake_cuda,
        """
        rc, lib, kern = load_kernel(cuda, shipped_ptx())
        host = np.zeros(4096, np.uint8)
        a = malloc(cuda, 4096)
        go = Launch(cuda, [(0, 0, 4096)], [(a, host.ctypes.data)])
        s = stream(cuda)
        print(go(kern, (1, 1, 1), s=s), cuda.cudaStreamSynchronize(s), cuda.cudaMalloc(ctypes.byref(P()), 16))
    """,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["0", str(ILLEGAL_ADDRESS), str(ILLEGAL_ADDRESS)]


def test_ipc_handles_map_device_memory_across_processes(cuda, fake_cuda):
    n = 1 << 16
    exporter = run_child(
        fake_cuda,
        f"""
        a = malloc(cuda, {n})
        view(a, {n})[:] = np.arange({n}, dtype=np.uint32).view(np.uint8)[:{n}]
        h = IpcHandle()
        assert cuda.cudaIpcGetMemHandle(ctypes.byref(h), a + 100) == 0
        mine = P()
        print(cuda.cudaIpcOpenMemHandle(ctypes.byref(mine), h, 1), flush=True)  # own handle
        print(ctypes.string_at(ctypes.addressof(h), 64).hex(), flush=True)
        sys.stdin.readline()            # the importer wrote
        print(int(view(a, {n})[7]), flush=True)
    """,
    )
    try:
        own = exporter.stdout.readline().strip()
        assert own == str(DEVICE_UNINITIALIZED)
        handle = IpcHandle()
        raw = bytes.fromhex(exporter.stdout.readline().strip())
        ctypes.memmove(ctypes.addressof(handle), raw, 64)
        p = P()
        assert cuda.cudaIpcOpenMemHandle(ctypes.byref(p), handle, 0) == INVALID_VALUE  # flags
        assert cuda.cudaIpcOpenMemHandle(ctypes.byref(p), handle, 1) == 0
        mapped = view(p.value, n)  # the allocation's start
        assert (mapped == np.arange(n, dtype=np.uint32).view(np.uint8)[:n]).all()
        # the copy kernel writes into the mapped memory like into local device memory
        rc, lib, kern = load_kernel(cuda, shipped_ptx())
        src = malloc(cuda, 16)
        view(src, 16)[:] = 201
        go = Launch(cuda, [(0, 0, 16)], [(src, p.value)])
        s = stream(cuda)
        assert go(kern, (1, 1, 1), s=s) == 0
        assert cuda.cudaStreamSynchronize(s) == 0
        exporter.stdin.write("go\n")
        exporter.stdin.flush()
        assert exporter.stdout.readline().strip() == "201"
        assert cuda.cudaIpcCloseMemHandle(p) == 0
        assert cuda.cudaIpcCloseMemHandle(p) == INVALID_VALUE
        go.free()
        cuda.cudaStreamDestroy(s)
        cuda.cudaLibraryUnload(lib)
    finally:
        exporter.communicate(timeout=60)
