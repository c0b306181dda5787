"""Shared helpers for the CacheManager / transfer_cache_async tests (their fixtures are in
conftest.py).

Everything runs in one process on the embedded host runtime ("device" memory is host RAM), with
local transfers: the destination cluster id is the LLMDataDist's own cluster id.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from llmdist import (
    CacheDesc,
    DataType,
    LayerSynchronizer,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    _core,
)

from . import reference
from .runtime_params import build_fake_runtime  # noqa: F401  (tests import it from here)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the directory that holds the package `tests`

if os.environ.get("LLMDIST_TEST_INSTALLED") == "1":
    # tools/check_wheel.sh: the tests are meant for an installed wheel, not a source tree
    _pkg = os.path.dirname(os.path.abspath(_core.__file__))
    if os.path.basename(os.path.dirname(_pkg)) not in ("site-packages", "dist-packages"):
        raise RuntimeError(f"LLMDIST_TEST_INSTALLED=1 but llmdist was imported from {_pkg}")
OWN_CLUSTER = 7


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


OTHER_CLUSTER = 4242  # never linked in these tests
WAIT_MS = 30_000  # upper bound for any wait on a task in the tests
CACHE_DTYPES = [dt for dt in DataType if dt != DataType.DT_STRING]
SUCCESS = LLMStatusCode.LLM_SUCCESS


# --------------------------------------------------------------------------------------------
# watchdog: a hung test dumps every thread's stack and ends the run instead of hanging CI
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# shared memory: llmdist shares memory as memfds, which have no name: a test must not leave
# anything of llmdist's in /dev/shm
# --------------------------------------------------------------------------------------------
# Processes the tests started (pids)
SPAWNED: set = set()


def llmdist_shm_names() -> set:
    """Names in /dev/shm of llmdist's old form (llmdist-<pid>-...) made by this process or a
    process it started (other test runs on the machine are not ours to judge)."""
    mine = {os.getpid()} | SPAWNED
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    out = set()
    for n in names:
        parts = n.split("-")
        if (
            n.startswith("llmdist-")
            and len(parts) > 1
            and parts[1].isdigit()
            and int(parts[1]) in mine
        ):
            out.add(n)
    return out


# --------------------------------------------------------------------------------------------
# keyed and unkeyed clusters
# --------------------------------------------------------------------------------------------
TEST_KEY = "llmdist-test-suite-key"


def auth_modes(request):
    """A module fixture (params "unkeyed", "keyed"): the module's tests run without a key and
    again with LLMDIST_AUTH_KEY set, which clusters of this process and of the processes the
    tests start read at init."""
    old = os.environ.pop("LLMDIST_AUTH_KEY", None)
    if request.param == "keyed":
        os.environ["LLMDIST_AUTH_KEY"] = TEST_KEY
    try:
        yield request.param
    finally:
        os.environ.pop("LLMDIST_AUTH_KEY", None)
        if old is not None:
            os.environ["LLMDIST_AUTH_KEY"] = old


def keyed_and_unkeyed():
    """auth_modes as an autouse module fixture, for a test module to assign to a name."""
    return pytest.fixture(scope="module", autouse=True, params=["unkeyed", "keyed"])(auth_modes)


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll cond() every 20 ms until it is true (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------------------------
# memory helpers
# --------------------------------------------------------------------------------------------
# With LLMDIST_RUNTIME=acl (or cuda) the suite runs on the fake libascendcl.so (tests/fake_acl)
# or the fake libcudart.so (tests/fake_cuda): DEVICE memory that a test registers must then come
# from the runtime's own allocator. The fakes' device memory is host memory, so the tests still
# read and write it through numpy views.
_ACL = None
_CUDA = None
if os.environ.get("LLMDIST_RUNTIME") == "acl":
    _ACL = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
elif os.environ.get("LLMDIST_RUNTIME") == "cuda":
    _CUDA = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])


def device_buffer(nbytes: int) -> Tuple[int, Optional[int]]:
    """(address, pointer to free or None): device memory of the runtime under test."""
    ptr = ctypes.c_void_p()
    if _ACL is not None:
        assert _ACL.aclrtSetDevice(0) == 0
        rc = _ACL.aclrtMalloc(ctypes.byref(ptr), max(nbytes, 1), 0)
        assert rc == 0, f"aclrtMalloc({nbytes}) failed with {rc}"
        return ptr.value, ptr.value
    if _CUDA is not None:
        assert _CUDA.cudaSetDevice(0) == 0
        rc = _CUDA.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)))
        assert rc == 0, f"cudaMalloc({nbytes}) failed with {rc}"
        return ptr.value, ptr.value
    return 0, None


def cuda_library() -> Optional[ctypes.CDLL]:
    """The fake libcudart.so this process runs on (LLMDIST_RUNTIME=cuda), else None."""
    return _CUDA


def free_device_buffer(ptr: int) -> None:
    if _ACL is not None:
        _ACL.aclrtSetDevice(0)
        _ACL.aclrtFree(ctypes.c_void_p(ptr))
    elif _CUDA is not None:
        _CUDA.cudaSetDevice(0)
        _CUDA.cudaFree(ctypes.c_void_p(ptr))


def host_view(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy view of nbytes at addr (llmdist-owned memory)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def esize(dt: DataType) -> int:
    return reference.element_size(dt.name)


_label_counter = [0]


def _fresh_label(prefix: str) -> str:
    _label_counter[0] += 1
    return f"{prefix}{_label_counter[0]}"


@dataclass
class TCache:
    """A cache made in a test, with numpy access to its bytes.

    ``buffers``: the numpy arrays that hold the cache (for a registered cache, the backing
    arrays including guard bytes around every registered tensor; for an allocated cache, views
    of exactly the allocated tensors).  ``tensors[i] = (buffer key, byte offset)`` of tensor i.
    """

    cache: object
    desc: CacheDesc
    buffers: Dict[Hashable, np.ndarray]
    tensors: List[Tuple[Hashable, int]]
    allocated: bool
    key: Optional[object] = None

    @property
    def size(self) -> int:
        return self.desc.size

    @property
    def stride(self) -> int:
        # computed independently of llmdist's CacheDesc.stride
        return reference.row_stride(
            self.desc.shape, self.desc.data_type.name, self.desc.batch_dim_index
        )

    @property
    def num_layers(self) -> int:
        return self.desc.num_tensors // 2

    @property
    def addrs(self) -> List[int]:
        return self.cache.tensor_addrs

    def tensor(self, i: int) -> np.ndarray:
        """Live view of tensor i's bytes."""
        k, off = self.tensors[i]
        return self.buffers[k][off : off + self.size]

    def tensor_bytes(self) -> List[np.ndarray]:
        """Copies of every tensor's bytes (the source side of the reference model)."""
        return [self.tensor(i).copy() for i in range(self.desc.num_tensors)]

    def snapshot(self) -> Dict[Hashable, np.ndarray]:
        return {k: v.copy() for k, v in self.buffers.items()}

    def mem(self) -> Dict[Hashable, np.ndarray]:
        return dict(self.buffers)

    def addr_of(self, i: int, offset: int = 0) -> int:
        """Address of byte ``offset`` of tensor i (from the Cache's tensor_addrs)."""
        return self.cache.tensor_addrs[i] + offset

    def fill(self, rng: np.random.Generator) -> None:
        for b in self.buffers.values():
            b[:] = rng.integers(0, 256, b.size, dtype=np.uint8)


