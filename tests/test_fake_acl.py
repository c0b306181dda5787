"""The fake ACL runtime (tests/fake_acl): builds it, loads it with ctypes and checks its rules.

The fake stands in for libascendcl.so on machines without an NPU; the ACL backend's tests rely
on it behaving like the real runtime and on it turning misuse into error codes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SH = os.path.join(HERE, "fake_acl", "build.sh")

H2H, H2D, D2H, D2D, DEFAULT = 0, 1, 2, 3, 4
LOC_HOST, LOC_DEVICE, LOC_UNREGISTERED = 0, 1, 2
EVENT_SYNC, EVENT_TIME_LINE = 0x1, 0x8
SIZE_MAX = 2**64 - 1 if ctypes.sizeof(ctypes.c_size_t) == 8 else 2**32 - 1

OK = 0
INVALID_PARAM = 100000
UNINITIALIZE = 100001
REPEAT_INIT = 100002
RT_PARAM_INVALID = 107000
CONTEXT_NULL = 107002
STREAM_CONTEXT = 107003
FEATURE_NOT_SUPPORT = 207000
NO_DEVICE = 207004
STREAM_SYNC_TIMEOUT = 507046
EVENT_SYNC_TIMEOUT = 507047
DEVICE_MEM_ERROR = 507053

P = ctypes.c_void_p
PP = ctypes.POINTER(ctypes.c_void_p)
SZ = ctypes.c_size_t
I32 = ctypes.c_int32
U32 = ctypes.c_uint32
U64 = ctypes.c_uint64
INT = ctypes.c_int


class MemLocation(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]


class BatchAttr(ctypes.Structure):
    _fields_ = [("dstLoc", MemLocation), ("srcLoc", MemLocation), ("rsv", ctypes.c_uint8 * 16)]


SIGNATURES = {
    "aclInit": [ctypes.c_char_p],
    "aclFinalize": [],
    "aclrtSetDevice": [I32],
    "aclrtResetDevice": [I32],
    "aclrtGetDevice": [ctypes.POINTER(I32)],
    "aclrtGetDeviceCount": [ctypes.POINTER(U32)],
    "aclrtGetCurrentContext": [PP],
    "aclrtSetCurrentContext": [P],
    "aclrtCreateStream": [PP],
    "aclrtCreateStreamWithConfig": [PP, U32, U32],
    "aclrtDestroyStream": [P],
    "aclrtSynchronizeStream": [P],
    "aclrtSynchronizeStreamWithTimeout": [P, I32],
    "aclrtStreamWaitEvent": [P, P],
    "aclrtSetStreamFailureMode": [P, U64],
    "aclrtCreateEvent": [PP],
    "aclrtCreateEventWithFlag": [PP, U32],
    "aclrtCreateEventExWithFlag": [PP, U32],
    "aclrtDestroyEvent": [P],
    "aclrtRecordEvent": [P, P],
    "aclrtQueryEventStatus": [P, ctypes.POINTER(INT)],
    "aclrtSynchronizeEvent": [P],
    "aclrtSynchronizeEventWithTimeout": [P, I32],
    "aclrtEventElapsedTime": [ctypes.POINTER(ctypes.c_float), P, P],
    "aclrtMalloc": [PP, SZ, INT],
    "aclrtFree": [P],
    "aclrtMallocHost": [PP, SZ],
    "aclrtFreeHost": [P],
    "aclrtGetMemInfo": [INT, ctypes.POINTER(SZ), ctypes.POINTER(SZ)],
    "aclrtMemcpy": [P, SZ, P, SZ, INT],
    "aclrtMemcpyAsync": [P, SZ, P, SZ, INT, P],
    "aclrtMemcpy2dAsync": [P, SZ, P, SZ, SZ, SZ, INT, P],
    "aclrtMemcpyBatchAsync": [
        PP,
        ctypes.POINTER(SZ),
        PP,
        ctypes.POINTER(SZ),
        SZ,
        ctypes.POINTER(BatchAttr),
        ctypes.POINTER(SZ),
        SZ,
        ctypes.POINTER(SZ),
        P,
    ],
    "aclrtIpcMemGetExportKey": [P, SZ, ctypes.c_char_p, SZ, U64],
    "aclrtIpcMemSetImportPid": [ctypes.c_char_p, ctypes.POINTER(I32), SZ],
    "aclrtIpcMemImportByKey": [PP, ctypes.c_char_p, U64],
    "aclrtIpcMemClose": [ctypes.c_char_p],
    "aclrtDeviceGetBareTgid": [ctypes.POINTER(I32)],
    "aclrtGetVersion": [ctypes.POINTER(I32)] * 3,
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake_acl")
    res = subprocess.run(["sh", BUILD_SH, str(out)], capture_output=True, text=True, check=True)
    path = res.stdout.strip().splitlines()[-1]
    assert path == str(out / "libascendcl.so") and os.path.exists(path)
    so = ctypes.CDLL(path)
    for name, args in SIGNATURES.items():
        fn = getattr(so, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    so.aclGetRecentErrMsg.argtypes = []
    so.aclGetRecentErrMsg.restype = ctypes.c_char_p
    so.fake_acl_inject.argtypes = [ctypes.c_char_p, INT, INT]
    so.fake_acl_inject.restype = INT
    so.fake_acl_calls.argtypes = [ctypes.c_char_p]
    so.fake_acl_calls.restype = ctypes.c_long
    so.fake_acl_reset.argtypes = []
    so.fake_acl_reset.restype = None
    so.fake_acl_set_batch_supported.argtypes = [INT]
    so.fake_acl_set_batch_supported.restype = None
    so.fake_acl_set_copy_delay_us.argtypes = [ctypes.c_long]
    so.fake_acl_set_copy_delay_us.restype = None
    so.fake_acl_live.argtypes = [ctypes.c_char_p]
    so.fake_acl_live.restype = ctypes.c_long

    # before aclInit: no device can be set
    assert run_in_thread(lambda: so.aclrtSetDevice(0)) == UNINITIALIZE
    assert so.aclInit(None) == OK
    assert so.aclrtSetDevice(0) == OK  # the main thread, for every test
    return so


@pytest.fixture
def acl(lib, monkeypatch):
    for var in ("FAKE_ACL_DEVICE_COUNT", "FAKE_ACL_NO_BATCH", "FAKE_ACL_COPY_DELAY_US"):
        monkeypatch.delenv(var, raising=False)
    lib.fake_acl_reset()
    assert lib.aclrtSetDevice(0) == OK
    yield lib
    lib.fake_acl_reset()
    assert lib.fake_acl_live(b"pending") == 0


def run_in_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join(10)
    assert box, "thread did not finish"
    return box[0]


def errmsg(acl) -> str:
    m = acl.aclGetRecentErrMsg()
    return m.decode() if m else ""


def malloc(acl, n):
    p = ctypes.c_void_p()
    assert acl.aclrtMalloc(ctypes.byref(p), n, 0) == OK, errmsg(acl)
    return p.value


def malloc_host(acl, n):
    p = ctypes.c_void_p()
    assert acl.aclrtMallocHost(ctypes.byref(p), n) == OK, errmsg(acl)
    return p.value


def stream(acl):
    s = ctypes.c_void_p()
    assert acl.aclrtCreateStream(ctypes.byref(s)) == OK, errmsg(acl)
    return s.value


def event(acl, flag=None, ex=False):
    e = ctypes.c_void_p()
    if flag is None:
        rc = acl.aclrtCreateEvent(ctypes.byref(e))
    elif ex:
        rc = acl.aclrtCreateEventExWithFlag(ctypes.byref(e), flag)
    else:
        rc = acl.aclrtCreateEventWithFlag(ctypes.byref(e), flag)
    assert rc == OK, errmsg(acl)
    return e.value


def query(acl, e):
    st = ctypes.c_int(-1)
    assert acl.aclrtQueryEventStatus(e, ctypes.byref(st)) == OK
    return st.value


def fill(addr, data: bytes):
    ctypes.memmove(addr, data, len(data))


def read(addr, n) -> bytes:
    return ctypes.string_at(addr, n)


# ------------------------------------------------------------------------------------------
def test_init_version_devices(acl):
    assert acl.aclInit(None) == REPEAT_INIT
    v = [I32() for _ in range(3)]
    assert acl.aclrtGetVersion(*[ctypes.byref(x) for x in v]) == OK
    assert [x.value for x in v] == [1, 15, 0]
    n = U32()
    assert acl.aclrtGetDeviceCount(ctypes.byref(n)) == OK and n.value == 1
    d = I32(-1)
    assert acl.aclrtGetDevice(ctypes.byref(d)) == OK and d.value == 0
    pid = I32()
    assert acl.aclrtDeviceGetBareTgid(ctypes.byref(pid)) == OK and pid.value == os.getpid()
    free, total = SZ(), SZ()
    assert acl.aclrtGetMemInfo(1, ctypes.byref(free), ctypes.byref(total)) == OK
    assert 0 < free.value <= total.value


def test_device_count_zero(acl, monkeypatch):
    monkeypatch.setenv("FAKE_ACL_DEVICE_COUNT", "0")
    n = U32(7)
    assert acl.aclrtGetDeviceCount(ctypes.byref(n)) == OK and n.value == 0
    assert run_in_thread(lambda: acl.aclrtSetDevice(0)) == NO_DEVICE


def test_thread_without_device(acl):
    def worker():
        out = {}
        p, s = ctypes.c_void_p(), ctypes.c_void_p()
        d = I32()
        out["msg0"] = acl.aclGetRecentErrMsg()
        out["malloc"] = acl.aclrtMalloc(ctypes.byref(p), 64, 0)
        out["msg"] = errmsg(acl)
        out["stream"] = acl.aclrtCreateStream(ctypes.byref(s))
        out["event"] = acl.aclrtCreateEvent(ctypes.byref(s))
        out["getdev"] = acl.aclrtGetDevice(ctypes.byref(d))
        out["copy"] = acl.aclrtMemcpy(ctypes.byref(d), 4, ctypes.byref(d), 4, H2H)
        out["sync"] = acl.aclrtSynchronizeStream(None)
        out["setctx"] = acl.aclrtSetCurrentContext(ctx)
        out["malloc2"] = acl.aclrtMalloc(ctypes.byref(p), 64, 0)
        out["free"] = acl.aclrtFree(p)
        return out

    ctx = ctypes.c_void_p()
    assert acl.aclrtGetCurrentContext(ctypes.byref(ctx)) == OK and ctx.value
    out = run_in_thread(worker)
    assert out["msg0"] is None
    for k in ("malloc", "stream", "event", "getdev", "copy", "sync"):
        assert out[k] == CONTEXT_NULL, k
    assert "aclrtSetDevice" in out["msg"]
    assert out["setctx"] == OK and out["malloc2"] == OK and out["free"] == OK


def test_finalize_and_reinit(acl):
    assert acl.aclFinalize() == OK
    p = ctypes.c_void_p()
    assert acl.aclrtMalloc(ctypes.byref(p), 64, 0) == CONTEXT_NULL  # the device went with it
    assert acl.aclrtSetDevice(0) == UNINITIALIZE
    assert acl.aclInit(None) == OK
    assert acl.aclrtSetDevice(0) == OK


def test_memory_rules(acl):
    d = malloc(acl, 1000)
    assert d % 64 == 0
    p = ctypes.c_void_p()
    assert acl.aclrtMalloc(ctypes.byref(p), 0, 0) == INVALID_PARAM
    assert acl.aclrtFree(d + 64) == RT_PARAM_INVALID  # not the start
    buf = ctypes.create_string_buffer(64)
    assert acl.aclrtFree(ctypes.addressof(buf)) == RT_PARAM_INVALID  # unknown
    assert acl.aclrtFreeHost(d) == RT_PARAM_INVALID  # device memory
    h = malloc_host(acl, 256)
    assert acl.aclrtFree(h) == RT_PARAM_INVALID  # page-locked host memory
    assert acl.fake_acl_live(b"device") >= 1 and acl.fake_acl_live(b"host") >= 1
    assert acl.aclrtFreeHost(h) == OK
    assert acl.aclrtFree(d) == OK
    assert acl.aclrtFree(d) == RT_PARAM_INVALID


def test_copy_rules(acl):
    s = stream(acl)
    d = malloc(acl, 4096)
    h = malloc_host(acl, 4096)
    h2 = malloc_host(acl, 4096)
    pageable = ctypes.create_string_buffer(4096)
    pg = ctypes.addressof(pageable)

    assert acl.aclrtMemcpyAsync(d, 100, h, 101, H2D, s) == RT_PARAM_INVALID
    assert "destMax" in errmsg(acl)
    assert acl.aclrtMemcpy(d, 100, h, 101, H2D) == RT_PARAM_INVALID
    assert acl.aclrtMemcpyAsync(None, 100, h, 10, H2D, s) == INVALID_PARAM
    assert acl.aclrtMemcpyAsync(d, 100, None, 10, H2D, s) == INVALID_PARAM
    assert acl.aclrtMemcpyAsync(d, 0, h, 0, H2D, s) == OK
    assert acl.aclrtMemcpyAsync(h2, 64, h, 64, H2H, s) == FEATURE_NOT_SUPPORT
    assert acl.aclrtMemcpyAsync(h2, 64, h, 64, DEFAULT, s) == FEATURE_NOT_SUPPORT
    assert acl.aclrtMemcpyAsync(d, 64, pg, 64, H2D, s) == RT_PARAM_INVALID
    assert "pageable host memory in async copy" in errmsg(acl)
    assert acl.aclrtMemcpyAsync(pg, 64, d, 64, D2H, s) == RT_PARAM_INVALID
    assert acl.aclrtMemcpyAsync(pg, 64, d, 64, DEFAULT, s) == RT_PARAM_INVALID
    # kinds must match the pointers
    assert acl.aclrtMemcpyAsync(h2, 64, h, 64, H2D, s) == RT_PARAM_INVALID
    assert acl.aclrtMemcpyAsync(d, 64, h, 64, D2H, s) == RT_PARAM_INVALID
    assert acl.aclrtMemcpyAsync(d, 64, h, 64, D2D, s) == RT_PARAM_INVALID
    assert acl.aclrtMemcpyAsync(d, 64, h, 64, 9, s) == INVALID_PARAM
    # device ranges stay inside one allocation
    assert acl.aclrtMemcpyAsync(d + 4032, 128, h, 128, H2D, s) == DEVICE_MEM_ERROR
    assert acl.aclrtMemcpyAsync(h, 4096, d + 64, 4096, D2H, s) == DEVICE_MEM_ERROR
    assert acl.aclrtMemcpyAsync(h + 4032, 128, d, 128, D2H, s) == RT_PARAM_INVALID  # pinned end
    assert acl.fake_acl_live(b"pending") == 0  # nothing was queued

    # synchronous copies allow H2H and pageable memory
    fill(pg, b"x" * 64)
    assert acl.aclrtMemcpy(h, 64, pg, 64, H2H) == OK
    assert acl.aclrtMemcpy(d, 64, pg, 64, H2D) == OK
    assert acl.aclrtMemcpy(pg + 64, 64, d, 64, DEFAULT) == OK
    assert read(pg + 64, 64) == b"x" * 64 and read(h, 64) == b"x" * 64
    assert acl.aclrtMemcpy(d + 4000, 200, pg, 200, H2D) == DEVICE_MEM_ERROR

    # NULL = the current device's default stream; DEFAULT infers D2D
    d2 = malloc(acl, 4096)
    assert acl.aclrtMemcpyAsync(d2, 64, d, 64, DEFAULT, None) == OK
    assert acl.aclrtMemcpyAsync(h2, 64, d2, 64, D2H, None) == OK
    assert acl.aclrtSynchronizeStream(None) == OK
    assert read(h2, 64) == b"x" * 64
    assert acl.aclrtFree(d2) == OK

    assert acl.aclrtSynchronizeStream(s) == OK
    assert acl.aclrtDestroyStream(s) == OK
    assert acl.aclrtDestroyStream(s) == RT_PARAM_INVALID
    for x in (h, h2):
        assert acl.aclrtFreeHost(x) == OK
    assert acl.aclrtFree(d) == OK


def test_stream_order_and_events(acl):
    n = 1 << 16
    s = stream(acl)
    a, b = malloc(acl, n), malloc(acl, n)
    src, dst = malloc_host(acl, n), malloc_host(acl, n)
    data = os.urandom(n)
    fill(src, data)
    e_never = event(acl)
    assert query(acl, e_never) == 1  # never recorded counts as complete

    acl.fake_acl_set_copy_delay_us(5000)
    e0, e1 = event(acl), event(acl)
    assert acl.aclrtRecordEvent(e0, s) == OK
    assert acl.aclrtMemcpyAsync(a, n, src, n, H2D, s) == OK
    assert acl.aclrtMemcpyAsync(b, n, a, n, D2D, s) == OK
    assert acl.aclrtMemcpyAsync(dst, n, b, n, D2H, s) == OK
    assert acl.aclrtRecordEvent(e1, s) == OK
    assert query(acl, e1) == 0  # NOT_READY: 15 ms of copies are queued before it
    assert acl.aclrtSynchronizeEvent(e1) == OK
    assert query(acl, e1) == 1 and query(acl, e0) == 1
    assert read(dst, n) == data
    ms = ctypes.c_float(-1)
    assert acl.aclrtEventElapsedTime(ctypes.byref(ms), e0, e1) == OK
    assert ms.value >= 10.0

    # a second stream waits for an event of the first: without the wait it would read stale data
    s2 = stream(acl)
    data2 = os.urandom(n)
    fill(src, data2)
    assert acl.aclrtMemcpyAsync(a, n, src, n, H2D, s) == OK
    assert acl.aclrtRecordEvent(e1, s) == OK
    assert acl.aclrtStreamWaitEvent(s2, e1) == OK
    assert acl.aclrtMemcpyAsync(dst, n, a, n, D2H, s2) == OK
    assert acl.aclrtSynchronizeStream(s2) == OK
    assert read(dst, n) == data2

    # memory used by queued copies cannot be freed, a busy stream cannot be destroyed
    assert acl.aclrtMemcpyAsync(a, n, src, n, H2D, s) == OK
    assert acl.aclrtFreeHost(src) == RT_PARAM_INVALID and "queued" in errmsg(acl)
    assert acl.aclrtDestroyStream(s) == RT_PARAM_INVALID and "synchronize" in errmsg(acl)
    assert acl.aclrtSynchronizeStream(s) == OK
    acl.fake_acl_set_copy_delay_us(-1)

    for e in (e_never, e0, e1):
        assert acl.aclrtDestroyEvent(e) == OK
    for x in (s, s2):
        assert acl.aclrtDestroyStream(x) == OK
    for x in (a, b):
        assert acl.aclrtFree(x) == OK
    for x in (src, dst):
        assert acl.aclrtFreeHost(x) == OK


def test_event_flags(acl):
    s = stream(acl)
    for e in (event(acl, EVENT_TIME_LINE), event(acl, 0, ex=True)):
        assert acl.aclrtRecordEvent(e, s) == OK
        assert acl.aclrtStreamWaitEvent(s, e) == RT_PARAM_INVALID
        assert "ACL_EVENT_SYNC" in errmsg(acl)
        assert acl.aclrtSynchronizeEvent(e) == OK
        assert acl.aclrtDestroyEvent(e) == OK
    for e in (event(acl, EVENT_SYNC), event(acl, EVENT_SYNC, ex=True), event(acl)):
        assert acl.aclrtRecordEvent(e, s) == OK
        assert acl.aclrtStreamWaitEvent(s, e) == OK
        assert acl.aclrtSynchronizeStream(s) == OK
        assert acl.aclrtDestroyEvent(e) == OK
    assert acl.aclrtDestroyStream(s) == OK


def test_timeouts(acl):
    s = stream(acl)
    d, h = malloc(acl, 64), malloc_host(acl, 64)
    e = event(acl)
    acl.fake_acl_set_copy_delay_us(150_000)
    assert acl.aclrtMemcpyAsync(d, 64, h, 64, H2D, s) == OK
    assert acl.aclrtRecordEvent(e, s) == OK
    assert acl.aclrtSynchronizeStreamWithTimeout(s, 10) == STREAM_SYNC_TIMEOUT
    assert acl.aclrtSynchronizeEventWithTimeout(e, 10) == EVENT_SYNC_TIMEOUT
    assert acl.aclrtSynchronizeEventWithTimeout(e, -1) == OK
    assert acl.aclrtSynchronizeStreamWithTimeout(s, 5000) == OK
    acl.fake_acl_set_copy_delay_us(-1)
    assert acl.aclrtDestroyEvent(e) == OK
    assert acl.aclrtDestroyStream(s) == OK
    assert acl.aclrtFree(d) == OK and acl.aclrtFreeHost(h) == OK


def test_stream_of_other_device(acl, monkeypatch):
    monkeypatch.setenv("FAKE_ACL_DEVICE_COUNT", "2")
    s0 = stream(acl)
    d0, h = malloc(acl, 64), malloc_host(acl, 64)
    e0 = event(acl)

    def on_device_1():
        assert acl.aclrtSetDevice(1) == OK
        d1 = malloc(acl, 64)
        out = [
            acl.aclrtMemcpyAsync(h, 64, d1, 64, D2H, s0),
            acl.aclrtRecordEvent(e0, s0),
            acl.aclrtSynchronizeStream(s0),
            acl.aclrtMemcpy(d1, 64, d0, 64, D2D),
        ]  # device 0 memory from device 1
        assert acl.aclrtFree(d1) == OK
        return out

    assert run_in_thread(on_device_1) == [
        STREAM_CONTEXT,
        STREAM_CONTEXT,
        STREAM_CONTEXT,
        RT_PARAM_INVALID,
    ]
    assert acl.aclrtSetDevice(5) == INVALID_PARAM
    assert acl.aclrtDestroyEvent(e0) == OK
    assert acl.aclrtDestroyStream(s0) == OK
    assert acl.aclrtFree(d0) == OK and acl.aclrtFreeHost(h) == OK


def _batch(acl, dsts, dmax, srcs, sizes, attrs, idxs, s):
    n = len(dsts)
    fi = SZ(12345)
    rc = acl.aclrtMemcpyBatchAsync(
        (ctypes.c_void_p * n)(*dsts),
        (SZ * n)(*dmax),
        (ctypes.c_void_p * n)(*srcs),
        (SZ * n)(*sizes),
        n,
        (BatchAttr * len(attrs))(*attrs),
        (SZ * len(idxs))(*idxs),
        len(attrs),
        ctypes.byref(fi),
        s,
    )
    return rc, fi.value


def _attr(dst_type, src_type):
    return BatchAttr(MemLocation(0, dst_type), MemLocation(0, src_type))


def test_batch_copy(acl, monkeypatch):
    s = stream(acl)
    d = malloc(acl, 4096)
    h, out = malloc_host(acl, 4096), malloc_host(acl, 4096)
    data = os.urandom(3 * 512)
    fill(h, data)
    ctypes.memset(out, 0, 4096)
    h2d, d2h = _attr(LOC_DEVICE, LOC_HOST), _attr(LOC_HOST, LOC_DEVICE)

    # entry 1 is bad: nothing of the batch is queued
    rc, fi = _batch(
        acl,
        [d, d + 512, d + 1024],
        [512, 100, 512],
        [h, h + 512, h + 1024],
        [512, 512, 512],
        [h2d],
        [0],
        s,
    )
    assert (rc, fi) == (RT_PARAM_INVALID, 1)
    pageable = ctypes.create_string_buffer(512)
    rc, fi = _batch(
        acl, [d, d + 512], [512, 512], [h, ctypes.addressof(pageable)], [512, 512], [h2d], [0], s
    )
    assert (rc, fi) == (RT_PARAM_INVALID, 1) and "pageable" in errmsg(acl)
    rc, fi = _batch(acl, [out], [512], [h], [512], [_attr(LOC_HOST, LOC_HOST)], [0], s)
    assert (rc, fi) == (FEATURE_NOT_SUPPORT, 0)
    rc, fi = _batch(acl, [d], [512], [h], [512], [d2h], [0], s)  # attrs contradict pointers
    assert (rc, fi) == (RT_PARAM_INVALID, 0)
    assert acl.fake_acl_live(b"pending") == 0

    rc, fi = _batch(
        acl,
        [d, d + 512, d + 1024, out, out + 512, out + 1024],
        [512] * 6,
        [h, h + 512, h + 1024, d, d + 512, d + 1024],
        [512] * 6,
        [h2d, d2h],
        [0, 3],
        s,
    )
    assert (rc, fi) == (OK, SIZE_MAX), errmsg(acl)
    assert acl.aclrtSynchronizeStream(s) == OK
    assert read(out, 3 * 512) == data

    acl.fake_acl_set_batch_supported(0)
    assert _batch(acl, [d], [512], [h], [512], [h2d], [0], s) == (FEATURE_NOT_SUPPORT, SIZE_MAX)
    acl.fake_acl_reset()
    monkeypatch.setenv("FAKE_ACL_NO_BATCH", "1")
    assert _batch(acl, [d], [512], [h], [512], [h2d], [0], s)[0] == FEATURE_NOT_SUPPORT
    monkeypatch.delenv("FAKE_ACL_NO_BATCH")
    assert _batch(acl, [d], [512], [h], [512], [h2d], [0], s)[0] == OK
    assert acl.aclrtSynchronizeStream(s) == OK

    assert acl.aclrtDestroyStream(s) == OK
    assert acl.aclrtFree(d) == OK
    assert acl.aclrtFreeHost(h) == OK and acl.aclrtFreeHost(out) == OK


def test_2d_copy(acl):
    s = stream(acl)
    rows, width, spitch, dpitch = 4, 16, 32, 64
    h = malloc_host(acl, rows * spitch)
    d = malloc(acl, rows * dpitch)
    data = bytes(range(rows * spitch))
    fill(h, data)
    assert acl.aclrtMemcpy2dAsync(d, dpitch, h, spitch, width, rows, H2D, s) == OK
    assert acl.aclrtMemcpy2dAsync(d, 8, h, spitch, width, rows, H2D, s) == INVALID_PARAM
    assert acl.aclrtMemcpy2dAsync(d, dpitch, h, spitch, width, rows + 1, H2D, s) == DEVICE_MEM_ERROR
    assert acl.aclrtMemcpy2dAsync(h, dpitch, h, spitch, width, 1, H2H, s) == FEATURE_NOT_SUPPORT
    assert acl.aclrtSynchronizeStream(s) == OK
    got = read(d, rows * dpitch)
    for r in range(rows):
        assert got[r * dpitch : r * dpitch + width] == data[r * spitch : r * spitch + width]
    assert acl.aclrtDestroyStream(s) == OK
    assert acl.aclrtFree(d) == OK and acl.aclrtFreeHost(h) == OK


def test_injection_and_counters(acl):
    s = stream(acl)
    d, h = malloc(acl, 64), malloc_host(acl, 64)
    assert acl.fake_acl_calls(b"aclrtMemcpyAsync") == 0
    assert acl.fake_acl_calls(b"aclrtMalloc") == 1
    assert acl.fake_acl_calls(b"noSuchApi") == -1
    assert acl.fake_acl_inject(b"noSuchApi", 0, 1) == -1

    assert acl.fake_acl_inject(b"aclrtMemcpyAsync", 1, DEVICE_MEM_ERROR) == 0
    rcs = [acl.aclrtMemcpyAsync(d, 64, h, 64, H2D, s) for _ in range(3)]
    assert rcs == [OK, DEVICE_MEM_ERROR, OK]
    assert "injected" in errmsg(acl)  # successful calls leave the last message in place
    assert acl.fake_acl_calls(b"aclrtMemcpyAsync") >= 3

    acl.fake_acl_set_copy_delay_us(20_000)
    assert acl.aclrtMemcpyAsync(d, 64, h, 64, H2D, s) == OK
    assert acl.fake_acl_inject(b"aclrtSynchronizeStream", 0, 507899) == 0
    assert acl.aclrtSynchronizeStream(s) == 507899
    assert acl.fake_acl_live(b"pending") == 0  # the failing sync still drained the stream
    assert acl.aclrtSynchronizeStream(s) == OK

    assert acl.fake_acl_inject(b"aclrtMemcpyBatchAsync", 0, FEATURE_NOT_SUPPORT) == 0
    acl.fake_acl_reset()  # clears pending injections, counters and the copy delay
    assert acl.fake_acl_calls(b"aclrtSynchronizeStream") == 0
    assert _batch(acl, [d], [64], [h], [64], [_attr(LOC_DEVICE, LOC_HOST)], [0], s)[0] == OK
    assert acl.fake_acl_calls(b"aclrtMemcpyBatchAsync") == 1
    assert acl.aclrtSynchronizeStream(s) == OK

    assert acl.aclrtDestroyStream(s) == OK
    assert acl.aclrtFree(d) == OK and acl.aclrtFreeHost(h) == OK


def test_ipc_same_process(acl):
    n = 8192
    d = malloc(acl, n)
    key = ctypes.create_string_buffer(65)
    assert acl.aclrtIpcMemGetExportKey(d + 64, n - 64, key, 65, 0) != OK  # not page aligned
    assert acl.aclrtIpcMemGetExportKey(d, n, key, 64, 0) == INVALID_PARAM  # buffer too small
    assert acl.aclrtIpcMemGetExportKey(d, n, key, 65, 0) == OK
    p = ctypes.c_void_p()
    assert acl.aclrtIpcMemImportByKey(ctypes.byref(p), key.value, 0) == RT_PARAM_INVALID
    pid = I32()
    assert acl.aclrtDeviceGetBareTgid(ctypes.byref(pid)) == OK
    assert acl.aclrtIpcMemSetImportPid(key.value, ctypes.byref(pid), 1) == OK
    assert acl.aclrtIpcMemImportByKey(ctypes.byref(p), key.value, 1) == OK
    assert p.value and p.value != d
    data = os.urandom(n)
    assert acl.aclrtMemcpy(d, n, data, n, H2D) == OK
    back = ctypes.create_string_buffer(n)
    assert acl.aclrtMemcpy(back, n, p.value, n, D2H) == OK
    assert back.raw == data
    for foreign in (b"fakeacl-%d-1" % (os.getpid() + 1), b"fakeacl-1-1-3-4", b"nonsense"):
        assert acl.aclrtIpcMemImportByKey(ctypes.byref(p), foreign, 0) == RT_PARAM_INVALID
        assert "unknown or closed IPC key" in errmsg(acl)
    assert acl.aclrtIpcMemSetImportPid(b"nonsense", ctypes.byref(pid), 1) == RT_PARAM_INVALID
    assert acl.aclrtFree(d) == RT_PARAM_INVALID and "exported" in errmsg(acl)
    assert acl.fake_acl_live(b"ipc_import") == 1
    assert acl.aclrtIpcMemClose(key.value) == OK  # the importer
    assert acl.aclrtIpcMemClose(key.value) == OK  # the exporter
    assert acl.aclrtIpcMemClose(key.value) == RT_PARAM_INVALID
    assert acl.aclrtFree(d) == OK


# ------------------------------------------------------------------------------------------
# IPC across processes: a child process (a fresh interpreter loading the same library) imports
# keys of this process, or exports keys that this process imports.
IPC_CHILD = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
P, PP, SZ = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t
for name, args in {"aclInit": [ctypes.c_char_p], "aclrtSetDevice": [ctypes.c_int32],
                   "aclrtIpcMemImportByKey": [PP, ctypes.c_char_p, ctypes.c_uint64],
                   "aclrtIpcMemClose": [ctypes.c_char_p], "aclrtMalloc": [PP, SZ, ctypes.c_int],
                   "aclrtMemcpy": [P, SZ, P, SZ, ctypes.c_int],
                   "aclrtIpcMemGetExportKey": [P, SZ, ctypes.c_char_p, SZ, ctypes.c_uint64],
                   }.items():
    getattr(lib, name).argtypes = args
lib.aclGetRecentErrMsg.restype = ctypes.c_char_p
lib.fake_acl_live.argtypes = [ctypes.c_char_p]
lib.fake_acl_live.restype = ctypes.c_long
assert lib.aclInit(None) == 0 and lib.aclrtSetDevice(0) == 0
def say(*words):
    print(*words, flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "import":
        p = P()
        rc = lib.aclrtIpcMemImportByKey(ctypes.byref(p), args[0].encode(), int(args[1]))
        say(rc, p.value or 0)
    elif cmd == "read":           # addr n -> hex, through a D2H copy
        n = int(args[1]); buf = ctypes.create_string_buffer(n)
        rc = lib.aclrtMemcpy(buf, n, int(args[0]), n, 2)
        say(rc, buf.raw.hex())
    elif cmd == "write":          # addr hex, through an H2D copy
        data = bytes.fromhex(args[1])
        say(lib.aclrtMemcpy(int(args[0]), len(data), data, len(data), 1))
    elif cmd == "export":         # n byte -> a device buffer full of byte, exported with flag 1
        n = int(args[0]); p = P(); key = ctypes.create_string_buffer(65)
        assert lib.aclrtMalloc(ctypes.byref(p), n, 0) == 0
        lib.aclrtMemcpy(p.value, n, bytes([int(args[1])]) * n, n, 1)
        say(lib.aclrtIpcMemGetExportKey(p.value, n, key, 65, 1), key.value.decode())
    elif cmd == "close":
        say(lib.aclrtIpcMemClose(args[0].encode()))
    elif cmd == "live":
        say(lib.fake_acl_live(args[0].encode()))
    elif cmd == "msg":
        m = lib.aclGetRecentErrMsg()
        say((m or b"").decode().replace(" ", "_"))
"""


