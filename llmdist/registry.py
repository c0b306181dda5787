"""The memory a cluster registered or allocated, one region per cache tensor.

Every destination byte range of a transfer must fall inside one region; the lookup runs in C
over sorted arrays of region bounds."""

from __future__ import annotations

import bisect
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from .descs import Cache
from .status import LLMException, LLMStatusCode

ALLOCATED = "allocated"
REGISTERED = "registered"


class Region:
    """One tensor of a cache: [start, end) plus what the placement rules need to know."""

    __slots__ = ("start", "end", "cache", "tensor_index", "origin")

    def __init__(self, start: int, end: int, cache: Cache, tensor_index: int, origin: str) -> None:
        self.start = start
        self.end = end
        self.cache = cache
        self.tensor_index = tensor_index
        self.origin = origin


class MemoryRegistry:
    """Sorted, non-overlapping regions of one cluster."""

    def __init__(self) -> None:
        self._regions: List[Region] = []
        self._starts = np.empty(0, dtype=np.uint64)
        self._ends = np.empty(0, dtype=np.uint64)

    def _rebuild(self) -> None:
        self._starts = np.array([r.start for r in self._regions], dtype=np.uint64)
        self._ends = np.array([r.end for r in self._regions], dtype=np.uint64)

    def add(self, cache: Cache, origin: str) -> None:
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
            self._regions.insert(k, Region(s, e, cache, i, origin))
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
