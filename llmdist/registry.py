"""The memory a cluster registered or allocated, one region per cache tensor.

Every byte range a transfer moves must fall inside one region: inside the tensor of the cache a
key names, or, for raw destination addresses, inside any region. Registrations may overlap
(two caches over views of one buffer, as upstream allows): regions go into layers of disjoint
regions, each kept sorted in chunks of a bounded size, so that finding, adding and removing one
costs O(log n) per layer with thousands of caches held."""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from . import _core
from .descs import BlocksCacheKey, Cache, CacheKey, CacheKeyByIdAndIndex, tensor_addrs_of
from .status import LLMException, LLMStatusCode

if TYPE_CHECKING:
    from .shares import Share

ALLOCATED = "allocated"
REGISTERED = "registered"

ADDRESS_END = 1 << 64  # one past the last byte of a 64-bit address space
_CHUNK = 256  # a chunk holds up to 2 * _CHUNK regions


class Region:
    """One tensor of a cache: [start, end) in its owner's address space, plus what the
    placement rules and the data path need: delta turns an address into one this process can
    write (0 for its own memory), pid names a peer process written with process writes."""

    __slots__ = ("start", "end", "cache", "tensor_index", "origin", "delta", "pid")

    def __init__(
        self,
        start: int,
        end: int,
        cache: Cache,
        tensor_index: int,
        origin: str,
        delta: int = 0,
        pid: int = 0,
    ) -> None:
        self.start = start
        self.end = end
        self.cache = cache
        self.tensor_index = tensor_index
        self.origin = origin
        self.delta = delta
        self.pid = pid


class DisjointRegions:
    """Sorted, non-overlapping, non-empty regions: chunks of consecutive regions, each with its
    sorted starts and last bytes, and the first start of every chunk to bisect. Lookups for
    transfers run in C (_core.locate) over the same arrays: the starts and last bytes are
    array('Q'), C integers that a search reads without touching a Python int."""

    def __init__(self) -> None:
        self._firsts = array("Q")
        self._starts: List[array] = []
        self._lasts: List[array] = []
        self._regions: List[List[Region]] = []

    def __len__(self) -> int:
        return sum(len(c) for c in self._starts)

    def _last_at_or_before(self, addr: int) -> Optional[Region]:
        """The region with the largest start <= addr, or None."""
        c = bisect_right(self._firsts, addr) - 1
        if c < 0:
            return None
        return self._regions[c][bisect_right(self._starts[c], addr) - 1]

    def _overlapping(self, start: int, end: int) -> Optional[Region]:
        """A region sharing a byte with [start, end), or None. Regions are disjoint, so the
        last one starting before end also ends last among them."""
        r = self._last_at_or_before(end - 1)
        return r if r is not None and r.end > start else None

    def overlapping_all(self, start: int, end: int) -> List[Region]:
        """Every region sharing a byte with [start, end), last first."""
        out: List[Region] = []
        c = bisect_right(self._firsts, end - 1) - 1
        while c >= 0:
            regions = self._regions[c]
            k = bisect_right(self._starts[c], end - 1) - 1
            while k >= 0:
                if regions[k].end <= start:
                    return out
                out.append(regions[k])
                k -= 1
            c -= 1
        return out

    def _insert(self, r: Region) -> None:
        if not self._firsts:
            self._firsts.append(r.start)
            self._starts.append(array("Q", [r.start]))
            self._lasts.append(array("Q", [r.end - 1]))
            self._regions.append([r])
            return
        c = max(bisect_right(self._firsts, r.start) - 1, 0)
        starts, lasts, regions = self._starts[c], self._lasts[c], self._regions[c]
        k = bisect_right(starts, r.start)
        starts.insert(k, r.start)
        lasts.insert(k, r.end - 1)
        regions.insert(k, r)
        self._firsts[c] = starts[0]
        if len(starts) > 2 * _CHUNK:
            self._starts.insert(c + 1, starts[_CHUNK:])
            self._lasts.insert(c + 1, lasts[_CHUNK:])
            self._regions.insert(c + 1, regions[_CHUNK:])
            self._firsts.insert(c + 1, starts[_CHUNK])
            del starts[_CHUNK:], lasts[_CHUNK:], regions[_CHUNK:]

    def _delete(self, start: int, cache: Cache) -> bool:
        """Drop the region of cache starting at start; False when this holds none."""
        c = bisect_right(self._firsts, start) - 1
        if c < 0:
            return False
        starts, lasts, regions = self._starts[c], self._lasts[c], self._regions[c]
        k = bisect_left(starts, start)
        if k == len(starts) or starts[k] != start or regions[k].cache is not cache:
            return False
        del starts[k], lasts[k], regions[k]
        if starts:
            self._firsts[c] = starts[0]
        else:
            del self._firsts[c], self._starts[c], self._lasts[c], self._regions[c]
        return True

    def locate(self, addrs: Sequence[int], lo: int, hi: int) -> Tuple[List[Optional[Region]], int]:
        """The region holding [a+lo, a+hi) for each a, and the position of the first address
        whose range fits no single region (-1 when all fit)."""
        if type(addrs) is not list:
            addrs = list(addrs)
        return _core.locate(self._firsts, self._starts, self._lasts, self._regions, addrs, lo, hi)


