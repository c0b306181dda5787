"""Local block operations of a cache manager: copy_blocks, copy_cache and swap_blocks.

They are synchronous and stay inside this process: the checks below turn the call into one run
table (a Plan) and pairs of tensor bases, and LocalCopier moves the bytes on the runtime's copy
engine (the host copy team for host memory, runtime copies for anything touching device
memory) and waits for them. BlockOperations runs a call for its cache manager, holding the
manager's lock so that no cache of the call is released meanwhile. Nothing is read or written
outside the caches named by the call, and no call may read bytes it also writes."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from . import _core
from ._check import check_int64, check_isinstance, check_uint32, check_uint64, require
from ._core import CopyKind
from .descs import Cache, Placement, copy_kind, is_live, tensor_addrs_of
from .registry import ALLOCATED, ClusterMemory, MemoryEntry
from .status import LLMException, LLMStatusCode
from .transfers import live_entry

# Page-locked buffer that host memory a device runtime cannot copy asynchronously (pageable
# memory the caller owns) goes through, in rounds of at most this many bytes.
STAGING_BYTES = 8 << 20

log = logging.getLogger(__name__)


class Side(NamedTuple):
    """One end of a local copy: the tensor bases, where they live, and whether a device
    runtime may copy them asynchronously (device memory, or page-locked host memory)."""

    bases: List[int]
    placement: Placement
    pinned: bool


class LocalCopy(NamedTuple):
    """A checked local operation: plan's runs applied to src.bases[i] -> dst.bases[i]."""

    op: str
    plan: object
    src: Side
    dst: Side


def block_pairs(name: str, mapping, list_values: bool) -> List[Tuple[int, int]]:
    """(source block, destination block) pairs of a dict of int -> int, or int -> list of int."""
    check_isinstance(name, mapping, dict)
    pairs = []
    for src, dst in mapping.items():
        check_isinstance(f"{name} key", src, int)
        check_uint64(f"{name} key", src)
        if list_values:
            check_isinstance(f"{name}[{src}]", dst, list)
            for j, d in enumerate(dst):
                check_isinstance(f"{name}[{src}][{j}]", d, int)
                check_uint64(f"{name}[{src}][{j}]", d)
                pairs.append((src, d))
        else:
            check_isinstance(f"{name}[{src}]", dst, int)
            check_uint64(f"{name}[{src}]", dst)
            pairs.append((src, dst))
    return pairs


def _check_blocks(
    name: str, pairs: List[Tuple[int, int]], src_blocks: int, dst_blocks: int
) -> None:
    for s, d in pairs:
        require(s < src_blocks, f"{name}: source block {s} is out of range [0, {src_blocks})")
        require(d < dst_blocks, f"{name}: destination block {d} is out of range [0, {dst_blocks})")
    check_written_once(name, [d for _, d in pairs])


def check_written_once(name: str, dst_blocks) -> None:
    """Refuse a destination block listed twice: which copy lands last would decide its bytes."""
    seen = set()
    for d in dst_blocks:
        require(d not in seen, f"{name}: destination block {d} is written twice")
        seen.add(d)


def check_indices_written_once(name: str, dst_blocks: "_core.Indices") -> None:
    """check_written_once over parsed indices, in one C pass (no Python per block)."""
    d = _core.repeated_index(dst_blocks)
    if d is not None:
        raise LLMException(
            f"{name}: destination block {d} is written twice",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )


def _plan_blocks(pairs: List[Tuple[int, int]], block_bytes: int):
    src = _core.parse_indices("source blocks", [s for s, _ in pairs])
    dst = _core.parse_indices("destination blocks", [d for _, d in pairs])
    return _core.plan_b2b(src, dst, block_bytes)


