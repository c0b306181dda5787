"""The memory a cluster registered or allocated, one region per cache tensor.

Every destination byte range of a transfer must fall inside one region; the lookup runs in C
over sorted arrays of region bounds."""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .descs import BlocksCacheKey, Cache, CacheKey
from .status import LLMException, LLMStatusCode

ALLOCATED = "allocated"
REGISTERED = "registered"


class Region:
    """One tensor of a cache: [start, end) in its owner's address space, plus what the
    placement rules and the data path need: delta turns an address into one this process can
    write (0 for its own memory), pid names a peer process written with process writes."""

    __slots__ = ("start", "end", "cache", "tensor_index", "origin", "delta", "pid")

    def __init__(self, start: int, end: int, cache: Cache, tensor_index: int, origin: str,
                 delta: int = 0, pid: int = 0) -> None:
        self.start = start
        self.end = end
        self.cache = cache
        self.tensor_index = tensor_index
        self.origin = origin
        self.delta = delta
        self.pid = pid


class MemoryRegistry:
    """Sorted, non-overlapping regions of one cluster."""

    def __init__(self) -> None:
        self._regions: List[Region] = []
        self._starts = np.empty(0, dtype=np.uint64)
        self._ends = np.empty(0, dtype=np.uint64)

    def _rebuild(self) -> None:
        self._starts = np.array([r.start for r in self._regions], dtype=np.uint64)
        self._ends = np.array([r.end for r in self._regions], dtype=np.uint64)

    def add(self, cache: Cache, origin: str, delta: int = 0, pid: int = 0) -> None:
        """Add every tensor of cache; overlapping memory that is already registered is refused."""
        size = cache.cache_desc.size
        new = sorted((a, a + size, i) for i, a in enumerate(cache._tensor_addrs))
        for (s0, e0, i0), (s1, _, i1) in zip(new, new[1:]):
            if s1 < e0:
                raise LLMException(
                    f"tensor {i1} at {s1:#x} overlaps tensor {i0} at {s0:#x} of the same cache "
                    f"(each tensor is {size} bytes)", status_code=LLMStatusCode.LLM_PARAM_INVALID)
        starts = [r.start for r in self._regions]
        for s, e, i in new:
            k = bisect.bisect_right(starts, s)
            for r in self._regions[max(k - 1, 0):k + 1]:
                if s < r.end and r.start < e:
                    raise LLMException(
                        f"tensor {i} at {s:#x} ({size} bytes) overlaps tensor {r.tensor_index} of "
                        f"cache {r.cache.cache_id}, which is already registered",
                        status_code=LLMStatusCode.LLM_PARAM_INVALID)
        for s, e, i in new:
            k = bisect.bisect_right(starts, s)
            starts.insert(k, s)
            self._regions.insert(k, Region(s, e, cache, i, origin, delta, pid))
        self._rebuild()

    def remove(self, cache: Cache) -> None:
        """Drop every region of cache."""
        self._regions = [r for r in self._regions if r.cache is not cache]
        self._rebuild()

    def locate(self, addrs: Sequence[int], lo: int, hi: int) -> Tuple[List[Optional[Region]], int]:
        """The region holding [a+lo, a+hi) for each a, and the position of the first address
        whose range fits no single region (-1 when all fit)."""
        idx, bad = _core.locate(self._starts, self._ends, list(addrs), lo, hi)
        regions = self._regions
        return [regions[i] if i is not None else None for i in idx], bad


class MemoryEntry:
    """What a cluster knows of one cache: its own, or a peer's as the peer described it."""

    __slots__ = ("cache", "origin", "remote_accessible", "base", "size", "placement", "keys",
                 "share", "alloc")

    def __init__(self, cache: Cache, origin: str, remote_accessible: bool, base: int = 0,
                 size: int = 0, share: Optional[dict] = None) -> None:
        self.cache = cache
        self.origin = origin
        self.remote_accessible = remote_accessible
        self.base = base              # the allocation holding the tensors (allocated caches)
        self.size = size
        self.placement = cache.cache_desc.placement
        self.keys: List[Union[CacheKey, BlocksCacheKey]] = []
        self.share = share            # how a peer on this host reaches it, or None
        self.alloc = base             # the runtime allocation to free (may start before base)


class ClusterMemory:
    """The caches of one cluster: entries by id, keys, and the regions for bounds checks."""

    def __init__(self) -> None:
        self.registry = MemoryRegistry()
        self.entries: Dict[int, MemoryEntry] = {}
        self.cache_keys: Dict[CacheKey, int] = {}
        self.blocks_keys: Dict[BlocksCacheKey, int] = {}
        # A cache's CacheKeys name its batch rows in order: the i-th key given names row i.
        self.key_rows: Dict[CacheKey, int] = {}

    def add(self, entry: MemoryEntry, keys: Sequence[Union[CacheKey, BlocksCacheKey]] = (),
            delta: int = 0, pid: int = 0) -> None:
        """Add a cache and its keys; overlapping memory or a key in use is refused."""
        for key in keys:
            table = self.cache_keys if isinstance(key, CacheKey) else self.blocks_keys
            if key in table:
                raise LLMException(f"cache key {key!r} is already in use",
                                   status_code=LLMStatusCode.LLM_PARAM_INVALID)
        if len(set(keys)) != len(keys):
            raise LLMException("the cache keys have duplicates",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID)
        self.registry.add(entry.cache, entry.origin, delta, pid)
        self.entries[entry.cache.cache_id] = entry
        row = 0
        for key in keys:
            table = self.cache_keys if isinstance(key, CacheKey) else self.blocks_keys
            table[key] = entry.cache.cache_id
            entry.keys.append(key)
            if isinstance(key, CacheKey):
                self.key_rows[key] = row
                row += 1

    def remove(self, cache_id: int) -> Optional[MemoryEntry]:
        """Drop a cache, its keys and its regions; returns its entry (None if unknown)."""
        entry = self.entries.pop(cache_id, None)
        if entry is None:
            return None
        self.registry.remove(entry.cache)
        for key in entry.keys:
            self.cache_keys.pop(key, None)
            self.blocks_keys.pop(key, None)
            self.key_rows.pop(key, None)
        return entry

    def remove_key(self, key: Union[CacheKey, BlocksCacheKey]) -> bool:
        table = self.cache_keys if isinstance(key, CacheKey) else self.blocks_keys
        cid = table.pop(key, None)
        if cid is None:
            return False
        self.key_rows.pop(key, None)
        self.entries[cid].keys.remove(key)
        return True