class MemoryRegistry:
    """The regions of one cluster, in layers of disjoint regions: a region goes into the first
    layer it does not overlap, so a cluster without overlapping registrations has one layer
    and every lookup is one C pass."""

    def __init__(self) -> None:
        self._layers: List[DisjointRegions] = [DisjointRegions()]

    def __len__(self) -> int:
        return sum(len(layer) for layer in self._layers)

    @property
    def disjoint(self) -> bool:
        """Whether no two regions overlap: then an address lies in one region at most."""
        return len(self._layers) == 1

    def add(self, cache: Cache, origin: str, delta: int = 0, pid: int = 0) -> List[Region]:
        """Add every tensor of cache and return its regions in tensor order. Tensors of one
        cache must not overlap each other; they may overlap other caches' tensors, except that
        registered memory may not overlap memory llmdist allocated (llmdist frees that)."""
        size = cache.cache_desc.size
        new = sorted((a, a + size, i) for i, a in enumerate(tensor_addrs_of(cache)))
        for s, e, i in new:
            if e > ADDRESS_END:
                raise LLMException(
                    f"tensor {i} at {s:#x} ({size} bytes) runs past the end of the 64-bit "
                    f"address space",
                    status_code=LLMStatusCode.LLM_PARAM_INVALID,
                )
        for (s0, e0, i0), (s1, _, i1) in zip(new, new[1:]):
            if s1 < e0:
                raise LLMException(
                    f"tensor {i1} at {s1:#x} overlaps tensor {i0} at {s0:#x} of the same cache "
                    f"(each tensor is {size} bytes)",
                    status_code=LLMStatusCode.LLM_PARAM_INVALID,
                )
        if origin == REGISTERED:
            for s, e, i in new:
                for layer in self._layers:
                    for r in layer.overlapping_all(s, e):
                        if r.origin == ALLOCATED:
                            raise LLMException(
                                f"tensor {i} at {s:#x} ({size} bytes) overlaps tensor "
                                f"{r.tensor_index} of cache {r.cache.cache_id}, which llmdist "
                                f"allocated: memory llmdist owns cannot be registered",
                                status_code=LLMStatusCode.LLM_PARAM_INVALID,
                            )
        out: List[Optional[Region]] = [None] * len(new)
        for s, e, i in new:
            r = Region(s, e, cache, i, origin, delta, pid)
            for layer in self._layers:
                if layer._overlapping(s, e) is None:
                    break
            else:
                layer = DisjointRegions()
                self._layers.append(layer)
            layer._insert(r)
            out[i] = r
        return out

    def remove(self, cache: Cache) -> None:
        """Drop every region of cache."""
        layers = self._layers
        for a in tensor_addrs_of(cache):
            for layer in layers:
                if layer._delete(a, cache):
                    break
        while len(layers) > 1 and not len(layers[-1]):
            layers.pop()

    def locate(self, addrs: Sequence[int], lo: int, hi: int) -> Tuple[List[Optional[Region]], int]:
        """A region holding [a+lo, a+hi) for each a (with overlapping registrations, any of
        those that hold it), and the position of the first address whose range fits no single
        region (-1 when all fit)."""
        out, bad = self._layers[0].locate(addrs, lo, hi)
        if bad < 0 or len(self._layers) == 1:
            return out, bad
        for i in range(bad, len(addrs)):
            for layer in self._layers:
                found, miss = layer.locate(addrs[i : i + 1], lo, hi)
                if miss < 0:
                    out[i] = found[0]
                    break
            else:
                return out, i
        return out, -1


