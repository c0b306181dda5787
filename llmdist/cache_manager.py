"""CacheManager: cache memory (allocate, register, keys) and layer-wise transfer_cache_async."""

from __future__ import annotations

import json
import logging
import operator
import os
import threading
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from . import _core, block_ops, device_ipc, notifications, pull_push
from ._core import CopyKind, Direction
from ._check import (check_int64, check_int_list, check_isinstance, check_uint32, check_uint64,
                     require)
from .descs import (BlocksCacheKey, Cache, CacheDesc, CacheKey, CacheKeyByIdAndIndex, Placement,
                    copy_kind)
from .registry import ALLOCATED, REGISTERED, ClusterMemory, MemoryEntry, Region
from .results import config_results
from .routes import LocalRoute, Route
from .shares import DeviceIpcShare, MemfdShare, ProcessShare, Share, Unshared
from .status import LLMException, LLMStatusCode
from .events import EventSynchronizer
from .task import CacheTask
from .transfer_types import LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig

if TYPE_CHECKING:
    from .cluster import ClusterNode

_ALIGN = 64  # every tensor of an allocated cache starts 64-byte aligned (ACL's rule)
_MAX_BYTES = 1 << 64
BUSY_WAIT_S = 0.2   # how long transfer_cache_async waits for a task to finish when at the bound

log = logging.getLogger(__name__)

_PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
_NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST



_REGION_CACHE = operator.attrgetter("cache")


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
        raise _fail(f"option {key} must be JSON like {{\"memory_size\": N}}, got {text!r}") from exc
    if type(size) is not int or size <= 0:
        raise _fail(f"option {key}: memory_size must be a positive int, got {size!r}")
    return size