def make_desc(
    num_tensors: int,
    shape: Sequence[int],
    dtype: DataType = DataType.DT_UINT8,
    placement: Placement = Placement.DEVICE,
    batch_dim_index: int = 0,
) -> CacheDesc:
    return CacheDesc(num_tensors, list(shape), dtype, placement, batch_dim_index)


class Env:
    """One initialised LLMDataDist with its cache manager, plus keep-alive of test memory."""

    def __init__(
        self,
        remote: bool = False,
        workers: Optional[int] = None,
        cluster_id: int = OWN_CLUSTER,
        role: LLMRole = LLMRole.PROMPT,
        seed: int = 0,
        extra_options: Optional[Dict[str, str]] = None,
    ) -> None:
        self.cluster_id = cluster_id
        self.remote = remote
        self.dd = LLMDataDist(role, cluster_id)
        self.options = self.make_options(remote, workers, extra_options)
        self.dd.init(self.options)
        self.cm = self.dd.cache_manager
        self.rng = np.random.default_rng(seed)
        self._keep: List[np.ndarray] = []
        self._device_ptrs: List[int] = []

    @staticmethod
    def make_options(
        remote: bool = False, workers: Optional[int] = None, extra: Optional[Dict[str, str]] = None
    ) -> Dict[str, str]:
        cfg = LLMConfig()
        cfg.device_id = 0
        cfg.enable_cache_manager = True
        cfg.enable_remote_cache_accessible = remote
        opts = cfg.generate_options()
        if workers is not None:
            opts["llmdist.transfer_workers"] = str(workers)
        if extra:
            opts.update(extra)
        return opts

    def close(self) -> None:
        try:
            self.dd.finalize()
        finally:
            # memory registered with llmdist must outlive it: drop our arrays only now
            self._keep.clear()
            for ptr in self._device_ptrs:
                free_device_buffer(ptr)
            self._device_ptrs.clear()

    def random_bytes(self, nbytes: int, placement: Placement) -> np.ndarray:
        """Random bytes in memory of the given placement (device memory under the ACL runtime)."""
        if placement == Placement.DEVICE and (_ACL is not None or _CUDA is not None):
            addr, ptr = device_buffer(nbytes)
            self._device_ptrs.append(ptr)
            arr = host_view(addr, nbytes)
            arr[:] = self.rng.integers(0, 256, nbytes, dtype=np.uint8)
            return arr
        return self.rng.integers(0, 256, nbytes, dtype=np.uint8)

    # ---- caches -------------------------------------------------------------------------
    def registered(
        self,
        num_tensors: int,
        shape: Sequence[int],
        dtype: DataType = DataType.DT_UINT8,
        placement: Placement = Placement.DEVICE,
        blocks: bool = False,
        key: Optional[object] = None,
        batch_dim_index: int = 0,
        guard: int = 64,
        contiguous: bool = False,
        gap: int = 0,
        **kwargs,
    ) -> TCache:
        """Register numpy memory as a cache. Every tensor has ``guard`` canary bytes before and
        after it (outside the registered region). ``contiguous``: all tensors in one array,
        ``gap`` unregistered bytes between consecutive tensors."""
        desc = make_desc(num_tensors, shape, dtype, placement, batch_dim_index)
        size = reference.tensor_bytes(shape, dtype.name)
        label = _fresh_label("reg")
        buffers: Dict[Hashable, np.ndarray] = {}
        tensors: List[Tuple[Hashable, int]] = []
        if contiguous:
            total = 2 * guard + num_tensors * size + (num_tensors - 1) * gap
            buf = self.random_bytes(total, placement)
            buffers[label] = buf
            for i in range(num_tensors):
                tensors.append((label, guard + i * (size + gap)))
        else:
            for i in range(num_tensors):
                k = f"{label}.{i}"
                buffers[k] = self.random_bytes(size + 2 * guard, placement)
                tensors.append((k, guard))
        self._keep.extend(buffers.values())
        addrs = [buffers[k][off:].ctypes.data for k, off in tensors]
        if blocks:
            cache = self.cm.register_blocks_cache(desc, addrs, key, **kwargs)
        else:
            args = () if key is None else (key,)
            cache = self.cm.register_cache(desc, addrs, *args, **kwargs)
        return TCache(cache, desc, buffers, tensors, allocated=False, key=key)

    def allocated(
        self,
        num_tensors: int,
        shape: Sequence[int],
        dtype: DataType = DataType.DT_UINT8,
        placement: Placement = Placement.DEVICE,
        blocks: bool = False,
        key: Optional[object] = None,
        batch_dim_index: int = 0,
    ) -> TCache:
        """Allocate a cache in llmdist memory and fill it with random bytes."""
        desc = make_desc(num_tensors, shape, dtype, placement, batch_dim_index)
        if blocks:
            cache = self.cm.allocate_blocks_cache(desc, key)
        else:
            cache = (
                self.cm.allocate_cache(desc) if key is None else self.cm.allocate_cache(desc, key)
            )
        size = desc.size
        label = _fresh_label("alloc")
        buffers: Dict[Hashable, np.ndarray] = {}
        tensors: List[Tuple[Hashable, int]] = []
        for i, a in enumerate(cache.tensor_addrs):
            k = f"{label}.{i}"
            buffers[k] = host_view(a, size)
            tensors.append((k, 0))
        tc = TCache(cache, desc, buffers, tensors, allocated=True, key=key)
        tc.fill(self.rng)
        return tc

    def cache(self, allocated: bool, *args, **kwargs) -> TCache:
        return self.allocated(*args, **kwargs) if allocated else self.registered(*args, **kwargs)