class MemoryEntry:
    """What a cluster knows of one cache: its own, or a peer's as the peer described it."""

    __slots__ = (
        "cache",
        "origin",
        "remote_accessible",
        "base",
        "size",
        "placement",
        "keys",
        "share",
        "alloc",
        "regions",
        "deferred",
    )

    def __init__(
        self,
        cache: Cache,
        origin: str,
        remote_accessible: bool,
        base: int = 0,
        size: int = 0,
        share: Optional["Share"] = None,
    ) -> None:
        self.cache = cache
        self.origin = origin
        self.remote_accessible = remote_accessible
        self.base = base  # the allocation holding the tensors (allocated caches)
        self.size = size
        self.placement = cache.cache_desc.placement
        self.keys: List[Union[CacheKey, BlocksCacheKey]] = []
        self.share = share  # how a peer on this host reaches it, or None
        self.alloc = base  # the runtime allocation to free (may start before base)
        self.regions: List[Region] = []  # one per tensor, in tensor order (once added)
        # deallocate_cache was called while CacheKeys named it: freed once the last one goes
        self.deferred = False

    def locate(self, first: int, stop: int, lo: int, hi: int) -> Tuple[List[Optional[Region]], int]:
        """Bounds inside this cache alone: the regions of tensors [first, stop) when [lo, hi)
        (bytes from each tensor's start) fits a tensor, else no region and position 0 (as
        MemoryRegistry.locate reports the first tensor that fits none)."""
        regions = self.regions[first:stop]
        if regions and not (0 <= lo <= hi <= self.cache.cache_desc.size):
            return [None] * len(regions), 0
        return regions, -1


class ClusterMemory:
    """The caches of one cluster: entries by id, keys, and the regions for bounds checks."""

    def __init__(self) -> None:
        self.registry = MemoryRegistry()
        self.entries: Dict[int, MemoryEntry] = {}
        self.cache_keys: Dict[CacheKey, int] = {}
        self.blocks_keys: Dict[BlocksCacheKey, int] = {}
        # A cache's CacheKeys name its batch rows in order: the i-th key given names row i.
        self.key_rows: Dict[CacheKey, int] = {}
        # bumped by every change of entries, keys or regions: what was resolved against an
        # older generation is not used (plan_memo)
        self.generation = 0

    def add(
        self,
        entry: MemoryEntry,
        keys: Sequence[Union[CacheKey, BlocksCacheKey]] = (),
        delta: int = 0,
        pid: int = 0,
    ) -> None:
        """Add a cache and its keys. A key already naming another cache moves to this one
        (the last registration wins, as upstream); duplicates within keys are refused."""
        if len(set(keys)) != len(keys):
            raise LLMException(
                "the cache keys have duplicates", status_code=LLMStatusCode.LLM_PARAM_INVALID
            )
        self.generation += 1
        entry.regions = self.registry.add(entry.cache, entry.origin, delta, pid)
        self.entries[entry.cache.cache_id] = entry
        row = 0
        for key in keys:
            table = self.cache_keys if isinstance(key, CacheKey) else self.blocks_keys
            old = table.get(key)
            if old is not None and old in self.entries:
                self.entries[old].keys.remove(key)
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
        self.generation += 1
        self.registry.remove(entry.cache)
        for key in entry.keys:
            self.cache_keys.pop(key, None)
            self.blocks_keys.pop(key, None)
            self.key_rows.pop(key, None)
        return entry

    def find(
        self, key: Union[CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey]
    ) -> Tuple[Optional[MemoryEntry], int]:
        """The cache a key names here (None when none does) and the row it names: the row of a
        CacheKeyByIdAndIndex, the i-th CacheKey of a cache names row i, a BlocksCacheKey row 0."""
        if isinstance(key, BlocksCacheKey):
            cid, row = self.blocks_keys.get(key), 0
        elif isinstance(key, CacheKeyByIdAndIndex):
            cid, row = key.cache_id, key.batch_index
        else:
            cid, row = self.cache_keys.get(key), self.key_rows.get(key, 0)
        return self.entries.get(cid) if cid is not None else None, row

    def remove_key(self, key: Union[CacheKey, BlocksCacheKey]) -> bool:
        table = self.cache_keys if isinstance(key, CacheKey) else self.blocks_keys
        cid = table.pop(key, None)
        if cid is None:
            return False
        self.generation += 1
        self.key_rows.pop(key, None)
        self.entries[cid].keys.remove(key)
        return True
