"""The state a benchmark run shares (the cluster, its runtime and a stream), caches on that
runtime with a known pattern, the interleaved timing loop, and the baselines every scenario
measures in the same rounds: one contiguous copy of the same bytes, a per-block runtime copy
loop, numpy fancy indexing (host memory) and torch indexing (device memory, when torch imports)."""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import random
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import _core
from ..config import LLMConfig
from ..descs import Cache, CacheDesc, DataType, LLMRole, Placement
from ..llm_datadist import LLMDataDist
from ..status import LLMException, LLMStatusCode
from ..transfer_types import LayerSynchronizer
from .settings import MemoryBudget, Settings, budget_for

CLUSTER_ID = 7
OK = LLMStatusCode.LLM_SUCCESS
CONTIGUOUS = "contiguous copy"
PER_BLOCK = "per-block copy loop"
NUMPY = "numpy indexing"
TORCH = "torch indexing"


class Go(LayerSynchronizer):
    """Every layer is ready at once."""

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def host_view(addr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def check(status, what: str) -> None:
    """Raise when a transfer did not succeed (a benchmark never times a failure)."""
    if status != OK:
        raise LLMException(f"{what} failed: {status!r}", status_code=status)


def block_pairs(pool: int, pairs: int, seed: int):
    """`pairs` random (src, dst) block indices in a pool of `pool` blocks: distinct when the pool
    holds them; otherwise `pool` distinct pairs repeated in the same order, so a block comes
    back only after all the others."""
    rng = random.Random(seed)
    if pool >= pairs:
        return rng.sample(range(pool), pairs), rng.sample(range(pool), pairs)
    base = list(zip(rng.sample(range(pool), pool), rng.sample(range(pool), pool)))
    allp = (base * math.ceil(pairs / pool))[:pairs]
    return [s for s, _ in allp], [d for _, d in allp]


class Bench:
    """One LLMDataDist on the runtime LLMDIST_RUNTIME picks, a stream for the baselines, the
    memory budget, and the helpers the scenarios share."""

    def __init__(self, settings: Settings, progress) -> None:
        self.settings = settings
        self.progress = progress
        self.dd = LLMDataDist(LLMRole.PROMPT, CLUSTER_ID)
        cfg = LLMConfig()
        cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
        cfg.enable_cache_manager = True
        self.dd.init(cfg.generate_options())
        self.cm = self.dd.cache_manager
        self.rt = self.dd.runtime
        self.stream = _core.Stream(self.rt)
        self.budget: MemoryBudget = budget_for(self.rt, settings.mem_budget)
        self.torch = _torch_device(self.rt)  # (torch module, device) or None

    @property
    def host_memory(self) -> bool:
        """DEVICE caches are plain host memory (the host runtime): numpy can index them."""
        return self.rt.is_host

    def close(self) -> None:
        self.stream.close()
        self.dd.finalize()

    # --- memory ----------------------------------------------------------------------------
    def desc(self, num_tensors: int, rows: int, row_bytes: int, placement: Placement) -> CacheDesc:
        item = self.settings.np_dtype.itemsize
        if row_bytes % item:
            raise ValueError(
                f"a block or row of {row_bytes} bytes is not a whole number of "
                f"{self.settings.dtype} elements"
            )
        return CacheDesc(num_tensors, [rows, row_bytes // item], self.settings.data_type, placement)

    def blocks_cache(
        self, num_tensors: int, pool: int, block: int, placement: Placement = Placement.DEVICE
    ) -> Cache:
        return self.cm.allocate_blocks_cache(self.desc(num_tensors, pool, block, placement))

    def cache(
        self, num_tensors: int, rows: int, row_bytes: int, placement: Placement = Placement.DEVICE
    ) -> Cache:
        return self.cm.allocate_cache(self.desc(num_tensors, rows, row_bytes, placement))

    def free(self, *caches: Optional[Cache]) -> None:
        for c in caches:
            if c is None or not c.tensor_addrs:
                continue
            if c.is_blocks_cache:
                self.cm.deallocate_blocks_cache(c)
            else:
                self.cm.deallocate_cache(c)

    def _direct(self, cache: Cache) -> bool:
        return self.host_memory or cache.cache_desc.placement == Placement.HOST

    def write(self, cache: Cache, t: int, data: np.ndarray) -> None:
        """Tensor t of cache := data (uint8, the tensor's size)."""
        n = cache.cache_desc.size
        if self._direct(cache):
            host_view(cache.tensor_addrs[t], n)[:] = data
            return
        stage = self.cm.allocate_cache(CacheDesc(1, [n], DataType.DT_UINT8, Placement.HOST))
        try:
            host_view(stage.tensor_addrs[0], n)[:] = data
            self.rt.memcpy(cache.tensor_addrs[t], stage.tensor_addrs[0], n, self.stream)
            self.stream.synchronize()
        finally:
            self.cm.deallocate_cache(stage)

    def read(self, cache: Cache, t: int) -> np.ndarray:
        """A host copy of tensor t (uint8)."""
        n = cache.cache_desc.size
        if self._direct(cache):
            return host_view(cache.tensor_addrs[t], n).copy()
        stage = self.cm.allocate_cache(CacheDesc(1, [n], DataType.DT_UINT8, Placement.HOST))
        try:
            self.rt.memcpy(stage.tensor_addrs[0], cache.tensor_addrs[t], n, self.stream)
            self.stream.synchronize()
            return host_view(stage.tensor_addrs[0], n).copy()
        finally:
            self.cm.deallocate_cache(stage)

    def fill(self, cache: Cache, start: int = 1) -> None:
        """Every tensor gets distinct 64-bit words (so any misplaced block shows)."""
        n = cache.cache_desc.size
        words = n // 8
        for t in range(len(cache.tensor_addrs)):
            buf = np.zeros(n, dtype=np.uint8)
            buf[: words * 8].view(np.uint64)[:] = np.arange(
                start + t * words, start + (t + 1) * words, dtype=np.uint64
            )
            self.write(cache, t, buf)

    def zero(self, cache: Cache) -> None:
        n = cache.cache_desc.size
        for t in range(len(cache.tensor_addrs)):
            self.write(cache, t, np.zeros(n, dtype=np.uint8))

    # --- timing ----------------------------------------------------------------------------
    def rounds(
        self,
        label: str,
        paths: Dict[str, Callable[[], None]],
        repeat: Optional[int] = None,
        alternate: bool = False,
    ) -> Dict[str, List[float]]:
        """Run every path once untimed, then `repeat` rounds of all paths in turn (so that drift
        of a shared machine hits them alike; with `alternate`, odd rounds run them in reverse
        order, so that no path always follows the same one); the seconds of each path in each
        round."""
        repeat = repeat or self.settings.repeat
        for name, fn in paths.items():
            self.progress.show(f"{label}: warm-up {name}")
            fn()
        times: Dict[str, List[float]] = {k: [] for k in paths}
        order = list(paths.items())
        for i in range(repeat):
            self.progress.show(f"{label}: round {i + 1}/{repeat}")
            for name, fn in order[::-1] if alternate and i % 2 else order:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        return times

    # --- baselines -------------------------------------------------------------------------
    def contiguous(self, nbytes: int, src: Cache, dst: Cache):
        """One copy of nbytes from the source cache's memory to the destination cache's, on the
        runtime's stream: the limit of that path for the same bytes. Successive calls alternate
        between the start and the end of the caches, so that a copy does not find the previous
        one's bytes in the CPU cache. When the caches hold fewer bytes than that (a shrunk pool),
        the copy is cut into pieces of their size."""
        s_span, d_span = _span(src), _span(dst)
        if s_span is None or d_span is None:
            raise ValueError("the contiguous-copy baseline needs caches allocated in one piece")
        span = min(s_span[1], d_span[1])
        turn = [0]

        def run():
            if span >= nbytes:
                off = 0 if turn[0] % 2 == 0 else span - nbytes
                turn[0] += 1
                self.rt.memcpy(d_span[0] + off, s_span[0] + off, nbytes, self.stream)
            else:
                left = nbytes
                while left:
                    n = min(span, left)
                    self.rt.memcpy(d_span[0], s_span[0], n, self.stream)
                    left -= n
            self.stream.synchronize()

        return run

    def per_block(self, dsts: List[int], srcs: List[int], nbytes: int):
        """One runtime copy per block, queued from a C loop (what a hand-written copy loop or
        vLLM's swap_blocks amounts to)."""

        def run():
            _core.bench_copy_each(self.rt, dsts, srcs, nbytes, self.stream)
            self.stream.synchronize()

        return run

    def numpy_indexing(
        self, src: Cache, dst: Cache, si: Sequence[int], di: Sequence[int], block: int
    ):
        """dst[di] = src[si] per tensor, both tensors seen as rows of `block` bytes, on host
        views; None when the memory is not host memory."""
        if not (self._direct(src) and self._direct(dst)):
            return None
        sv = [host_view(a, src.cache_desc.size).reshape(-1, block) for a in src.tensor_addrs]
        dv = [host_view(a, dst.cache_desc.size).reshape(-1, block) for a in dst.tensor_addrs]
        s = np.asarray(si, dtype=np.intp)
        d = np.asarray(di, dtype=np.intp)

        def run():
            for a, b in zip(sv, dv):
                b[d] = a[s]

        return run

    def torch_indexing(self, num_tensors: int, pool: int, block: int, si, di, src_pool=None):
        """The same gather with the framework's own device tensors (torch on the runtime's
        device): returns (run, release), or None when torch is not there."""
        if self.torch is None:
            return None
        torch, dev = self.torch
        src = torch.empty((num_tensors, src_pool or pool, block), dtype=torch.uint8, device=dev)
        dst = torch.empty((num_tensors, pool, block), dtype=torch.uint8, device=dev)
        s = torch.as_tensor(list(si), dtype=torch.long, device=dev)
        d = torch.as_tensor(list(di), dtype=torch.long, device=dev)
        sync = device_sync(torch, dev)

        def run():
            dst[:, d] = src[:, s]
            sync()

        return run, lambda: None

    def torch_reason(self) -> str:
        if self.rt.is_host:
            return "the host runtime has no framework device"
        return "torch (with this device) is not importable"


def _span(cache: Cache):
    """(start, bytes) of a cache whose tensors lie one after the other at a fixed step (what
    allocate_* makes), else None."""
    a = cache.tensor_addrs
    n = cache.cache_desc.size
    step = a[1] - a[0] if len(a) > 1 else n
    if step < n or any(a[i + 1] - a[i] != step for i in range(len(a) - 1)):
        return None
    return a[0], a[-1] + n - a[0]


# Device types torch knows only once another package is imported (it registers them).
_TORCH_DEVICE_PACKAGE = {"npu": "torch_npu"}


def _torch_device(rt):
    """(torch, device string) when torch drives the runtime's device, else None."""
    kind = rt.framework_device
    if kind is None or not importable("torch"):
        return None
    try:
        import torch

        package = _TORCH_DEVICE_PACKAGE.get(kind)
        if package is not None:
            if not importable(package):
                return None
            importlib.import_module(package)
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            return torch, f"{kind}:{rt.device_id}"
    except Exception:  # noqa: BLE001 - a broken framework install is only a missing baseline
        return None
    return None


def device_sync(torch, dev: str):
    """torch's synchronize for a device string of _torch_device ("cuda:0" -> torch.cuda's)."""
    return getattr(torch, dev.split(":")[0]).synchronize


def verify_blocks(
    bench: Bench,
    src: Cache,
    dst: Cache,
    si,
    di,
    block: int,
    tensors: Optional[Sequence[int]] = None,
) -> bool:
    """dst block di[j] == src block si[j] for the first and last tensor (or `tensors`)."""
    n = len(src.tensor_addrs)
    tensors = sorted({0, n - 1}) if tensors is None else tensors
    s = np.asarray(si, dtype=np.intp)
    d = np.asarray(di, dtype=np.intp)
    for t in tensors:
        a = bench.read(src, t).reshape(-1, block)
        b = bench.read(dst, t).reshape(-1, block)
        if not np.array_equal(b[d], a[s]):
            return False
    return True
