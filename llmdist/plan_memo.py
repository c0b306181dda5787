"""What a transfer config resolved to, kept for the next call of the same
shape: the destination regions' byte window, the (cluster, cache) pairs it touches and the
layer loop's ConfigPlan. Every entry belongs to one generation of the cluster's memory
(ClusterMemory.generation, bumped by every add, remove and key release), so that nothing
resolved before a change is used after it; the caller still checks each call's byte range
against the window, the one part of the resolution that depends on the block indices.

A config reaching a peer's memory is kept on the host runtime's direct path only, under the
peer object (a new link is a new object) and the generation of the peer's ClusterMemory, which
changes with every cache or key the peer announces or withdraws; the link's state is checked
on every call before the memo is read."""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

from . import _core
from .cache_keys import BlocksCacheKey
from .data_path import PeerPath
from .descs import Cache
from .registry import ClusterMemory, Region

MAX_ENTRIES = 64  # shapes kept per generation; a full memo starts again empty


class Resolved:
    """One config's resolution: byte offsets [lo_min, hi_max) from each tensor's base fit its
    region; held is what the key's identity parts refer to (kept alive so that their ids
    cannot be reused while the entry exists)."""

    __slots__ = ("held", "lo_min", "hi_max", "touched", "config", "extra")

    def __init__(
        self, held: Any, lo_min: int, hi_max: int, touched: frozenset, config, extra: Any = None
    ) -> None:
        self.held = held
        self.lo_min = lo_min
        self.hi_max = hi_max
        self.touched = touched
        self.config = config
        self.extra = extra

    def fits(self, lo: int, hi: int) -> bool:
        """Whether every tensor's [base + lo, base + hi) lies in its region (an empty range is
        left to the full check)."""
        return self.lo_min <= lo < hi <= self.hi_max


def memo_scope(peer, runtime) -> Optional[tuple]:
    """The part of a memo key naming whose memory a config reaches: () for this cluster's,
    (peer, its memory's generation) for a peer on the host runtime's direct path; None when
    the config is not kept (device IPC imports and engine channels are per call)."""
    if peer is None:
        return ()
    if not runtime.is_host or peer.path is not PeerPath.DIRECT:
        return None
    return (peer, peer.mem.generation)


def region_window(addrs: Sequence[int], regions: Sequence[Region]) -> Tuple[int, int]:
    """The byte offsets [lo, hi) from each address that stay inside its region (regions[i]
    holds addrs[i]) for every address at once."""
    lo = max(r.start - a for a, r in zip(addrs, regions))
    hi = min(r.end - a for a, r in zip(addrs, regions))
    return lo, hi


class PlanMemo:
    """Resolutions of one cluster's configs, valid for one generation of its memory."""

    def __init__(self, mem: ClusterMemory) -> None:
        self._mem = mem
        self._generation = mem.generation
        self._entries: Dict[Hashable, Resolved] = {}
        # (destination cache, key fields, layer ranges, tensors per layer) -> LocalPull
        self._pulls: Dict[tuple, "_core.LocalPull"] = {}

    def _renew(self) -> None:
        """Forget everything resolved in an earlier generation (lock held)."""
        if self._generation != self._mem.generation:
            self._entries.clear()
            self._pulls.clear()
            self._generation = self._mem.generation

    def get(self, key: Hashable) -> Optional[Resolved]:
        """The resolution stored under key in the current generation, or None."""
        if self._generation != self._mem.generation:
            self._renew()
            return None
        return self._entries.get(key)

    def put(self, key: Hashable, resolved: Resolved) -> None:
        """Store a resolution made in the current generation (call get first, holding the
        same lock)."""
        self._renew()
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = resolved

    def local_pull(
        self, key: BlocksCacheKey, dst_cache, src_range, dst_range, tpl
    ) -> Optional["_core.LocalPull"]:
        """The LocalPull kept for pull_blocks(key, dst_cache, ..., src_range, dst_range, tpl)
        of this cluster, or None (no lock needed: the LocalPull checks the generation). Only
        plain arguments are looked up, so that no user type's hash or equality runs here."""
        if (
            type(dst_cache) is not Cache
            or type(tpl) is not int
            or (src_range is not None and type(src_range) is not range)
            or (dst_range is not None and type(dst_range) is not range)
        ):
            return None
        return self._pulls.get((dst_cache, key.cluster_id, key.model_id, src_range, dst_range, tpl))

    def keep_local_pull(
        self, key: BlocksCacheKey, dst_cache, src_range, dst_range, tpl, pull: "_core.LocalPull"
    ) -> None:
        """Keep a LocalPull made in the current generation (lock held)."""
        self._renew()
        if len(self._pulls) >= MAX_ENTRIES:
            self._pulls.clear()
        self._pulls[(dst_cache, key.cluster_id, key.model_id, src_range, dst_range, tpl)] = pull