class IpcChild:
    """A process of its own that loads the fake and obeys one-line commands."""

    def __init__(self, lib_path: str) -> None:
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-c", IPC_CHILD, lib_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def ask(self, *words):
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        assert line, f"the IPC child died (rc {self.proc.poll()})"
        return [int(x) if x.lstrip("-").isdigit() else x for x in line]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


@pytest.fixture
def child(lib):
    children = []

    def spawn():
        c = IpcChild(lib._name)
        children.append(c)
        return c

    yield spawn
    for c in children:
        c.kill()


def test_ipc_across_processes(acl, child):
    n = 3 * 4096 + 100
    d = malloc(acl, n)
    data = os.urandom(n)
    assert acl.aclrtMemcpy(d, n, data, n, H2D) == OK
    key = ctypes.create_string_buffer(65)
    assert acl.aclrtIpcMemGetExportKey(d, n, key, 65, 0) == OK
    assert key.value.startswith(b"fakeacl-%d-" % os.getpid())
    k = key.value.decode()
    c = child()

    # not whitelisted yet: refused
    rc, ptr = c.ask("import", k, 1)
    assert rc == RT_PARAM_INVALID and ptr == 0
    assert "not_whitelisted" in c.ask("msg")[0]
    pid = I32(c.pid)
    assert acl.aclrtIpcMemSetImportPid(key.value, ctypes.byref(pid), 1) == OK
    assert acl.aclrtIpcMemSetImportPid(key.value, ctypes.byref(pid), 1) == OK  # listed once

    # imported: the child sees the bytes, and what it writes lands here
    rc, ptr = c.ask("import", k, 1)
    assert rc == OK and ptr
    rc, got = c.ask("read", ptr, n)
    assert rc == OK and bytes.fromhex(got) == data
    patch = os.urandom(300)
    assert c.ask("write", ptr + 4000, patch.hex()) == [OK]
    back = ctypes.create_string_buffer(n)
    assert acl.aclrtMemcpy(back, n, d, n, D2H) == OK
    assert back.raw == data[:4000] + patch + data[4300:]
    assert c.ask("read", ptr + n - 10, 20)[0] == DEVICE_MEM_ERROR  # the import is n bytes
    assert c.ask("live", "ipc_import") == [1] and acl.fake_acl_live(b"ipc_import") == 0

    # close order: the exporter cannot close (nor free) while the importer holds it
    assert acl.aclrtIpcMemClose(key.value) == RT_PARAM_INVALID
    assert "importers close first" in errmsg(acl) and str(c.pid) in errmsg(acl)
    assert acl.aclrtFree(d) == RT_PARAM_INVALID and "exported" in errmsg(acl)
    assert c.ask("close", k) == [OK]
    assert c.ask("close", k) == [RT_PARAM_INVALID]
    assert acl.aclrtIpcMemClose(key.value) == OK
    assert c.ask("import", k, 1)[0] == RT_PARAM_INVALID  # closed by its exporter
    assert "unknown_or_closed" in c.ask("msg")[0]

    # export flag 1: no pid check; an importer killed without closing does not block the close
    assert acl.aclrtIpcMemGetExportKey(d, 4096, key, 65, 1) == OK
    c2 = child()
    rc, ptr = c2.ask("import", key.value.decode(), 0)
    assert rc == OK
    assert bytes.fromhex(c2.ask("read", ptr, 4096)[1]) == back.raw[:4096]
    assert acl.aclrtIpcMemClose(key.value) == RT_PARAM_INVALID
    c2.kill()
    assert acl.aclrtIpcMemClose(key.value) == OK
    assert acl.aclrtFree(d) == OK
    c.close()


def test_ipc_import_outlives_a_killed_exporter(acl, child):
    """Keys of another process: imported memory stays readable here after the exporter died,
    and closing it still works; a key of a gone exporter cannot be imported."""
    c = child()
    rc, k = c.ask("export", 8192, 0x5A)
    assert rc == OK
    p = ctypes.c_void_p()
    assert acl.aclrtIpcMemImportByKey(ctypes.byref(p), k.encode(), 1) == OK
    assert acl.fake_acl_live(b"ipc_import") == 1 and acl.fake_acl_live(b"ipc_key") == 0
    assert c.ask("close", k) == [RT_PARAM_INVALID]  # we hold an import
    c.kill()
    back = ctypes.create_string_buffer(8192)
    assert acl.aclrtMemcpy(back, 8192, p.value, 8192, D2H) == OK
    assert back.raw == b"\x5a" * 8192
    q = ctypes.c_void_p()
    assert acl.aclrtIpcMemImportByKey(ctypes.byref(q), k.encode(), 1) == RT_PARAM_INVALID
    assert acl.aclrtIpcMemClose(k.encode()) == OK
    assert acl.fake_acl_live(b"ipc_import") == 0