def check_disjoint(op: str, plan, src: List[int], dst: List[int], params: str = "") -> None:
    """Refuse a copy of plan over the pairs src[i] -> dst[i] that writes bytes it also reads,
    or writes a byte twice. params names the arguments that chose the ranges."""
    what = _core.find_overlap(plan, src, dst)
    where = f"{op}: {params}: " if params else f"{op}: "
    require(
        what is None,
        f"{where}a destination byte range overlaps a {what} byte range; the result would "
        f"depend on the copy order"
        if what == "destination"
        else f"{where}source and destination byte ranges overlap",
    )


def plan_copy_blocks(cache: Cache, pairs: List[Tuple[int, int]], pinned: bool) -> LocalCopy:
    """copy_blocks: block s of every tensor of cache to each block listed for s (pairs from
    block_pairs)."""
    require(cache.is_blocks_cache, f"cache {cache.cache_id} is not a blocks cache")
    desc = cache.cache_desc
    _check_blocks("copy_block_info", pairs, desc.batch_size, desc.batch_size)
    both = {s for s, _ in pairs} & {d for _, d in pairs}
    require(not both, f"copy_block_info: block {min(both) if both else 0} is both read and written")
    plan = _plan_blocks(pairs, desc.stride)
    bases = tensor_addrs_of(cache)
    check_disjoint("copy_blocks", plan, bases, bases)
    side = Side(list(bases), desc.placement, pinned)
    return LocalCopy("copy_blocks", plan, side, side)


def check_copy_cache_args(dst, src, dst_batch_index, src_batch_index, offset, size, req_id) -> None:
    """Types and ranges of copy_cache's arguments (TypeError, ValueError, LLMException)."""
    check_isinstance("dst", dst, Cache)
    check_isinstance("src", src, Cache)
    check_uint32("dst_batch_index", dst_batch_index)
    check_uint32("src_batch_index", src_batch_index)
    check_uint64("offset", offset)
    check_int64("size", size)
    if req_id is not None:
        check_uint64("req_id", req_id)
    require(size == -1 or size > 0, f"size must be -1 (the rest of the row) or > 0, got {size}")
    require(
        not src.is_blocks_cache,
        f"src cache {src.cache_id} is a blocks cache; use copy_blocks or swap_blocks",
    )
    require(
        not dst.is_blocks_cache,
        f"dst cache {dst.cache_id} is a blocks cache; use copy_blocks or swap_blocks",
    )


def plan_copy_cache(
    dst: Cache,
    src: Cache,
    dst_batch_index: int,
    src_batch_index: int,
    offset: int,
    size: int,
    src_pinned: bool,
    dst_pinned: bool,
) -> LocalCopy:
    """copy_cache: bytes [offset, offset + n) of row src_batch_index of every source tensor to
    the same bytes of row dst_batch_index of the destination tensor with the same index; n is
    size, or the rest of the source row for -1."""
    sd, dd = src.cache_desc, dst.cache_desc
    require(
        sd.num_tensors == dd.num_tensors,
        f"src has {sd.num_tensors} tensors and dst has {dd.num_tensors}; they must match",
    )
    require(
        src_batch_index < sd.batch_size,
        f"src_batch_index {src_batch_index} is out of range [0, {sd.batch_size})",
    )
    require(
        dst_batch_index < dd.batch_size,
        f"dst_batch_index {dst_batch_index} is out of range [0, {dd.batch_size})",
    )
    require(
        offset < sd.stride and offset < dd.stride,
        f"offset {offset} must be inside a row: source rows are {sd.stride} bytes, "
        f"destination rows {dd.stride}",
    )
    n = sd.stride - offset if size == -1 else size
    require(
        n <= sd.stride - offset,
        f"size {size} from offset {offset} runs past the source row of {sd.stride} bytes",
    )
    require(
        n <= dd.stride - offset,
        f"size {n} from offset {offset} runs past the destination row of {dd.stride} bytes",
    )
    plan = _core.plan_one(
        src_batch_index * sd.stride + offset, dst_batch_index * dd.stride + offset, n
    )
    check_disjoint("copy_cache", plan, tensor_addrs_of(src), tensor_addrs_of(dst))
    return LocalCopy(
        "copy_cache",
        plan,
        Side(list(tensor_addrs_of(src)), sd.placement, src_pinned),
        Side(list(tensor_addrs_of(dst)), dd.placement, dst_pinned),
    )


