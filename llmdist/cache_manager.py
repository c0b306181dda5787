"""CacheManager: the public API over a cluster's caches. Memory is the allocator's
(allocator.py), releases of caches and keys are releases.py's, transfers are the planner's
(transfers.py, with writes.py and reads.py), local copies are block_ops.py's."""

from __future__ import annotations

import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import _core, notifications, reads, writes
from ._check import check_int64, check_isinstance, check_uint32, require
from .allocator import CacheAllocator
from .block_ops import BlockOperations
from .descs import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
)
from .registry import ClusterMemory, MemoryEntry
from .releases import CacheReleases
from .status import LLMException, LLMStatusCode
from .task import CacheTask
from .transfer_types import (
    LayerSynchronizer,
    TransferConfig,
    TransferWithCacheKeyConfig,
)
from .transfers import Planner


def _ignore(call: str, ignored: Dict[str, object]) -> None:
    """Keyword arguments llmdist does not know are ignored, as upstream ignores them."""
    if ignored:
        warnings.warn(f"{call} ignores the keyword arguments {sorted(ignored)}", stacklevel=3)


class CacheManager:
    """Caches of one LLMDataDist: their memory, keys and block operations, and the public
    transfer calls, which the transfer planner (transfers) carries out. node is the cluster's
    ClusterNode: it announces caches to linked peers."""

    def __init__(
        self,
        cluster_id: int,
        runtime: "_core.Runtime",
        workers,
        options: Dict[str, str],
        remote_accessible: bool,
        sync_timeout: Optional[int],
        shareable: bool = False,
        node=None,
        max_inflight: int = 1024,
    ) -> None:
        self._node = node
        self._runtime = runtime
        self._remote_accessible = remote_accessible
        self._lock = threading.RLock()
        self._mem = ClusterMemory()
        self.transfers = Planner(
            cluster_id, runtime, workers, self._mem, self._lock, node, sync_timeout, max_inflight
        )
        self.allocator = CacheAllocator(runtime, options, shareable, self._mem, self._lock)
        self.block_ops = BlockOperations(runtime, self._mem, self._lock, self.transfers.check_open)
        self.releases = CacheReleases(
            cluster_id, self._mem, self._lock, self.transfers, self.allocator, node
        )

    @property
    def runtime(self) -> "_core.Runtime":
        """The runtime this cache manager allocates and copies with."""
        return self._runtime

    def entries(self) -> List[MemoryEntry]:
        """A snapshot of every cache this cluster holds (what it announces to a new peer)."""
        with self._lock:
            return list(self._mem.entries.values())

    # ------------------------------------------------------------------ memory

    def _check_open(self) -> None:
        self.transfers.check_open()

    @staticmethod
    def _check_keys(cache_keys) -> None:
        check_isinstance("cache_keys", cache_keys, (list, tuple))
        for i, key in enumerate(cache_keys):
            check_isinstance(f"cache_keys[{i}]", key, CacheKey)

    def allow_importer(self, pid: int) -> None:
        """Let the process pid (a peer on this host, by its bare_tgid) import the
        DEVICE caches exported here, now and later (ACL whitelists importers; CUDA does not)."""
        self.allocator.allow_importer(pid)

    def _announce(self, cache: Cache) -> Cache:
        """Tell linked peers about a new cache before it is handed to the caller."""
        if self._node is not None:
            self._node.announce_cache(self._mem.entries.get(cache.cache_id))
        return cache

    def allocate_cache(self, cache_desc: CacheDesc, cache_keys: Sequence[CacheKey] = ()) -> Cache:
        """Allocate a cache owned by llmdist, optionally reachable by CacheKeys."""
        self._check_open()
        self._check_keys(cache_keys)
        return self._announce(self.allocator.allocate(cache_desc, False, list(cache_keys)))

    def allocate_blocks_cache(
        self, cache_desc: CacheDesc, blocks_cache_key: Optional[BlocksCacheKey] = None
    ) -> Cache:
        """Allocate a blocks (paged) cache owned by llmdist, optionally reachable by key."""
        self._check_open()
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey, allow_none=True)
        keys = [] if blocks_cache_key is None else [blocks_cache_key]
        return self._announce(self.allocator.allocate(cache_desc, True, keys))

    def _register(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        is_blocks: bool,
        remote_accessible: Optional[bool],
        keys: list,
    ) -> Cache:
        self._check_open()
        return self._announce(
            self.allocator.register(cache_desc, addrs, is_blocks, remote_accessible, keys)
        )

    def register_cache(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        cache_keys: Sequence[CacheKey] = (),
        remote_accessible: Optional[bool] = None,
    ) -> Cache:
        """Wrap memory the caller owns (e.g. tensor.data_ptr() per tensor) as a cache."""
        self._check_keys(cache_keys)
        return self._register(cache_desc, addrs, False, remote_accessible, list(cache_keys))

    def register_blocks_cache(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        blocks_cache_key: Optional[BlocksCacheKey] = None,
        remote_accessible: Optional[bool] = None,
    ) -> Cache:
        """Wrap memory the caller owns as a blocks (paged) cache, optionally reachable by key."""
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey, allow_none=True)
        return self._register(
            cache_desc,
            addrs,
            True,
            remote_accessible,
            [] if blocks_cache_key is None else [blocks_cache_key],
        )

    def cancel_transfers_to(self, cluster_id: int, cache_id: Optional[int], code) -> None:
        """End the configs of in-flight transfers touching a cache of cluster_id (any cache
        when cache_id is None) and wait until their queued copies have landed."""
        self.transfers.cancel_to(cluster_id, cache_id, code)

    def deallocate_cache(self, cache: Cache) -> None:
        """Free a cache from allocate_cache; transfers still using it end with
        LLM_KV_CACHE_NOT_EXIST before the memory goes. While CacheKeys name it, the free waits
        until each key is pulled or removed (as upstream), or finalize."""
        self.releases.deallocate(cache)

    def deallocate_blocks_cache(self, cache: Cache) -> None:
        """Free a cache from allocate_blocks_cache (see deallocate_cache)."""
        self.releases.deallocate_blocks(cache)

    def unregister_cache(self, cache_id: int) -> None:
        """Forget a registered cache; no transfer writes into or reads from it afterwards,
        here or on a linked peer. An id that names no cache (e.g. unregistered already) is not
        an error, as upstream."""
        self.releases.unregister(cache_id)

    def remove_cache_key(self, cache_key: Union[CacheKey, BlocksCacheKey]) -> None:
        """Drop a key; the cache itself stays, unless deallocate_cache deferred its free and
        this was its last CacheKey. A key that does not exist (e.g. released by a pull) is
        not an error, as upstream."""
        check_isinstance("cache_key", cache_key, (CacheKey, BlocksCacheKey))
        self._check_open()
        self.release_key(cache_key)

    def release_key(self, key: Union[CacheKey, BlocksCacheKey]) -> None:
        """Drop key here and on linked peers (remove_cache_key, or a pull by the key); then
        free its cache if deallocate_cache deferred that and no CacheKey names it any more."""
        taken = self.take_key(key)
        if taken is not None:
            self.finish_key_release(key, taken)

    def take_key(self, key: Union[CacheKey, BlocksCacheKey]) -> Optional[Tuple[MemoryEntry, bool]]:
        """The first half of release_key, here only: (its cache, whether to free it now), or
        None when no cache holds key."""
        return self.releases.take_key(key)

    def finish_key_release(
        self, key: Union[CacheKey, BlocksCacheKey], taken: Tuple[MemoryEntry, bool]
    ) -> None:
        """The second half of release_key: withdraw key from peers, free a deferred cache."""
        self.releases.finish_key_release(key, taken)

    # ------------------------------------------------------------------ transfer

    def transfer_cache_async(
        self,
        src_cache: Cache,
        layer_synchronizer: LayerSynchronizer,
        transfer_configs: Sequence[Union[TransferConfig, TransferWithCacheKeyConfig]],
        src_block_indices: Optional[Sequence[int]] = None,
        dst_block_indices: Optional[Sequence[int]] = None,
        dst_block_memory_size: Optional[int] = None,
        *,
        tensor_num_per_layer: int = 2,
        notify: Optional[bytes] = None,
    ) -> CacheTask:
        """Send src_cache layer by layer as layer_synchronizer releases each layer; returns at
        once with a CacheTask. All checks of the contract run here, before anything moves.
        tensor_num_per_layer (an llmdist extension): 2 for K and V per layer, 1 for caches of
        one tensor per layer (MLA). notify (an llmdist extension): a payload each destination
        cluster receives once every config succeeded (see send_notification)."""
        notice = None
        if notify is not None:
            payload = notifications.check_payload("notify", notify)
            check_isinstance("transfer_configs", transfer_configs, (list, tuple))
            notice = self.transfers.task_notice(transfer_configs, payload)
        job, n = writes.start_write(
            self.transfers,
            src_cache,
            layer_synchronizer,
            transfer_configs,
            src_block_indices,
            dst_block_indices,
            dst_block_memory_size,
            tensor_num_per_layer,
            True,
            self._remote_accessible,
            notice=notice,
        )
        if notice is not None and job is None:
            notice.fire(True)  # no config: nothing to wait for
        return CacheTask(job, n, notice)

    # ------------------------------------------------------------------ pull and push

    def pull_blocks(
        self,
        src_cache_key: Union[CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey],
        dst_cache: Cache,
        src_blocks: Sequence[int] = (),
        dst_blocks: Sequence[int] = (),
        src_layer_range: Optional[range] = None,
        dst_layer_range: Optional[range] = None,
        tensor_num_per_layer: int = 2,
        *,
        notify: Optional[bytes] = None,
        **ignored: object,
    ) -> None:
        """Copy blocks of the cache src_cache_key names (on a linked cluster or this one) into
        blocks of dst_cache, synchronously. A BlocksCacheKey copies src_blocks[j] to
        dst_blocks[j]; a CacheKey / CacheKeyByIdAndIndex cuts the source row into dst_blocks
        (src_blocks empty). Layer l is tensors [l*t, (l+1)*t) with t = tensor_num_per_layer.
        notify: a payload the source's cluster receives once the bytes are read out of it."""
        _ignore("pull_blocks", ignored)
        if notify is None and type(src_cache_key) is BlocksCacheKey:
            # a shape pulled before from this cluster: one compiled step (LocalPull)
            local = self.transfers.memo.local_pull(
                src_cache_key, dst_cache, src_layer_range, dst_layer_range, tensor_num_per_layer
            )
            if local is not None and local.run(src_blocks, dst_blocks):
                return
        check_isinstance(
            "src_cache_key", src_cache_key, (CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey)
        )
        self._pull(
            "pull_blocks",
            src_cache_key,
            dst_cache,
            src_blocks,
            dst_blocks,
            None,
            -1,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            notify,
        )

    def pull_cache(
        self,
        cache_key: Union[CacheKey, CacheKeyByIdAndIndex],
        cache: Cache,
        batch_index: int = 0,
        size: int = -1,
        src_layer_range: Optional[range] = None,
        dst_layer_range: Optional[range] = None,
        tensor_num_per_layer: int = 2,
        *,
        notify: Optional[bytes] = None,
        **ignored: object,
    ) -> None:
        """Copy the row cache_key names into row batch_index of the non-blocks cache,
        synchronously; size bytes of each tensor's row (-1: all of it). In remote-accessible
        mode only a CacheKeyByIdAndIndex names the source. notify: as for pull_blocks."""
        _ignore("pull_cache", ignored)
        allowed = (
            (CacheKeyByIdAndIndex,) if self._remote_accessible else (CacheKey, CacheKeyByIdAndIndex)
        )
        check_isinstance("cache_key", cache_key, allowed)
        check_isinstance("cache", cache, Cache)
        check_uint32("batch_index", batch_index)
        check_int64("size", size)
        require(size == -1 or size > 0, f"size must be -1 or > 0, but got {size}")
        self._pull(
            "pull_cache",
            cache_key,
            cache,
            (),
            (),
            batch_index,
            size,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            notify,
        )

    def _pull(
        self,
        what: str,
        key,
        dst_cache: Cache,
        src_blocks,
        dst_blocks,
        dst_row: Optional[int],
        size: int,
        src_range: Optional[range],
        dst_range: Optional[range],
        tpl: int,
        notify: Optional[bytes],
    ) -> None:
        """A pull, then the release of a CacheKey it read by (as upstream: here, or on the
        peer) and the notification."""
        payload = None if notify is None else notifications.check_payload("notify", notify)
        peer = reads.pull(
            self.transfers,
            what,
            key,
            dst_cache,
            src_blocks,
            dst_blocks,
            dst_row,
            size,
            src_range,
            dst_range,
            tpl,
        )
        if type(key) is CacheKey:
            if peer is None:
                self.release_key(key)
            else:
                peer.pulled_by_key(key)
        if payload is not None:
            self.transfers.notify_now(key.cluster_id, payload, what)

    def push_blocks(
        self,
        dst_cache_key: BlocksCacheKey,
        src_cache: Cache,
        src_blocks: Sequence[int] = (),
        dst_blocks: Sequence[int] = (),
        src_layer_range: Optional[range] = None,
        dst_layer_range: Optional[range] = None,
        tensor_num_per_layer: int = 2,
        *,
        notify: Optional[bytes] = None,
        **ignored: object,
    ) -> None:
        """Write blocks of the blocks cache src_cache into blocks of the cache dst_cache_key
        names, synchronously (remote-accessible mode). src_blocks empty: block 0 is cut into
        dst_blocks of the destination's block size. notify: a payload the destination's
        cluster receives once the bytes are in its memory."""
        _ignore("push_blocks", ignored)
        require(self._remote_accessible, "push_blocks needs enable_remote_cache_accessible")
        check_isinstance("dst_cache_key", dst_cache_key, BlocksCacheKey)
        check_isinstance("src_cache", src_cache, Cache)
        check_isinstance("src_blocks", src_blocks, (list, tuple))
        check_isinstance("dst_blocks", dst_blocks, (list, tuple))
        require(src_cache.is_blocks_cache, f"src_cache {src_cache.cache_id} must be a blocks cache")
        require(len(dst_blocks) > 0, "dst_blocks must not be empty")
        self._push(
            "push_blocks",
            dst_cache_key,
            src_cache,
            list(src_blocks),
            list(dst_blocks),
            0,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            notify,
        )

    def push_cache(
        self,
        dst_cache_key: CacheKeyByIdAndIndex,
        src_cache: Cache,
        src_batch_index: int = 0,
        src_layer_range: Optional[range] = None,
        dst_layer_range: Optional[range] = None,
        size: int = -1,
        tensor_num_per_layer: int = 2,
        *,
        notify: Optional[bytes] = None,
        **ignored: object,
    ) -> None:
        """Write row src_batch_index of the non-blocks src_cache into the row dst_cache_key
        names, synchronously (remote-accessible mode; size must be -1, the whole row).
        notify: as for push_blocks."""
        _ignore("push_cache", ignored)
        require(self._remote_accessible, "push_cache needs enable_remote_cache_accessible")
        check_isinstance("dst_cache_key", dst_cache_key, CacheKeyByIdAndIndex)
        check_isinstance("src_cache", src_cache, Cache)
        check_uint32("src_batch_index", src_batch_index)
        require(
            not src_cache.is_blocks_cache,
            f"src_cache {src_cache.cache_id} must not be a blocks cache (use push_blocks)",
        )
        check_int64("size", size)
        require(size == -1, f"size must be -1 (the whole row), but got {size}")
        self._push(
            "push_cache",
            dst_cache_key,
            src_cache,
            None,
            None,
            src_batch_index,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            notify,
        )

    def _push(
        self,
        what: str,
        key,
        src_cache: Cache,
        src_blocks,
        dst_blocks,
        src_batch_index: int,
        src_range: Optional[range],
        dst_range: Optional[range],
        tpl: int,
        notify: Optional[bytes],
    ) -> None:
        """A push, then the notification."""
        check_isinstance("src_cache", src_cache, Cache)
        payload = None if notify is None else notifications.check_payload("notify", notify)
        writes.push(
            self.transfers,
            what,
            key,
            src_cache,
            src_blocks,
            dst_blocks,
            src_batch_index,
            src_range,
            dst_range,
            tpl,
            self._remote_accessible,
        )
        if payload is not None:
            self.transfers.notify_now(key.cluster_id, payload, what)

    # ------------------------------------------------------------------ local block operations

    def copy_blocks(self, cache: Cache, copy_block_info: Dict[int, List[int]]) -> None:
        """Copy blocks inside one blocks cache, in every tensor: block s to each block in
        copy_block_info[s]. Synchronous; a block may not be both read and written."""
        self.block_ops.copy_blocks(cache, copy_block_info)

    def copy_cache(
        self,
        dst: Cache,
        src: Cache,
        dst_batch_index: int = 0,
        src_batch_index: int = 0,
        offset: int = 0,
        size: int = -1,
        req_id: Optional[int] = None,
    ) -> None:
        """Copy bytes [offset, offset + size) of row src_batch_index of every tensor of src to
        the same bytes of row dst_batch_index of dst (size -1: the rest of the row).
        Synchronous; req_id is accepted for compatibility and only logged."""
        self.block_ops.copy_cache(dst, src, dst_batch_index, src_batch_index, offset, size, req_id)

    def swap_blocks(self, src_cache: Cache, dst_cache: Cache, src_to_dst: Dict[int, int]) -> None:
        """Copy blocks between a HOST and a DEVICE blocks cache (swap out or in): block s of
        every source tensor to block src_to_dst[s]. The DEVICE cache is one of this manager's;
        the HOST one may also come from Cache.create_cpu_cache. Synchronous."""
        self.block_ops.swap_blocks(src_cache, dst_cache, src_to_dst)

    def remap_registered_memory(self, mem_infos) -> None:
        """Not supported: upstream reserves it for re-mapping the physical memory behind
        registered caches after a device memory fault, which llmdist does not handle."""
        raise LLMException(
            "remap_registered_memory is not supported yet: re-mapping registered memory "
            "after a device memory fault is reserved upstream and not implemented by "
            "llmdist",
            status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
        )

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """End every transfer (LLM_ENGINE_FINALIZED), then free llmdist-owned memory."""
        self.transfers.close()
        self.releases.release_all()
        self.block_ops.close()
