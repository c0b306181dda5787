"""CacheReleases: how the caches of a cluster and their keys go away.

A cache is released by deallocate or unregister, by the pull or removal of the last CacheKey
of a cache whose free deallocate_cache deferred (as upstream), or at finalize. Each release
ends the transfers touching the cache (LLM_KV_CACHE_NOT_EXIST), withdraws it from linked
peers, and only then frees memory llmdist allocated; of two threads releasing one cache, the
first frees it and the other gets LLM_KV_CACHE_NOT_EXIST."""

from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple, Union

from ._check import check_int64, check_isinstance, require
from .allocator import CacheAllocator
from .descs import BlocksCacheKey, Cache, CacheKey, invalidate
from .registry import ALLOCATED, REGISTERED, ClusterMemory, MemoryEntry
from .status import LLMException, LLMStatusCode
from .transfers import Planner

_NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST

log = logging.getLogger(__name__)


def _has_cache_key(entry: MemoryEntry) -> bool:
    return any(type(k) is CacheKey for k in entry.keys)


class CacheReleases:
    """Releases the caches and keys of one cache manager (mem, under its lock): transfers
    stop through transfers, peers hear of it through node (the ClusterNode; None: none)."""

    def __init__(
        self,
        cluster_id: int,
        mem: ClusterMemory,
        lock: threading.RLock,
        transfers: Planner,
        allocator: CacheAllocator,
        node,
    ) -> None:
        self._cluster_id = cluster_id
        self._mem = mem
        self._lock = lock
        self._transfers = transfers
        self._allocator = allocator
        self._node = node

    def release(self, entry: MemoryEntry) -> None:
        """Stop transfers touching the cache, withdraw it from peers, then forget and free it."""
        cid = entry.cache.cache_id
        with self._lock:
            # Two threads may release one cache at once: the first to remove it frees it.
            if self._mem.entries.get(cid) is not entry:
                raise LLMException(f"cache {cid} is already released", status_code=_NOT_EXIST)
            self._mem.remove(cid)
        self._transfers.cancel_driven_by(cid, _NOT_EXIST)
        self._transfers.cancel_to(self._cluster_id, cid, _NOT_EXIST)
        if self._node is not None:
            self._node.withdraw_cache(entry)
        invalidate(entry.cache)
        if entry.origin == ALLOCATED:
            self._allocator.release(entry)
        else:
            self._allocator.unexport(entry)

    def _release_unless_gone(self, entry: MemoryEntry) -> None:
        """release, where another thread releasing the cache meanwhile is no error."""
        try:
            self.release(entry)
        except LLMException as exc:
            if exc.status_code != _NOT_EXIST:
                raise

    def entry_of(self, name: str, cache: Cache, origin: str, blocks: bool) -> MemoryEntry:
        """The entry of cache, which must be of origin and (not) a blocks cache as blocks."""
        check_isinstance(name, cache, Cache)
        entry = self._mem.entries.get(cache.cache_id)
        require(
            entry is not None and entry.cache is cache,
            f"{name} {cache.cache_id} is not allocated by this cache manager",
            _NOT_EXIST,
        )
        require(
            entry.origin == origin,
            f"{name} {cache.cache_id} was {entry.origin}, not {origin}: use "
            f"{'unregister_cache' if entry.origin == REGISTERED else 'deallocate_cache'}",
        )
        require(
            cache.is_blocks_cache == blocks,
            f"{name} {cache.cache_id} is {'' if cache.is_blocks_cache else 'not '}a blocks cache",
        )
        return entry

    def deallocate(self, cache: Cache) -> None:
        """CacheManager.deallocate_cache: release now, or once no CacheKey names the cache."""
        entry = self.entry_of("cache", cache, ALLOCATED, False)
        with self._lock:
            require(
                not entry.deferred,
                f"cache {cache.cache_id} is already deallocated; it is freed once "
                f"its cache keys are pulled or removed",
                _NOT_EXIST,
            )
            if _has_cache_key(entry):
                entry.deferred = True
                return
        self.release(entry)

    def deallocate_blocks(self, cache: Cache) -> None:
        """CacheManager.deallocate_blocks_cache."""
        self.release(self.entry_of("cache", cache, ALLOCATED, True))

    def unregister(self, cache_id: int) -> None:
        """CacheManager.unregister_cache: an id that names no cache is no error."""
        check_int64("cache_id", cache_id)
        entry = self._mem.entries.get(cache_id)
        if entry is None:
            log.debug("unregister_cache: cache %d is not registered", cache_id)
            return
        require(
            entry.origin == REGISTERED,
            f"cache {cache_id} was allocated; free it with deallocate_cache or "
            f"deallocate_blocks_cache",
        )
        self._release_unless_gone(entry)  # unregistered meanwhile by another thread

    def take_key(self, key: Union[CacheKey, BlocksCacheKey]) -> Optional[Tuple[MemoryEntry, bool]]:
        """Drop key here: (its cache, whether to free it now), or None when no cache holds
        key."""
        with self._lock:
            entry, _ = self._mem.find(key)
            if entry is None or not self._mem.remove_key(key):
                return None
            return entry, entry.deferred and not _has_cache_key(entry)

    def finish_key_release(
        self, key: Union[CacheKey, BlocksCacheKey], taken: Tuple[MemoryEntry, bool]
    ) -> None:
        """After take_key: withdraw key from peers, free a deferred cache."""
        entry, free = taken
        if self._node is not None:
            self._node.withdraw_key(key)
        if free:
            self._release_unless_gone(entry)  # released meanwhile (finalize)

    def release_all(self) -> None:
        """Release every cache (finalize); those released meanwhile by another thread are
        left alone."""
        for entry in list(self._mem.entries.values()):
            self._release_unless_gone(entry)