@contextlib.contextmanager
def env_ctx(**kwargs):
    e = Env(**kwargs)
    try:
        yield e
    finally:
        e.close()


# --------------------------------------------------------------------------------------------
# layer synchronizers
# --------------------------------------------------------------------------------------------
class RecordingSync(LayerSynchronizer):
    """Returns True at once; records (layer, timeout, thread id) of every call."""

    def __init__(self) -> None:
        self.calls: List[int] = []
        self.timeouts: List[Optional[int]] = []
        self.threads: List[int] = []
        self._lock = threading.Lock()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        with self._lock:
            self.calls.append(layer_index)
            self.timeouts.append(timeout_in_millis)
            self.threads.append(threading.get_ident())
        return True


class SleepSync(RecordingSync):
    """Sleeps ``delay`` seconds per layer, then says go."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def synchronize_layer(self, layer_index, timeout_in_millis):
        import time

        time.sleep(self.delay)
        return super().synchronize_layer(layer_index, timeout_in_millis)


class GateSync(RecordingSync):
    """Blocks at layer ``block_at`` (and every later layer) until ``release()``.

    ``entered`` is set when the synchronizer starts waiting at ``block_at``.
    """

    def __init__(self, block_at: int = 0, result: bool = True, max_wait: float = 60.0) -> None:
        super().__init__()
        self.block_at = block_at
        self.result = result
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.max_wait = max_wait

    def release(self) -> None:
        self.gate.set()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        super().synchronize_layer(layer_index, timeout_in_millis)
        if layer_index >= self.block_at:
            self.entered.set()
            self.gate.wait(self.max_wait)
        return self.result


class FailSync(RecordingSync):
    """True before layer ``at``; at ``at`` returns False (``mode='false'``) or raises."""

    def __init__(self, at: int, mode: str = "false", exc: Optional[BaseException] = None) -> None:
        super().__init__()
        self.at = at
        self.mode = mode
        self.exc = exc if exc is not None else ValueError(f"model failed at layer {at}")

    def synchronize_layer(self, layer_index, timeout_in_millis):
        super().synchronize_layer(layer_index, timeout_in_millis)
        if layer_index >= self.at:
            if self.mode == "raise":
                raise self.exc
            return False
        return True


def raises_llm(code, fn, *args, **kwargs) -> LLMException:
    """fn(*args, **kwargs) must raise LLMException with status `code`; the exception, for checks
    of its message."""
    with pytest.raises(LLMException) as ei:
        fn(*args, **kwargs)
    assert ei.value.status_code == code, (ei.value.status_code, str(ei.value))
    return ei.value


# --------------------------------------------------------------------------------------------
# fake device runtimes (tests/fake_acl, tests/fake_cuda): device code paths without hardware
# --------------------------------------------------------------------------------------------
def wait_results(task, timeout_ms: int = WAIT_MS):
    """get_results with a bound; fails the test if the task is still running."""
    res = task.get_results(timeout_ms)
    assert not (res and all(r == LLMStatusCode.LLM_TIMEOUT for r in res)), (
        f"task still running after {timeout_ms} ms"
    )
    return res


def assert_mem_equal(
    actual: Dict[Hashable, np.ndarray], expected: Dict[Hashable, np.ndarray], what: str = ""
) -> None:
    """Compare every byte of every buffer; report the first differing bytes."""
    assert set(actual) == set(expected)
    for k in expected:
        a = np.asarray(actual[k]).reshape(-1)
        e = np.asarray(expected[k]).reshape(-1)
        assert a.size == e.size, k
        if not np.array_equal(a, e):
            bad = np.flatnonzero(a != e)
            raise AssertionError(
                f"{what} buffer {k}: {bad.size} of {a.size} bytes differ, first at offsets "
                f"{bad[:8].tolist()} (got {a[bad[:8]].tolist()}, expected {e[bad[:8]].tolist()})"
            )
