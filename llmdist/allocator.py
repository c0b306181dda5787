"""CacheAllocator: the memory behind a cluster's caches.

It allocates caches inside the memory pools the init options configure, in shared memory or
exported for device IPC when peers on this host may map them, wraps memory the caller owns
(registration), and frees what it allocated. The cache manager decides when; this module
decides how, and records every cache in the cluster's ClusterMemory."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from . import _core, device_ipc
from ._check import check_int_list, check_isinstance, check_uint64, require
from .descs import Cache, CacheDesc, Placement, fixed_copy
from .registry import ALLOCATED, REGISTERED, ClusterMemory, MemoryEntry
from .shares import DeviceIpcShare, DeviceIpcTensors, MemfdShare, ProcessShare, Share, Unshared
from .status import LLMException, LLMStatusCode

ALIGN = 64  # every tensor of an allocated cache starts 64-byte aligned (ACL's rule)
MAX_BYTES = 1 << 64
POOL_OPTIONS = {Placement.DEVICE: "llm.MemPoolConfig", Placement.HOST: "llm.HostMemPoolConfig"}

log = logging.getLogger(__name__)


def pool_cap(options: Dict[str, str], key: str) -> Optional[int]:
    """The memory_size of pool option key (JSON like {"memory_size": N}); None when unset."""
    text = options.get(key)
    if not text:
        return None
    try:
        size = json.loads(text)["memory_size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LLMException(
            f'option {key} must be JSON like {{"memory_size": N}}, got {text!r}',
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        ) from exc
    require(
        type(size) is int and size > 0,
        f"option {key}: memory_size must be a positive int, got {size!r}",
    )
    return size


def fixed_desc(cache_desc: CacheDesc) -> CacheDesc:
    """The desc to size a new cache with: a copy that cannot change (the caller's may,
    through update_dim or its shape list, even from another thread)."""
    check_isinstance("cache_desc", cache_desc, CacheDesc)
    fixed = fixed_copy(cache_desc)
    require(fixed.num_tensors > 0, "cache_desc.num_tensors must be > 0")
    fixed.data_type.element_size  # DT_STRING has none: raises LLMException
    return fixed


class CacheAllocator:
    """Allocates, registers and frees the caches of one cluster, recording them in mem under
    lock (the cache manager's). shareable: peers on this host may map its caches (a sealed
    memfd on the host runtime, device IPC exports of DEVICE caches on a device runtime)."""

    def __init__(
        self,
        runtime: "_core.Runtime",
        options: Dict[str, str],
        shareable: bool,
        mem: ClusterMemory,
        lock: threading.RLock,
    ) -> None:
        self._runtime = runtime
        self._mem = mem
        self._lock = lock
        # Host-runtime memory of a listening cluster lives in shared memory (a sealed memfd,
        # passed to peers on this host over the Unix socket), so that they can map it and copy
        # straight into it. It has no name: nothing outlives the processes holding it.
        self._shareable = shareable and runtime.is_host
        # On a device runtime its DEVICE allocations are exported for device IPC instead, and
        # (ACL) every linked peer on this host may import them: their pids, for the whitelist.
        self._exportable = shareable and not runtime.is_host
        self._importers: set = set()
        self._next_id = 1
        self.caps = {p: pool_cap(options, key) for p, key in POOL_OPTIONS.items()}
        self.used = {Placement.DEVICE: 0, Placement.HOST: 0}

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    def allocate(self, cache_desc: CacheDesc, is_blocks: bool, keys: List) -> Cache:
        """Allocate a cache inside its pool and record it under keys."""
        cache_desc = fixed_desc(cache_desc)
        placement = cache_desc.placement
        piece = -(-cache_desc.size // ALIGN) * ALIGN
        total = piece * cache_desc.num_tensors
        require(
            total < MAX_BYTES,
            f"cache_desc: {cache_desc.num_tensors} tensors of {cache_desc.size} bytes "
            f"({total} bytes with {ALIGN}-byte alignment) do not fit a 64-bit address "
            f"space",
        )
        with self._lock:
            cap = self.caps[placement]
            require(
                cap is None or self.used[placement] + total <= cap,
                f"allocating {total} bytes would exceed the configured "
                f"{placement.name.lower()} memory pool of {cap} bytes "
                f"({self.used[placement]} in use)",
                LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY
                if placement == Placement.DEVICE
                else LLMStatusCode.LLM_OUT_OF_MEMORY,
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
                self.free(entry)
                raise
            self.used[placement] += total
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

    def register(
        self,
        cache_desc: CacheDesc,
        addrs: Sequence[int],
        is_blocks: bool,
        remote_accessible: Optional[bool],
        keys: List,
    ) -> Cache:
        """Wrap memory the caller owns (one address per tensor) as a cache recorded under
        keys; remote_accessible None: DEVICE memory is, HOST memory is not."""
        cache_desc = fixed_desc(cache_desc)
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
        return cache

    def allow_importer(self, pid: int) -> None:
        """Let the process pid import the DEVICE caches exported here, now and later (ACL
        whitelists importers; CUDA does not)."""
        if self._runtime.ipc_kind is None:
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

    def free(self, entry: MemoryEntry) -> None:
        """Free the memory of an allocated cache (no longer recorded nor reachable)."""
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

    def release(self, entry: MemoryEntry) -> None:
        """Free an allocated cache and give its bytes back to its pool."""
        self.free(entry)
        with self._lock:
            self.used[entry.placement] -= entry.size

    def unexport(self, entry: MemoryEntry) -> None:
        """Close the device IPC exports of a registered cache's tensors (its peers closed their
        imports when it was withdrawn); the memory stays the caller's."""
        if isinstance(entry.share, DeviceIpcTensors):
            device_ipc.close_tensors(self._runtime, entry.share)