def check_swap_args(src_cache, dst_cache, src_to_dst) -> List[Tuple[int, int]]:
    """Types of swap_blocks' arguments; returns the block pairs."""
    check_isinstance("src_cache", src_cache, Cache)
    check_isinstance("dst_cache", dst_cache, Cache)
    return block_pairs("src_to_dst", src_to_dst, False)


def plan_swap_blocks(
    src_cache: Cache,
    dst_cache: Cache,
    pairs: List[Tuple[int, int]],
    src_pinned: bool,
    dst_pinned: bool,
) -> LocalCopy:
    """swap_blocks: block s of every source tensor to block src_to_dst[s] of the destination
    tensor with the same index, between host and device memory."""
    require(src_cache.is_blocks_cache, "src_cache must be a blocks cache")
    require(dst_cache.is_blocks_cache, "dst_cache must be a blocks cache")
    sd, dd = src_cache.cache_desc, dst_cache.cache_desc
    require(
        sd.stride == dd.stride,
        f"src block size {sd.stride} and dst block size {dd.stride} must be equal",
    )
    require(
        sd.num_tensors == dd.num_tensors,
        f"src num_tensors {sd.num_tensors} and dst num_tensors {dd.num_tensors} must be equal",
    )
    require(
        {sd.placement, dd.placement} == {Placement.HOST, Placement.DEVICE},
        f"swap_blocks moves blocks between HOST and DEVICE caches, not from "
        f"{sd.placement.name} to {dd.placement.name}",
    )
    _check_blocks("src_to_dst", pairs, sd.batch_size, dd.batch_size)
    plan = _plan_blocks(pairs, sd.stride)
    check_disjoint("swap_blocks", plan, tensor_addrs_of(src_cache), tensor_addrs_of(dst_cache))
    return LocalCopy(
        "swap_blocks",
        plan,
        Side(list(tensor_addrs_of(src_cache)), sd.placement, src_pinned),
        Side(list(tensor_addrs_of(dst_cache)), dd.placement, dst_pinned),
    )


class LocalCopier:
    """Streams (and a staging buffer) the local operations of one cache manager copy with;
    one operation at a time."""

    def __init__(self, runtime: "_core.Runtime") -> None:
        self._runtime = runtime
        self._host = runtime if runtime.is_host else _core.Runtime.host(runtime.device_id)
        self._lock = threading.Lock()
        self._streams: Dict[str, "_core.Stream"] = {}
        self._staging = 0
        self._closed = False

    def _stream(self, rt: "_core.Runtime") -> "_core.Stream":
        s = self._streams.get(rt.name)
        if s is None:
            s = self._streams[rt.name] = _core.Stream(rt)
        return s

    def run(self, copy: LocalCopy) -> None:
        """Move the bytes of a checked operation and return when they have landed."""
        if copy.plan.count == 0 or not copy.src.bases:
            return
        rt = self._runtime
        kind = copy_kind(copy.src.placement, copy.dst.placement)
        with self._lock:
            if self._closed:
                raise LLMException(
                    "llm datadist is finalized", status_code=LLMStatusCode.LLM_ENGINE_FINALIZED
                )
            rt.bind_device()
            if rt.is_host or kind == CopyKind.COPY_H2H:
                # host memory on either runtime (the host runtime's "device" memory is host
                # memory too): the host copy engine
                _core.copy_pairs(
                    self._host,
                    self._stream(self._host),
                    copy.plan,
                    copy.src.bases,
                    copy.dst.bases,
                    CopyKind.COPY_H2H,
                    copy.op,
                )
                return
            host_side = copy.src if kind == CopyKind.COPY_H2D else copy.dst
            if kind == CopyKind.COPY_D2D or host_side.pinned:
                _core.copy_pairs(
                    rt, self._stream(rt), copy.plan, copy.src.bases, copy.dst.bases, kind, copy.op
                )
                return
            if not self._staging:
                self._staging = rt.malloc(STAGING_BYTES, False)
            _core.copy_pairs_staged(
                rt,
                self._stream(rt),
                copy.plan,
                copy.src.bases,
                copy.dst.bases,
                kind == CopyKind.COPY_H2D,
                self._staging,
                STAGING_BYTES,
                copy.op,
            )

    def close(self) -> None:
        """Release the streams and the staging buffer (after the last operation)."""
        with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
            staging, self._staging = self._staging, 0
        for s in streams:
            s.close()
        if staging:
            self._runtime.free(staging, False)