class CacheManager:
    """Caches of one LLMDataDist and the transfers out of them. node is the cluster's
    ClusterNode: it announces caches to linked peers and gives the route to each."""

    def __init__(self, cluster_id: int, runtime: "_core.Runtime",
                 workers, options: Dict[str, str], remote_accessible: bool,
                 sync_timeout: Optional[int], shareable: bool = False,
                 node: Optional["ClusterNode"] = None, max_inflight: int = 1024) -> None:
        self._cluster_id = cluster_id
        self._node = node
        self._runtime = runtime
        self._local_route = LocalRoute(runtime)
        self._workers = workers
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
        # job -> (source cache key, [destination cache keys per config]); a key is
        # (cluster id, cache id).
        self._inflight: Dict[object, Tuple[Tuple[int, int], List[set]]] = {}
        # Tasks not finished yet, bounded by llmdist.max_inflight_tasks (see _take_slot).
        self._max_inflight = max_inflight
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._caps = {Placement.DEVICE: _pool_cap(options, "llm.MemPoolConfig"),
                      Placement.HOST: _pool_cap(options, "llm.HostMemPoolConfig")}
        self._used = {Placement.DEVICE: 0, Placement.HOST: 0}
        self._closed = False
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
        if self._closed:
            raise _fail("llm datadist is finalized", LLMStatusCode.LLM_ENGINE_FINALIZED)

    def _check_desc(self, cache_desc: CacheDesc) -> CacheDesc:
        """The desc to size a new cache with: a copy that cannot change (the caller's may,
        through update_dim or its shape list, even from another thread)."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        fixed = cache_desc._fixed_copy()
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
        require(total < _MAX_BYTES,
                f"cache_desc: {cache_desc.num_tensors} tensors of {cache_desc.size} bytes "
                f"({total} bytes with {_ALIGN}-byte alignment) do not fit a 64-bit address "
                f"space")
        cap = self._caps[placement]
        if cap is not None and self._used[placement] + total > cap:
            code = (LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY if placement == Placement.DEVICE
                    else LLMStatusCode.LLM_OUT_OF_MEMORY)
            raise _fail(f"allocating {total} bytes would exceed the configured "
                        f"{placement.name.lower()} memory pool of {cap} bytes "
                        f"({self._used[placement]} in use)", code)
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
        entry = MemoryEntry(cache, ALLOCATED, True,
                            base, total, share)
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
                if isinstance(entry.share, DeviceIpcShare) and entry.share.kind == kind:
                    try:
                        self._runtime.ipc_allow(entry.share.id, pids)
                    except LLMException as exc:
                        log.warning("cache %d: process %d may not import it: %s",
                                    entry.cache.cache_id, pid, exc)

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
                log.warning("cache %d: closing its device IPC export failed, so its memory is "
                            "not freed (a peer may still map it): %s", entry.cache.cache_id, exc)
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

    def allocate_blocks_cache(self, cache_desc: CacheDesc,
                              blocks_cache_key: Optional[BlocksCacheKey] = None) -> Cache:
        """Allocate a blocks (paged) cache owned by llmdist, optionally reachable by key."""
        self._check_open()
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey, allow_none=True)
        with self._lock:
            cache = self._allocate(cache_desc, True, [] if blocks_cache_key is None else [blocks_cache_key])
        return self._announce(cache)

    def _register(self, cache_desc: CacheDesc, addrs: Sequence[int], is_blocks: bool,
                  remote_accessible: Optional[bool], keys: list) -> Cache:
        self._check_open()
        cache_desc = self._check_desc(cache_desc)
        checked = check_int_list("addrs", addrs, check_uint64)
        check_isinstance("remote_accessible", remote_accessible, bool, allow_none=True)
        require(len(checked) == cache_desc.num_tensors,
                f"addrs has {len(checked)} addresses but cache_desc.num_tensors is "
                f"{cache_desc.num_tensors}")
        require(all(a != 0 for a in checked), "addrs must not contain a zero address")
        if remote_accessible is None:
            remote_accessible = cache_desc.placement == Placement.DEVICE
        with self._lock:
            cache = Cache(self._new_id(), cache_desc, list(checked), is_blocks)
            self._mem.add(MemoryEntry(cache, REGISTERED, remote_accessible,
                                      share=ProcessShare()), keys)
        return self._announce(cache)

    def register_cache(self, cache_desc: CacheDesc, addrs: Sequence[int],
                       cache_keys: Sequence[CacheKey] = (),
                       remote_accessible: Optional[bool] = None) -> Cache:
        """Wrap memory the caller owns (e.g. tensor.data_ptr() per tensor) as a cache."""
        self._check_keys(cache_keys)
        return self._register(cache_desc, addrs, False, remote_accessible, list(cache_keys))

    def register_blocks_cache(self, cache_desc: CacheDesc, addrs: Sequence[int],
                              blocks_cache_key: Optional[BlocksCacheKey] = None,
                              remote_accessible: Optional[bool] = None) -> Cache:
        """Wrap memory the caller owns as a blocks (paged) cache, optionally reachable by key."""
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey, allow_none=True)
        return self._register(cache_desc, addrs, True, remote_accessible,
                              [] if blocks_cache_key is None else [blocks_cache_key])

    def cancel_transfers_to(self, cluster_id: int, cache_id: Optional[int], code) -> None:
        """End the configs of in-flight transfers writing to a cache of cluster_id (any cache
        when cache_id is None) and wait until their queued copies have landed."""
        with self._lock:
            work = []
            for job, (src, dsts) in self._inflight.items():
                hit = [i for i, keys in enumerate(dsts)
                       if any(k[0] == cluster_id and (cache_id is None or k[1] == cache_id)
                              for k in keys)]
                if hit:
                    work.append((job, hit))
        for job, hit in work:
            job.cancel(code, hit)

    def _release(self, entry: MemoryEntry) -> None:
        """Stop transfers touching the cache, withdraw it from peers, then forget and free it."""
        cid = entry.cache.cache_id
        me = self._cluster_id
        with self._lock:
            # Two threads may release one cache at once: the first to remove it frees it.
            if self._mem.entries.get(cid) is not entry:
                raise _fail(f"cache {cid} is already released", _NOT_EXIST)
            self._mem.remove(cid)
            jobs = [job for job, (src, _) in self._inflight.items() if src == (me, cid)]
        for job in jobs:
            job.cancel(_NOT_EXIST)
        self.cancel_transfers_to(me, cid, _NOT_EXIST)
        if self._node is not None:
            self._node.withdraw_cache(entry)
        entry.cache._invalidate()
        if entry.origin == ALLOCATED:
            self._free(entry)
            with self._lock:
                self._used[entry.placement] -= entry.size

    def _entry_of(self, name: str, cache: Cache, origin: str, blocks: bool) -> MemoryEntry:
        check_isinstance(name, cache, Cache)
        entry = self._mem.entries.get(cache.cache_id)
        if entry is None or entry.cache is not cache:
            raise _fail(f"{name} {cache.cache_id} is not allocated by this cache manager", _NOT_EXIST)
        require(entry.origin == origin,
                f"{name} {cache.cache_id} was {entry.origin}, not {origin}: use "
                f"{'unregister_cache' if entry.origin == REGISTERED else 'deallocate_cache'}")
        require(cache.is_blocks_cache == blocks,
                f"{name} {cache.cache_id} is {'' if cache.is_blocks_cache else 'not '}a blocks cache")
        return entry

    def deallocate_cache(self, cache: Cache) -> None:
        """Free a cache from allocate_cache; transfers still using it end with
        LLM_KV_CACHE_NOT_EXIST before the memory goes. While CacheKeys name it, the free waits
        until each key is pulled or removed (as upstream), or finalize."""
        entry = self._entry_of("cache", cache, ALLOCATED, False)
        with self._lock:
            if entry.deferred:
                raise _fail(f"cache {cache.cache_id} is already deallocated; it is freed once "
                            f"its cache keys are pulled or removed", _NOT_EXIST)
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
        require(entry.origin == REGISTERED,
                f"cache {cache_id} was allocated; free it with deallocate_cache or "
                f"deallocate_blocks_cache")
        try:
            self._release(entry)
        except LLMException as exc:
            if exc.status_code != _NOT_EXIST:       # unregistered meanwhile by another thread
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

    def finish_key_release(self, key: Union[CacheKey, BlocksCacheKey],
                           taken: Tuple[MemoryEntry, bool]) -> None:
        """The second half of release_key: withdraw key from peers, free a deferred cache."""
        entry, free = taken
        if self._node is not None:
            self._node.withdraw_key(key)
        if free:
            try:
                self._release(entry)
            except LLMException as exc:
                if exc.status_code != _NOT_EXIST:     # released meanwhile (finalize)
                    raise

    # ------------------------------------------------------------------ transfer

    @staticmethod
    def _resolve_key(i: int, key, dst_layers: range, mem: ClusterMemory,
                     tpl: int = 2) -> Tuple[MemoryEntry, int]:
        """The destination entry of a keyed config and the byte offset inside each tensor."""
        entry, row = mem.find(key)
        if entry is None:
            raise _fail(f"transfer_configs[{i}]: no cache for {key!r} on cluster "
                        f"{key.cluster_id}", _NOT_EXIST)
        cid = entry.cache.cache_id
        require(entry.remote_accessible,
                f"transfer_configs[{i}]: cache {cid} is not remote accessible")
        desc = entry.cache.cache_desc
        require(desc.num_tensors % tpl == 0 and dst_layers.stop <= desc.num_tensors // tpl,
                f"transfer_configs[{i}]: dst_layer_range {dst_layers} is outside the "
                f"{desc.num_tensors // tpl} layers of {tpl} tensors of cache {cid}")
        require(row < desc.batch_size,       # a BlocksCacheKey names row 0
                f"transfer_configs[{i}]: batch_index {row} must be < the batch size "
                f"{desc.batch_size} of cache {cid}")
        return entry, row * desc.stride

    def transfer_cache_async(self, src_cache: Cache, layer_synchronizer: LayerSynchronizer,
                             transfer_configs: Sequence[Union[TransferConfig, TransferWithCacheKeyConfig]],
                             src_block_indices: Optional[Sequence[int]] = None,
                             dst_block_indices: Optional[Sequence[int]] = None,
                             dst_block_memory_size: Optional[int] = None, *,
                             tensor_num_per_layer: int = 2,
                             notify: Optional[bytes] = None) -> CacheTask:
        """Send src_cache layer by layer as layer_synchronizer releases each layer; returns at
        once with a CacheTask. All checks of the contract run here, before anything moves.
        tensor_num_per_layer (an llmdist extension): 2 for K and V per layer, 1 for caches of
        one tensor per layer (MLA). notify (an llmdist extension): a payload each destination
        cluster receives once every config succeeded (see send_notification)."""
        notice = None
        if notify is not None:
            payload = notifications.check_payload("notify", notify)
            check_isinstance("transfer_configs", transfer_configs, (list, tuple))
            targets, seen = [], set()
            for cfg in transfer_configs:
                cid = getattr(cfg, "dst_cluster_id", None)
                if isinstance(cid, int) and cid not in seen:
                    seen.add(cid)
                    targets.append(self._notify_target(cid))
            notice = notifications.TaskNotice(self._hub(), targets, payload)
        job, n = self._start_transfer(src_cache, layer_synchronizer, transfer_configs,
                                      src_block_indices, dst_block_indices,
                                      dst_block_memory_size, tensor_num_per_layer, True,
                                      notice=notice)
        if notice is not None and job is None:
            notice.fire(True)       # no config: nothing to wait for
        return CacheTask(job, n, notice)

    def _start_transfer(self, src_cache: Cache, layer_synchronizer: Optional[LayerSynchronizer],
                        transfer_configs, src_block_indices, dst_block_indices,
                        dst_block_memory_size, tensor_num_per_layer: int,
                        need_synchronizer: bool, op: Optional[str] = None,
                        notice=None):
        """Check a transfer out of src_cache and submit it; returns (job or None, number of
        configs). Without need_synchronizer a None synchronizer means every layer is ready
        (push_blocks, push_cache). op names a push: a push within this cluster must not write
        bytes it reads."""
        # 1. the source cache
        check_isinstance("src_cache", src_cache, Cache)
        self._check_open()
        src_entry = self._mem.entries.get(src_cache.cache_id)
        if not src_cache._valid or src_entry is None or src_entry.cache is not src_cache:
            raise _fail(f"src_cache {src_cache.cache_id} is not allocated or registered in this "
                        f"cache manager", _NOT_EXIST)
        desc = src_cache.cache_desc
        stride = desc.stride
        # 2. block index lists and block size
        src_idx = None if src_block_indices is None else _core.parse_indices("src_block_indices", src_block_indices)
        dst_idx = None if dst_block_indices is None else _core.parse_indices("dst_block_indices", dst_block_indices)
        if dst_block_memory_size is not None:
            check_uint64("dst_block_memory_size", dst_block_memory_size)
        block_size = dst_block_memory_size or 0
        # 3. source blocks (a blocks source without indices is C2C, one block per batch row).
        # Checks made on every call raise directly instead of calling require, whose f-string
        # message would be built on every call.
        if src_idx is not None and dst_idx is None:
            raise _fail("PA source to non-PA destination is not supported: "
                        "src_block_indices given without dst_block_indices")
        if src_idx is not None:
            if len(src_idx) != len(dst_idx):
                raise _fail(f"src_block_indices and dst_block_indices must have the same "
                            f"length, got {len(src_idx)} and {len(dst_idx)}")
            if src_idx.max_value is not None and src_idx.max_value >= desc.batch_size:
                raise _fail(f"src_block_indices has block {src_idx.max_value}, but the source "
                            f"cache has {desc.batch_size} blocks")
        # 4. / 5. destination block size
        if dst_idx is not None and src_idx is None:
            require(block_size > 0, "dst_block_memory_size must be > 0 when only dst_block_indices "
                                    "is given")
        if dst_idx is None:
            require(block_size == 0, "dst_block_memory_size is set but dst_block_indices is not")
        # 6. synchronizer
        check_isinstance("layer_synchronizer", layer_synchronizer, LayerSynchronizer,
                         allow_none=not need_synchronizer)
        # 7. configs
        check_isinstance("transfer_configs", transfer_configs, (list, tuple))
        cfg_type = TransferWithCacheKeyConfig if self._remote_accessible else TransferConfig
        for i, cfg in enumerate(transfer_configs):
            check_isinstance(f"transfer_configs[{i}]", cfg, cfg_type)
        if not transfer_configs:
            return None, 0
        # the plan, shared by every layer and config of this call
        if src_idx is not None:
            if block_size not in (0, stride):
                raise _fail(f"dst_block_memory_size {block_size} must equal the source block "
                            f"size {stride}")
            block_size = stride
            plan = _core.plan_b2b(src_idx, dst_idx, stride)
        elif dst_idx is not None:
            if len(dst_idx) > -(-stride // block_size):
                raise _fail(f"dst_block_indices has {len(dst_idx)} blocks, but a source row of "
                            f"{stride} bytes fills at most {-(-stride // block_size)} blocks of "
                            f"{block_size} bytes")
            plan = _core.plan_c2b(dst_idx, stride, block_size)
        else:
            plan = _core.plan_c2c(stride)
        # 8. - 11. each config
        tpl = pull_push.check_tensor_num_per_layer(tensor_num_per_layer)
        if desc.num_tensors % tpl:
            raise _fail(f"src_cache has {desc.num_tensors} tensors, not a multiple of "
                        f"tensor_num_per_layer {tpl}")
        num_layers = desc.num_tensors // tpl
        # Wait for the peers' device-IPC readiness here, not under the lock in _submit.
        for cfg in transfer_configs:
            peer = self._node.peer(cfg.dst_cluster_id) if self._node is not None else None
            if peer is not None:
                peer.await_ipc_ready(self._runtime)
        self._take_slot()
        try:
            return self._submit(src_cache, src_entry, layer_synchronizer, transfer_configs,
                                src_idx, dst_idx, block_size, plan, num_layers, tpl, op,
                                notice)
        except BaseException:
            self._slots.release()
            raise

    def _take_slot(self) -> None:
        """Wait briefly for room under llmdist.max_inflight_tasks; LLM_LINK_BUSY without it,
        so that tasks nobody waits for cannot pile up without bound."""
        if not self._slots.acquire(timeout=BUSY_WAIT_S):
            raise _fail(f"{self._max_inflight} transfer tasks are in flight, the bound set by "
                        f"option llmdist.max_inflight_tasks; none finished within "
                        f"{BUSY_WAIT_S * 1000:.0f} ms: wait for some tasks and retry",
                        LLMStatusCode.LLM_LINK_BUSY)

    def _submit(self, src_cache: Cache, src_entry: MemoryEntry, layer_synchronizer,
                transfer_configs, src_idx, dst_idx, block_size: int, plan,
                num_layers: int, tpl: int, op: Optional[str] = None, notice=None):
        """Checks that need the lock (rules 8-11), then the job goes to the workers."""
        with self._lock:
            plans = []
            touched: List[set] = []
            for i, cfg in enumerate(transfer_configs):
                keys: set = set()
                plans.append(self._check_config(i, cfg, src_entry, src_idx, dst_idx, block_size,
                                                plan, num_layers, keys, tpl, op))
                touched.append(keys)
            events = gate = None
            if isinstance(layer_synchronizer, EventSynchronizer):
                if layer_synchronizer.runtime.name != self._runtime.name:
                    raise _fail(f"layer_synchronizer's events belong to the "
                                f"{layer_synchronizer.runtime.name} runtime, this cluster uses "
                                f"{self._runtime.name}")
                if len(layer_synchronizer.events) < num_layers:
                    raise _fail(f"layer_synchronizer has {len(layer_synchronizer.events)} events, "
                                f"the source cache has {num_layers} layers")
                events, gate = layer_synchronizer.events, layer_synchronizer.gate
            job = _core.TransferJob(self._runtime, plan, src_cache._tensor_addrs, plans,
                                    layer_synchronizer, self._sync_timeout, events, gate,
                                    tensors_per_layer=tpl)
            self._launch(job, src_cache.cache_id, touched, notice)
        return job, len(plans)

    def _launch(self, job, cache_id: int, touched: List[set], notice=None) -> None:
        """Record job as in flight (driven by this cluster's cache cache_id, touching the
        (cluster, cache) pairs of touched per config) and hand it to the workers (lock held).
        The caller holds a task slot, which the job gives back when it ends; notice (a
        TaskNotice) fires when it ends."""
        self._inflight[job] = ((self._cluster_id, cache_id), touched)
        if notice is None:
            job.on_finish = self._job_done
        else:
            def finished(job) -> None:
                self._job_done(job)
                ok = all(r == LLMStatusCode.LLM_SUCCESS for r in config_results(job)[0])
                notice.fire(ok)
            job.on_finish = finished
        try:
            self._workers.submit(job)
        except BaseException:
            job.on_finish = None    # it never runs: its slot goes back in the caller
            self._inflight.pop(job, None)
            raise

    def _check_config(self, i: int, cfg, src_entry: MemoryEntry, src_idx, dst_idx,
                      block_size: int, plan, num_layers: int, touched: set,
                      tpl: int = 2, op: Optional[str] = None) -> "_core.ConfigPlan":
        """Check one config (rules 8-11) and return its plan for the layer loop."""
        desc = src_entry.cache.cache_desc
        keyed = isinstance(cfg, TransferWithCacheKeyConfig)
        layers = cfg.src_layer_range
        if layers is None:
            layers = range(num_layers)
        # 8. layers and rows
        if layers.stop > num_layers:
            raise _fail(f"transfer_configs[{i}]: src_layer_range {layers} is outside the source's "
                        f"{num_layers} layers")
        if not keyed:
            if len(cfg._dst_addrs) != tpl * len(layers):
                raise _fail(f"transfer_configs[{i}]: dst_addrs has {len(cfg._dst_addrs)} "
                            f"addresses, but {len(layers)} layers need {tpl * len(layers)} ({tpl} "
                            f"per layer)")
        if src_idx is not None:
            if cfg.src_batch_index != 0:
                raise _fail(f"transfer_configs[{i}]: src_batch_index must be 0 with "
                            f"src_block_indices, got {cfg.src_batch_index}")
        else:
            if cfg.src_batch_index >= desc.batch_size:
                raise _fail(f"transfer_configs[{i}]: src_batch_index {cfg.src_batch_index} must "
                            f"be < the source batch size {desc.batch_size}")
        # 10. the destination cluster
        peer = None
        mem = self._mem
        if cfg.dst_cluster_id != self._cluster_id:
            peer = self._linked_peer(cfg.dst_cluster_id, f"transfer_configs[{i}]: ")
            peer.check_transfer(self._runtime)
            with peer.lock:     # the peer's reader thread updates its caches
                return self._destination(i, cfg, desc, src_entry, src_idx, dst_idx, block_size,
                                         plan, layers, touched, peer.mem, peer, tpl)
        return self._destination(i, cfg, desc, src_entry, src_idx, dst_idx, block_size, plan,
                                 layers, touched, mem, None, tpl, op)

    def _destination(self, i: int, cfg, desc: CacheDesc, src_entry: MemoryEntry, src_idx,
                     dst_idx, block_size: int, plan, layers: range, touched: set,
                     mem: ClusterMemory, peer, tpl: int = 2,
                     op: Optional[str] = None) -> "_core.ConfigPlan":
        """Rules 9 and 11 for one config against the destination cluster's caches, then its
        plan through the route to them; for a push (op) within this cluster, no byte it reads
        is written."""
        keyed = isinstance(cfg, TransferWithCacheKeyConfig)
        if keyed:
            entry, offset = self._resolve_key(i, cfg.cache_key, cfg.dst_layer_range, mem, tpl)
            dcache = entry.cache
            if dst_idx is not None:
                if not (dcache.is_blocks_cache and dcache.cache_desc.stride == block_size):
                    raise _fail(f"transfer_configs[{i}]: destination cache {dcache.cache_id} must "
                                f"be a blocks cache of {block_size}-byte blocks")
            # (layer ranges have step 1: their tensors are one slice)
            layers_here = cfg.dst_layer_range
            dst = dcache._tensor_addrs[tpl * layers_here.start:tpl * layers_here.stop]
            if offset:
                dst = [a + offset for a in dst]
            # 9. and 11. bounds inside the cache the key names, placement of it
            regions, bad = entry.locate(tpl * layers_here.start, tpl * layers_here.stop,
                                        offset + plan.dst_lo, offset + plan.dst_hi)
        else:
            dst = cfg._dst_addrs
            # 9. and 11. placement and bounds of every destination tensor
            regions, bad = mem.registry.locate(dst, plan.dst_lo, plan.dst_hi)
        src_place = desc.placement
        # each destination cache once, in the order of its first tensor, up to the first tensor
        # that fits no region: C-level passes, no Python per tensor (every region of a cache
        # carries the cache's origin, so any of them stands for it)
        fitted = regions if bad < 0 else regions[:bad]
        by_cache = dict(zip(map(_REGION_CACHE, fitted), fitted))
        for rc, region in by_cache.items():
            dplace = rc.cache_desc.placement
            if src_place == Placement.HOST and dplace == Placement.DEVICE:
                raise _fail(f"transfer_configs[{i}]: a HOST source cannot be sent to a DEVICE "
                            f"destination (cache {rc.cache_id})")
            if src_idx is not None and not rc.is_blocks_cache:
                raise _fail(f"transfer_configs[{i}]: PA source to non-PA destination is not "
                            f"supported (cache {rc.cache_id})")
            if dplace == Placement.HOST and region.origin != ALLOCATED and not self._runtime.is_host:
                # Host memory the caller registered may be pageable, which a device runtime's
                # asynchronous copies refuse. The host runtime writes it like any host memory.
                raise _fail(f"transfer_configs[{i}]: on the {self._runtime.name} runtime a HOST "
                            f"destination must be allocated with allocate_cache/"
                            f"allocate_blocks_cache (page-locked); cache {rc.cache_id} is "
                            f"registered")
            if (peer is not None and dplace == Placement.DEVICE
                    and peer.runtime != self._runtime.name):
                raise _fail(f"transfer_configs[{i}]: cache {rc.cache_id} is DEVICE memory of the "
                            f"{peer.runtime} runtime on cluster {cfg.dst_cluster_id}; this cluster "
                            f"runs the {self._runtime.name} runtime and cannot write into it",
                            LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        if bad >= 0:
            layer = layers.start + bad // tpl
            which = "KV"[bad % 2] if tpl == 2 else "tensor"
            raise _fail(f"transfer_configs[{i}]: layer {layer} {which} destination "
                        f"[{dst[bad] + plan.dst_lo:#x}, {dst[bad] + plan.dst_hi:#x}) is not inside "
                        f"memory registered or allocated on cluster {cfg.dst_cluster_id}")
        touched.update((cfg.dst_cluster_id, rc.cache_id) for rc in by_cache)
        dplace = regions[0].cache.cache_desc.placement
        kind = copy_kind(src_place, dplace)
        shift = 0 if src_idx is not None else cfg.src_batch_index * desc.stride
        if op is not None and peer is None:
            srcs = src_entry.cache._tensor_addrs[tpl * layers.start:tpl * layers.stop]
            rows = "src_batch_index and the destination row"
            block_ops.check_disjoint(op, plan, [a + shift for a in srcs], dst,
                                     pull_push.range_params(src_idx, dst_idx, rows))
        route = self._route(peer, regions, f"transfer_configs[{i}]: ")
        return self._config_plan(route, layers, shift, kind, dst, regions, tpl=tpl)

    def _linked_peer(self, cluster_id: int, where: str = ""):
        """The peer of a linked cluster; LLM_NOT_YET_LINK (after where) when it is not."""
        peer = self._node.peer(cluster_id) if self._node is not None else None
        if peer is None:
            raise _fail(f"{where}cluster {cluster_id} is not linked",
                        LLMStatusCode.LLM_NOT_YET_LINK)
        return peer

    def _route(self, peer, regions: Sequence[Region], where: str = "") -> Route:
        """The route to the memory holding regions: this cluster's own, or the one the peer
        picks; a peer's refusal is raised with where (the config) in front of its reason."""
        if peer is None:
            return self._local_route
        try:
            return peer.route(self._runtime, regions)
        except LLMException as exc:
            raise _fail(f"{where}{exc}", exc.status_code) from None

    def _config_plan(self, route: Route, layers: range, shift: int, kind: CopyKind,
                     addrs: Sequence[int], regions: Sequence[Region],
                     direction: Direction = Direction.WRITE,
                     tpl: int = 2) -> "_core.ConfigPlan":
        """The layer loop's plan for one checked config: the layers and row of the cache here,
        and the other cache's tensors (addrs, in regions) as the route reaches them."""
        target_addrs, target_limits = route.reach(addrs, regions)
        return _core.ConfigPlan(first_layer=layers.start, stop_layer=layers.stop, row_shift=shift,
                                kind=kind, lane=route.lane(kind), direction=direction,
                                target_addrs=target_addrs, target_limits=target_limits,
                                pid=route.pid, link=route.link,
                                engine=route.channel(self._sync_timeout), single=route.single,
                                tensors_per_layer=tpl)

    # ------------------------------------------------------------------ pull and push

    def pull_blocks(self, src_cache_key: Union[CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey],
                    dst_cache: Cache, src_blocks: Sequence[int] = (),
                    dst_blocks: Sequence[int] = (), src_layer_range: Optional[range] = None,
                    dst_layer_range: Optional[range] = None,
                    tensor_num_per_layer: int = 2, *, notify: Optional[bytes] = None,
                    **ignored: object) -> None:
        """Copy blocks of the cache src_cache_key names (on a linked cluster or this one) into
        blocks of dst_cache, synchronously. A BlocksCacheKey copies src_blocks[j] to
        dst_blocks[j]; a CacheKey / CacheKeyByIdAndIndex cuts the source row into dst_blocks
        (src_blocks empty). Layer l is tensors [l*t, (l+1)*t) with t = tensor_num_per_layer.
        notify: a payload the source's cluster receives once the bytes are read out of it."""
        _ignore("pull_blocks", ignored)
        check_isinstance("src_cache_key", src_cache_key,
                         (CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey))
        pull_push.pull(self, "pull_blocks", src_cache_key, dst_cache, src_blocks, dst_blocks,
                       None, -1, src_layer_range, dst_layer_range, tensor_num_per_layer, notify)

    def pull_cache(self, cache_key: Union[CacheKey, CacheKeyByIdAndIndex], cache: Cache,
                   batch_index: int = 0, size: int = -1, src_layer_range: Optional[range] = None,
                   dst_layer_range: Optional[range] = None,
                   tensor_num_per_layer: int = 2, *, notify: Optional[bytes] = None,
                   **ignored: object) -> None:
        """Copy the row cache_key names into row batch_index of the non-blocks cache,
        synchronously; size bytes of each tensor's row (-1: all of it). In remote-accessible
        mode only a CacheKeyByIdAndIndex names the source. notify: as for pull_blocks."""
        _ignore("pull_cache", ignored)
        allowed = (CacheKeyByIdAndIndex,) if self._remote_accessible else (CacheKey, CacheKeyByIdAndIndex)
        check_isinstance("cache_key", cache_key, allowed)
        check_isinstance("cache", cache, Cache)
        check_uint32("batch_index", batch_index)
        check_int64("size", size)
        require(size == -1 or size > 0, f"size must be -1 or > 0, but got {size}")
        pull_push.pull(self, "pull_cache", cache_key, cache, (), (), batch_index, size,
                       src_layer_range, dst_layer_range, tensor_num_per_layer, notify)

    def push_blocks(self, dst_cache_key: BlocksCacheKey, src_cache: Cache,
                    src_blocks: Sequence[int] = (), dst_blocks: Sequence[int] = (),
                    src_layer_range: Optional[range] = None,
                    dst_layer_range: Optional[range] = None,
                    tensor_num_per_layer: int = 2, *, notify: Optional[bytes] = None,
                    **ignored: object) -> None:
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
        pull_push.push(self, "push_blocks", dst_cache_key, src_cache, list(src_blocks),
                       list(dst_blocks), 0, src_layer_range, dst_layer_range,
                       tensor_num_per_layer, notify)

    def push_cache(self, dst_cache_key: CacheKeyByIdAndIndex, src_cache: Cache,
                   src_batch_index: int = 0, src_layer_range: Optional[range] = None,
                   dst_layer_range: Optional[range] = None, size: int = -1,
                   tensor_num_per_layer: int = 2, *, notify: Optional[bytes] = None,
                   **ignored: object) -> None:
        """Write row src_batch_index of the non-blocks src_cache into the row dst_cache_key
        names, synchronously (remote-accessible mode; size must be -1, the whole row).
        notify: as for push_blocks."""
        _ignore("push_cache", ignored)
        require(self._remote_accessible, "push_cache needs enable_remote_cache_accessible")
        check_isinstance("dst_cache_key", dst_cache_key, CacheKeyByIdAndIndex)
        check_isinstance("src_cache", src_cache, Cache)
        check_uint32("src_batch_index", src_batch_index)
        require(not src_cache.is_blocks_cache,
                f"src_cache {src_cache.cache_id} must not be a blocks cache (use push_blocks)")
        check_int64("size", size)
        require(size == -1, f"size must be -1 (the whole row), but got {size}")
        pull_push.push(self, "push_cache", dst_cache_key, src_cache, None, None,
                       src_batch_index, src_layer_range, dst_layer_range, tensor_num_per_layer,
                       notify)

    # ------------------------------------------------------------------ notifications

    def _hub(self) -> "notifications.Notifications":
        if self._node is None:
            raise _fail("notifications need a cluster (LLMDataDist.init)",
                        LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        return self._node.notifications

    def _notify_target(self, cluster_id: int):
        """(peer, cluster_id) to notify; peer None for this cluster itself."""
        self._hub()
        if cluster_id == self._cluster_id:
            return None, cluster_id
        return self._linked_peer(cluster_id), cluster_id

    def _notify_now(self, cluster_id: int, payload: bytes, what: str) -> None:
        """Send a notification after a synchronous transfer and wait for its confirmation."""
        peer, _ = self._notify_target(cluster_id)
        try:
            self._hub().send(peer, cluster_id, payload).wait()
        except LLMException as exc:
            raise _fail(f"{what} succeeded, but its notification to cluster {cluster_id} was "
                        f"not delivered: {exc}", exc.status_code) from None

    def _job_done(self, job) -> None:
        with self._lock:
            self._inflight.pop(job, None)
        self._slots.release()

    # ------------------------------------------------------------------ local block operations

    def _live(self, name: str, cache: Cache) -> MemoryEntry:
        """The entry of a cache this manager still holds (lock held)."""
        entry = self._mem.entries.get(cache.cache_id)
        if not cache._valid or entry is None or entry.cache is not cache:
            raise _fail(f"{name} {cache.cache_id} is not allocated or registered in this cache "
                        f"manager", _NOT_EXIST)
        return entry

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
            self._local.run(block_ops.plan_copy_blocks(cache, pairs,
                                                       self._pinned(entry)))

    def copy_cache(self, dst: Cache, src: Cache, dst_batch_index: int = 0,
                   src_batch_index: int = 0, offset: int = 0, size: int = -1,
                   req_id: Optional[int] = None) -> None:
        """Copy bytes [offset, offset + size) of row src_batch_index of every tensor of src to
        the same bytes of row dst_batch_index of dst (size -1: the rest of the row).
        Synchronous; req_id is accepted for compatibility and only logged."""
        block_ops.check_copy_cache_args(dst, src, dst_batch_index, src_batch_index, offset,
                                        size, req_id)
        self._check_open()
        with self._lock:
            src_entry = self._live("src", src)
            dst_entry = self._live("dst", dst)
            copy = block_ops.plan_copy_cache(dst, src, dst_batch_index, src_batch_index, offset,
                                             size, self._pinned(src_entry),
                                             self._pinned(dst_entry))
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
                    require(cache._valid and cache.cache_desc.placement == Placement.HOST,
                            f"{name} was made by Cache.create_cpu_cache and must be HOST memory")
                    entries.append(None)
                else:
                    entries.append(self._live(name, cache))
            self._local.run(block_ops.plan_swap_blocks(src_cache, dst_cache, pairs,
                                                       self._pinned(entries[0]),
                                                       self._pinned(entries[1])))

    def remap_registered_memory(self, mem_infos) -> None:
        """Not supported: upstream reserves it for re-mapping the physical memory behind
        registered caches after a device memory fault, which llmdist does not handle."""
        raise _fail("remap_registered_memory is not supported yet: re-mapping registered memory "
                    "after a device memory fault is reserved upstream and not implemented by "
                    "llmdist", LLMStatusCode.LLM_FEATURE_NOT_ENABLED)

    # ------------------------------------------------------------------ shutdown

    def _close(self) -> None:
        """End every transfer (LLM_ENGINE_FINALIZED), then free llmdist-owned memory."""
        with self._lock:
            self._closed = True
            jobs = list(self._inflight)
        for job in jobs:
            job.cancel(LLMStatusCode.LLM_ENGINE_FINALIZED)
        for entry in list(self._mem.entries.values()):
            try:
                self._release(entry)
            except LLMException as exc:
                # Released meanwhile by another thread: nothing is left to do.
                if exc.status_code != _NOT_EXIST:
                    raise
        self._local.close()
