"""CacheManager: cache memory (allocate, register, keys) and layer-wise transfer_cache_async."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import _core, block_ops, device_ipc, notifications, reads, writes
from ._check import (
    check_int64,
    check_int_list,
    check_isinstance,
    check_uint32,
    check_uint64,
    require,
)
from .descs import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    Placement,
    fixed_copy,
    invalidate,
    is_live,
)
from .registry import ALLOCATED, REGISTERED, ClusterMemory, MemoryEntry
from .shares import DeviceIpcShare, DeviceIpcTensors, MemfdShare, ProcessShare, Share, Unshared
from .status import LLMException, LLMStatusCode
from .task import CacheTask
from .transfer_types import (
    LayerSynchronizer,
    TransferConfig,
    TransferWithCacheKeyConfig,
)
from .transfers import Planner, live_entry

_ALIGN = 64  # every tensor of an allocated cache starts 64-byte aligned (ACL's rule)
_MAX_BYTES = 1 << 64

log = logging.getLogger(__name__)

_PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
_NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def _fail(message: str, code: LLMStatusCode = _PARAM_INVALID) -> LLMException:
    return LLMException(message, status_code=code)


def _ignore(call: str, ignored: Dict[str, object]) -> None:
    """Keyword arguments llmdist does not know are ignored, as upstream ignores them."""
    if ignored:
        warnings.warn(f"{call} ignores the keyword arguments {sorted(ignored)}", stacklevel=3)


def _pool_cap(options: Dict[str, str], key: str) -> Optional[int]:
    text = options.get(key)
    if not text:
        return None
    try:
        size = json.loads(text)["memory_size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(f'option {key} must be JSON like {{"memory_size": N}}, got {text!r}') from exc
    if type(size) is not int or size <= 0:
        raise _fail(f"option {key}: memory_size must be a positive int, got {size!r}")
    return size


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
        self._cluster_id = cluster_id
        self._node = node
        self._runtime = runtime
        self._remote_accessible = remote_accessible
        self._sync_timeout = sync_timeout
        # Host-runtime memory of a listening cluster lives in shared memory (a sealed memfd,
        # passed to peers on this host over the Unix socket), so that they can map it and copy
        # straight into it. It has no name: nothing outlives the processes holding it.
        self._shareable = shareable and runtime.is_host
        # On a device runtime its DEVICE allocations are exported for device IPC instead, and
        # (ACL) every linked peer on this host may import them: their pids, for the whitelist.
        self._exportable = shareable and not runtime.is_host
        self._importers: set = set()
        self._lock = threading.RLock()
        self._mem = ClusterMemory()
        self._next_id = 1
        self.transfers = Planner(
            cluster_id, runtime, workers, self._mem, self._lock, node, sync_timeout, max_inflight
        )
        self._caps = {
            Placement.DEVICE: _pool_cap(options, "llm.MemPoolConfig"),
            Placement.HOST: _pool_cap(options, "llm.HostMemPoolConfig"),
        }
        self._used = {Placement.DEVICE: 0, Placement.HOST: 0}
        self._local = block_ops.LocalCopier(runtime)

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

    def _check_desc(self, cache_desc: CacheDesc) -> CacheDesc:
        """The desc to size a new cache with: a copy that cannot change (the caller's may,
        through update_dim or its shape list, even from another thread)."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        fixed = fixed_copy(cache_desc)
        require(fixed.num_tensors > 0, "cache_desc.num_tensors must be > 0")
        fixed.data_type.element_size  # DT_STRING has none: raises LLMException
        return fixed

    @staticmethod
    def _check_keys(cache_keys) -> None:
        check_isinstance("cache_keys", cache_keys, (list, tuple))
        for i, key in enumerate(cache_keys):
            check_isinstance(f"cache_keys[{i}]", key, CacheKey)

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    def _allocate(self, cache_desc: CacheDesc, is_blocks: bool, keys: Sequence) -> Cache:
        """Allocate and record a cache (lock held)."""
        cache_desc = self._check_desc(cache_desc)
        placement = cache_desc.placement
        piece = -(-cache_desc.size // _ALIGN) * _ALIGN
        total = piece * cache_desc.num_tensors
        require(
            total < _MAX_BYTES,
            f"cache_desc: {cache_desc.num_tensors} tensors of {cache_desc.size} bytes "
            f"({total} bytes with {_ALIGN}-byte alignment) do not fit a 64-bit address "
            f"space",
        )
        cap = self._caps[placement]
        if cap is not None and self._used[placement] + total > cap:
            code = (
                LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY
                if placement == Placement.DEVICE
                else LLMStatusCode.LLM_OUT_OF_MEMORY
            )
            raise _fail(
                f"allocating {total} bytes would exceed the configured "
                f"{placement.name.lower()} memory pool of {cap} bytes "
                f"({self._used[placement]} in use)",
                code,
            )
        cache_id = self._new_id()
        share = None
        if self._shareable:
            fd, base = _core.memfd_create(total)
            raw = base
            share = MemfdShare(fd, base, total)
        elif self._exportable and placement == Placement.DEVICE:
            raw, base, share = self._export_device(cache_id, total)
        else:
            base = raw = self._runtime.malloc(total, placement == Placement.DEVICE)
        addrs = [base + i * piece for i in range(cache_desc.num_tensors)]
        cache = Cache(cache_id, cache_desc, addrs, is_blocks)
        entry = MemoryEntry(cache, ALLOCATED, True, base, total, share)
        entry.alloc = raw
        try:
            self._mem.add(entry, keys)
        except LLMException:
            self._free(entry)
            raise
        self._used[placement] += total
        return cache

    def _export_device(self, cache_id: int, total: int) -> Tuple[int, int, Share]:
        """Allocate device memory for a cache and export it for device IPC (lock held).
        Returns (allocation, cache base, share); a cache that cannot be exported still works
        here, and its share tells peers why they cannot write into it."""
        rt = self._runtime
        why = rt.ipc_unavailable
        align = rt.ipc_align
        raw = base = rt.malloc(total, True)
        if why is None and raw % align:
            # exports start on a multiple of align (ACL: a page): take that much more
            rt.free(raw, True)
            raw = rt.malloc(total + align, True)
            base = -(-raw // align) * align
        if why is not None:
            return raw, base, Unshared(f"device IPC is not available: {why}")
        try:
            share = device_ipc.export(rt, base, total, sorted(self._importers))
        except LLMException as exc:
            log.warning("cache %d is not reachable from other processes: %s", cache_id, exc)
            return raw, base, Unshared(f"exporting it failed: {exc}")
        return raw, base, share

    def allow_importer(self, pid: int) -> None:
        """Let the process pid (a peer on this host, by its bare_tgid) import the
        DEVICE caches exported here, now and later (ACL whitelists importers; CUDA does not)."""
        kind = self._runtime.ipc_kind
        if kind is None:
            return
        with self._lock:
            if pid in self._importers:
                return
            self._importers.add(pid)
            pids = sorted(self._importers)
            for entry in self._mem.entries.values():
                for ident in device_ipc.export_ids(entry.share):
                    try:
                        self._runtime.ipc_allow(ident, pids)
                    except LLMException as exc:
                        log.warning(
                            "cache %d: process %d may not import it: %s",
                            entry.cache.cache_id,
                            pid,
                            exc,
                        )

    def _free(self, entry: MemoryEntry) -> None:
        if isinstance(entry.share, MemfdShare):
            _core.shm_unmap(entry.base, entry.size)
            os.close(entry.share.fd)
            return
        if isinstance(entry.share, DeviceIpcShare):
            # Peers closed their imports before acknowledging the withdrawal (or their link
            # ended); the export goes next, then the memory.
            try:
                device_ipc.close_export(self._runtime, entry.share)
            except LLMException as exc:
                log.warning(
                    "cache %d: closing its device IPC export failed, so its memory is "
                    "not freed (a peer may still map it): %s",
                    entry.cache.cache_id,
                    exc,
                )
                return
        self._runtime.free(entry.alloc, entry.placement == Placement.DEVICE)

    def _announce(self, cache: Cache) -> Cache:
        """Tell linked peers about a new cache before it is handed to the caller."""
        if self._node is not None:
            self._node.announce_cache(self._mem.entries.get(cache.cache_id))
        return cache

    def allocate_cache(self, cache_desc: CacheDesc, cache_keys: Sequence[CacheKey] = ()) -> Cache:
        """Allocate a cache owned by llmdist, optionally reachable by CacheKeys."""
        self._check_open()
        self._check_keys(cache_keys)
        with self._lock:
            cache = self._allocate(cache_desc, False, list(cache_keys))
        return self._announce(cache)

    def allocate_blocks_cache(
        self, cache_desc: CacheDesc, blocks_cache_key: Optional[BlocksCacheKey] = None
    ) -> Cache:
        """Allocate a blocks (paged) cache owned by llmdist, optionally reachable by key."""
        self._check_open()
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey, allow_none=True)
        with self._lock:
            cache = self._allocate(
                cache_desc, True, [] if blocks_cache_key is None else [blocks_cache_key]
            )
        return self._announce(cache)

    def _register(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        is_blocks: bool,
        remote_accessible: Optional[bool],
        keys: list,
    ) -> Cache:
        self._check_open()
        cache_desc = self._check_desc(cache_desc)
        checked = check_int_list("addrs", addrs, check_uint64)
        check_isinstance("remote_accessible", remote_accessible, bool, allow_none=True)
        require(
            len(checked) == cache_desc.num_tensors,
            f"addrs has {len(checked)} addresses but cache_desc.num_tensors is "
            f"{cache_desc.num_tensors}",
        )
        require(all(a != 0 for a in checked), "addrs must not contain a zero address")
        if remote_accessible is None:
            remote_accessible = cache_desc.placement == Placement.DEVICE
        with self._lock:
            cache = Cache(self._new_id(), cache_desc, list(checked), is_blocks)
            share: Share = ProcessShare()
            if self._exportable and cache_desc.placement == Placement.DEVICE:
                share = device_ipc.export_tensors(
                    self._runtime, checked, cache_desc.size, sorted(self._importers)
                )
            try:
                self._mem.add(MemoryEntry(cache, REGISTERED, remote_accessible, share=share), keys)
            except LLMException:
                if isinstance(share, DeviceIpcTensors):
                    device_ipc.close_tensors(self._runtime, share)
                raise
        return self._announce(cache)

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

    def _release(self, entry: MemoryEntry) -> None:
        """Stop transfers touching the cache, withdraw it from peers, then forget and free it."""
        cid = entry.cache.cache_id
        with self._lock:
            # Two threads may release one cache at once: the first to remove it frees it.
            if self._mem.entries.get(cid) is not entry:
                raise _fail(f"cache {cid} is already released", _NOT_EXIST)
            self._mem.remove(cid)
        self.transfers.cancel_driven_by(cid, _NOT_EXIST)
        self.transfers.cancel_to(self._cluster_id, cid, _NOT_EXIST)
        if self._node is not None:
            self._node.withdraw_cache(entry)
        invalidate(entry.cache)
        if entry.origin == ALLOCATED:
            self._free(entry)
            with self._lock:
                self._used[entry.placement] -= entry.size
        elif isinstance(entry.share, DeviceIpcTensors):
            device_ipc.close_tensors(self._runtime, entry.share)  # peers closed theirs

    def _entry_of(self, name: str, cache: Cache, origin: str, blocks: bool) -> MemoryEntry:
        check_isinstance(name, cache, Cache)
        entry = self._mem.entries.get(cache.cache_id)
        if entry is None or entry.cache is not cache:
            raise _fail(
                f"{name} {cache.cache_id} is not allocated by this cache manager", _NOT_EXIST
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

    def deallocate_cache(self, cache: Cache) -> None:
        """Free a cache from allocate_cache; transfers still using it end with
        LLM_KV_CACHE_NOT_EXIST before the memory goes. While CacheKeys name it, the free waits
        until each key is pulled or removed (as upstream), or finalize."""
        entry = self._entry_of("cache", cache, ALLOCATED, False)
        with self._lock:
            if entry.deferred:
                raise _fail(
                    f"cache {cache.cache_id} is already deallocated; it is freed once "
                    f"its cache keys are pulled or removed",
                    _NOT_EXIST,
                )
            if any(type(k) is CacheKey for k in entry.keys):
                entry.deferred = True
                return
        self._release(entry)

    def deallocate_blocks_cache(self, cache: Cache) -> None:
        """Free a cache from allocate_blocks_cache (see deallocate_cache)."""
        self._release(self._entry_of("cache", cache, ALLOCATED, True))

    def unregister_cache(self, cache_id: int) -> None:
        """Forget a registered cache; no transfer writes into or reads from it afterwards,
        here or on a linked peer. An id that names no cache (e.g. unregistered already) is not
        an error, as upstream."""
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
        try:
            self._release(entry)
        except LLMException as exc:
            if exc.status_code != _NOT_EXIST:  # unregistered meanwhile by another thread
                raise

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
        with self._lock:
            entry, _ = self._mem.find(key)
            if entry is None or not self._mem.remove_key(key):
                return None
            return entry, entry.deferred and not any(type(k) is CacheKey for k in entry.keys)

    def finish_key_release(
        self, key: Union[CacheKey, BlocksCacheKey], taken: Tuple[MemoryEntry, bool]
    ) -> None:
        """The second half of release_key: withdraw key from peers, free a deferred cache."""
        entry, free = taken
        if self._node is not None:
            self._node.withdraw_key(key)
        if free:
            try:
                self._release(entry)
            except LLMException as exc:
                if exc.status_code != _NOT_EXIST:  # released meanwhile (finalize)
                    raise

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

    def _live(self, name: str, cache: Cache) -> MemoryEntry:
        """The entry of a cache this manager still holds (lock held)."""
        return live_entry(self._mem, name, cache)

    def _pinned(self, entry: Optional[MemoryEntry]) -> bool:
        """Whether the runtime may copy this cache's host memory asynchronously: llmdist
        allocated it page-locked (memory the caller owns may be pageable)."""
        return entry is not None and entry.origin == ALLOCATED and not self._runtime.is_host

    def copy_blocks(self, cache: Cache, copy_block_info: Dict[int, List[int]]) -> None:
        """Copy blocks inside one blocks cache, in every tensor: block s to each block in
        copy_block_info[s]. Synchronous; a block may not be both read and written."""
        check_isinstance("cache", cache, Cache)
        pairs = block_ops.block_pairs("copy_block_info", copy_block_info, True)
        self._check_open()
        # The lock keeps the caches from being released while their bytes move.
        with self._lock:
            entry = self._live("cache", cache)
            self._local.run(block_ops.plan_copy_blocks(cache, pairs, self._pinned(entry)))

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
        block_ops.check_copy_cache_args(
            dst, src, dst_batch_index, src_batch_index, offset, size, req_id
        )
        self._check_open()
        with self._lock:
            src_entry = self._live("src", src)
            dst_entry = self._live("dst", dst)
            copy = block_ops.plan_copy_cache(
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
            self._local.run(copy)

    def swap_blocks(self, src_cache: Cache, dst_cache: Cache, src_to_dst: Dict[int, int]) -> None:
        """Copy blocks between a HOST and a DEVICE blocks cache (swap out or in): block s of
        every source tensor to block src_to_dst[s]. The DEVICE cache is one of this manager's;
        the HOST one may also come from Cache.create_cpu_cache. Synchronous."""
        pairs = block_ops.check_swap_args(src_cache, dst_cache, src_to_dst)
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
                    entries.append(self._live(name, cache))
            self._local.run(
                block_ops.plan_swap_blocks(
                    src_cache, dst_cache, pairs, self._pinned(entries[0]), self._pinned(entries[1])
                )
            )

    def remap_registered_memory(self, mem_infos) -> None:
        """Not supported: upstream reserves it for re-mapping the physical memory behind
        registered caches after a device memory fault, which llmdist does not handle."""
        raise _fail(
            "remap_registered_memory is not supported yet: re-mapping registered memory "
            "after a device memory fault is reserved upstream and not implemented by "
            "llmdist",
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
        )

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """End every transfer (LLM_ENGINE_FINALIZED), then free llmdist-owned memory."""
        self.transfers.close()
        for entry in list(self._mem.entries.values()):
            try:
                self._release(entry)
            except LLMException as exc:
                # Released meanwhile by another thread: nothing is left to do.
                if exc.status_code != _NOT_EXIST:
                    raise
        self._local.close()