class BlockOperations:
    """copy_blocks, copy_cache and swap_blocks of one cache manager. Each call holds lock (the
    manager's) while its bytes move, so that none of its caches is released meanwhile."""

    def __init__(
        self,
        runtime: "_core.Runtime",
        mem: ClusterMemory,
        lock: threading.RLock,
        check_open: Callable[[], None],
    ) -> None:
        self._runtime = runtime
        self._mem = mem
        self._lock = lock
        self._check_open = check_open
        self.copier = LocalCopier(runtime)

    def _pinned(self, entry: Optional[MemoryEntry]) -> bool:
        """Whether the runtime may copy this cache's host memory asynchronously: llmdist
        allocated it page-locked (memory the caller owns may be pageable)."""
        return entry is not None and entry.origin == ALLOCATED and not self._runtime.is_host

    def copy_blocks(self, cache: Cache, copy_block_info: Dict[int, List[int]]) -> None:
        """CacheManager.copy_blocks."""
        check_isinstance("cache", cache, Cache)
        pairs = block_pairs("copy_block_info", copy_block_info, True)
        self._check_open()
        with self._lock:
            entry = live_entry(self._mem, "cache", cache)
            self.copier.run(plan_copy_blocks(cache, pairs, self._pinned(entry)))

    def copy_cache(
        self,
        dst: Cache,
        src: Cache,
        dst_batch_index: int,
        src_batch_index: int,
        offset: int,
        size: int,
        req_id: Optional[int],
    ) -> None:
        """CacheManager.copy_cache."""
        check_copy_cache_args(dst, src, dst_batch_index, src_batch_index, offset, size, req_id)
        self._check_open()
        with self._lock:
            src_entry = live_entry(self._mem, "src", src)
            dst_entry = live_entry(self._mem, "dst", dst)
            copy = plan_copy_cache(
                dst,
                src,
                dst_batch_index,
                src_batch_index,
                offset,
                size,
                self._pinned(src_entry),
                self._pinned(dst_entry),
            )
            log.debug("copy_cache %d -> %d (req_id %s)", src.cache_id, dst.cache_id, req_id)
            self.copier.run(copy)

    def swap_blocks(self, src_cache: Cache, dst_cache: Cache, src_to_dst: Dict[int, int]) -> None:
        """CacheManager.swap_blocks: the HOST cache may also come from
        Cache.create_cpu_cache (no entry here)."""
        pairs = check_swap_args(src_cache, dst_cache, src_to_dst)
        self._check_open()
        with self._lock:
            entries = []
            for name, cache in (("src_cache", src_cache), ("dst_cache", dst_cache)):
                if cache.cache_id == -1:
                    require(
                        is_live(cache) and cache.cache_desc.placement == Placement.HOST,
                        f"{name} was made by Cache.create_cpu_cache and must be HOST memory",
                    )
                    entries.append(None)
                else:
                    entries.append(live_entry(self._mem, name, cache))
            self.copier.run(
                plan_swap_blocks(
                    src_cache, dst_cache, pairs, self._pinned(entries[0]), self._pinned(entries[1])
                )
            )

    def close(self) -> None:
        """Release the copier's streams and staging buffer (after the last operation)."""
        self.copier.close()
