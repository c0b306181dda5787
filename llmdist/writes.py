"""Writes: transfer_cache_async and the pushes (push_blocks, push_cache), planned in
Direction.WRITE by the transfer planner. The source is a cache here; each config names the
destination on a linked cluster (or this one) by addresses or by key (spec section 5.3)."""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

from . import _core, block_ops, transfer_args
from ._check import check_isinstance, check_layer_range, check_uint64, require
from ._core import Direction
from .descs import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKeyByIdAndIndex,
    Placement,
    copy_kind,
    tensor_addrs_of,
)
from .events import EventSynchronizer
from .plan_memo import Resolved, memo_scope, region_window
from .registry import ALLOCATED, MemoryEntry
from .status import LLMException, LLMStatusCode
from .transfer_types import (
    LayerSynchronizer,
    TransferConfig,
    TransferWithCacheKeyConfig,
    dst_addrs_of,
)
from .transfers import Planner, find_key, live_entry

_REGION_CACHE = operator.attrgetter("cache")


def _fail(message: str, code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID) -> LLMException:
    return LLMException(message, status_code=code)


def start_write(
    pl: Planner,
    src_cache: Cache,
    layer_synchronizer: Optional[LayerSynchronizer],
    transfer_configs,
    src_block_indices,
    dst_block_indices,
    dst_block_memory_size,
    tensor_num_per_layer: int,
    need_synchronizer: bool,
    remote_accessible: bool,
    op: Optional[str] = None,
    notice=None,
) -> Tuple[Optional[object], int]:
    """Check a write out of src_cache (rules 1-11) and launch it; returns (job or None, number
    of configs). Without need_synchronizer a None synchronizer means every layer is ready
    (the pushes). op names a push: a push within this cluster must not write bytes it reads."""
    # 1. the source cache
    check_isinstance("src_cache", src_cache, Cache)
    pl.check_open()
    src_entry = live_entry(pl.mem, "src_cache", src_cache)
    desc = src_cache.cache_desc
    stride = desc.stride
    # 2. block index lists and block size
    src_idx = (
        None
        if src_block_indices is None
        else _core.parse_indices("src_block_indices", src_block_indices)
    )
    dst_idx = (
        None
        if dst_block_indices is None
        else _core.parse_indices("dst_block_indices", dst_block_indices)
    )
    if dst_block_memory_size is not None:
        check_uint64("dst_block_memory_size", dst_block_memory_size)
    block_size = dst_block_memory_size or 0
    # 3. source blocks (a blocks source without indices is C2C, one block per batch row).
    # Checks made on every call raise directly instead of calling require, whose f-string
    # message would be built on every call.
    if src_idx is not None and dst_idx is None:
        raise _fail(
            "PA source to non-PA destination is not supported: "
            "src_block_indices given without dst_block_indices"
        )
    if src_idx is not None:
        if len(src_idx) != len(dst_idx):
            raise _fail(
                f"src_block_indices and dst_block_indices must have the same "
                f"length, got {len(src_idx)} and {len(dst_idx)}"
            )
        if src_idx.max_value is not None and src_idx.max_value >= desc.batch_size:
            raise _fail(
                f"src_block_indices has block {src_idx.max_value}, but the source "
                f"cache has {desc.batch_size} blocks"
            )
    # 4. / 5. destination block size
    if dst_idx is not None and src_idx is None:
        require(
            block_size > 0, "dst_block_memory_size must be > 0 when only dst_block_indices is given"
        )
    if dst_idx is None:
        require(block_size == 0, "dst_block_memory_size is set but dst_block_indices is not")
    # 6. synchronizer
    check_isinstance(
        "layer_synchronizer",
        layer_synchronizer,
        LayerSynchronizer,
        allow_none=not need_synchronizer,
    )
    # 7. configs
    check_isinstance("transfer_configs", transfer_configs, (list, tuple))
    cfg_type = TransferWithCacheKeyConfig if remote_accessible else TransferConfig
    for i, cfg in enumerate(transfer_configs):
        if not isinstance(cfg, cfg_type):
            check_isinstance(f"transfer_configs[{i}]", cfg, cfg_type)
    if not transfer_configs:
        return None, 0
    # the plan, shared by every layer and config of this call
    if src_idx is not None:
        if block_size not in (0, stride):
            raise _fail(
                f"dst_block_memory_size {block_size} must equal the source block size {stride}"
            )
        block_size = stride
        plan = _core.plan_b2b(src_idx, dst_idx, stride)
    elif dst_idx is not None:
        plan = transfer_args.c2b_plan(dst_idx, stride, block_size, "dst_block_indices")
    else:
        plan = _core.plan_c2c(stride)
    # 8. - 11. each config
    tpl = transfer_args.check_tensor_num_per_layer(tensor_num_per_layer)
    if desc.num_tensors % tpl:
        raise _fail(
            f"src_cache has {desc.num_tensors} tensors, not a multiple of "
            f"tensor_num_per_layer {tpl}"
        )
    num_layers = desc.num_tensors // tpl
    # the linked destination clusters (rule 10 is checked per config, after rule 8); waits
    # for their device IPC readiness happen here, holding no lock
    peers: dict = {}
    for cfg in transfer_configs:
        cid = cfg.dst_cluster_id
        if cid != pl.cluster_id and cid not in peers:
            peer = pl.node.peer(cid) if pl.node is not None else None
            if peer is not None:
                peer.await_ipc_ready(pl.runtime)
                peers[cid] = peer
    pl.take_slot()
    try:
        return pl.run_planned(
            lambda: _write_job(
                pl,
                src_cache,
                src_entry,
                layer_synchronizer,
                transfer_configs,
                src_idx,
                dst_idx,
                block_size,
                plan,
                num_layers,
                tpl,
                op,
                notice,
                peers,
            ),
            list(peers.values()),
        )
    except BaseException:
        pl.slots.release()
        raise


def push(
    pl: Planner,
    what: str,
    key: Union[BlocksCacheKey, CacheKeyByIdAndIndex],
    src_cache: Cache,
    src_blocks: Optional[Sequence[int]],
    dst_blocks: Optional[Sequence[int]],
    src_batch_index: int,
    src_range: Optional[range],
    dst_range: Optional[range],
    tpl: int,
    remote_accessible: bool,
) -> None:
    """Write src_cache's blocks or row into the cache key names on its cluster, synchronously:
    one keyed write with every layer ready, waited for."""
    check_isinstance("src_cache", src_cache, Cache)
    tpl = transfer_args.check_tensor_num_per_layer(tpl)
    check_layer_range("src_layer_range", src_range)
    check_layer_range("dst_layer_range", dst_range)
    tensors = src_cache.cache_desc.num_tensors
    if src_range is None and dst_range is None:
        # every tensor to the same tensor (see transfer_args.layer_ranges); the destination's
        # count is checked against the ranges when the key is resolved
        src_range = dst_range = range(tensors)
        tpl = 1
    src_range = range(tensors // tpl) if src_range is None else src_range
    dst_range = range(tensors // tpl) if dst_range is None else dst_range
    require(
        len(src_range) == len(dst_range),
        f"src_layer_range {src_range} and dst_layer_range {dst_range} must have the same length",
    )
    cfg = TransferWithCacheKeyConfig(key, src_range, dst_range, src_batch_index)
    if dst_blocks is not None:
        block_ops.check_indices_written_once(
            "dst_blocks", _core.parse_indices("dst_blocks", dst_blocks)
        )
    block_size = None
    if dst_blocks is not None and not src_blocks:
        # C2B: the source row is cut into blocks of the destination's block size
        mem = pl.mem if key.cluster_id == pl.cluster_id else pl.linked_peer(key.cluster_id).mem
        block_size = find_key(mem, key)[0].cache.cache_desc.stride
    job, _ = start_write(
        pl,
        src_cache,
        None,
        [cfg],
        src_blocks or None,
        dst_blocks,
        block_size,
        tpl,
        False,
        remote_accessible,
        what,
    )
    pl.finish(job, f"{what} to cluster {key.cluster_id}")


def _write_job(
    pl: Planner,
    src_cache: Cache,
    src_entry: MemoryEntry,
    layer_synchronizer,
    transfer_configs,
    src_idx,
    dst_idx,
    block_size: int,
    plan,
    num_layers: int,
    tpl: int,
    op: Optional[str],
    notice,
    peers: dict,
):
    """Rules 8-11 for every config (locks held), then the job goes to the workers."""
    plans = []
    touched: List[set] = []
    for i, cfg in enumerate(transfer_configs):
        keys: set = set()
        plans.append(
            _write_config(
                pl,
                i,
                cfg,
                src_entry,
                src_idx,
                dst_idx,
                block_size,
                plan,
                num_layers,
                keys,
                tpl,
                op,
                peers.get(cfg.dst_cluster_id),
            )
        )
        touched.append(keys)
    events = gate = None
    if isinstance(layer_synchronizer, EventSynchronizer):
        if layer_synchronizer.runtime.name != pl.runtime.name:
            raise _fail(
                f"layer_synchronizer's events belong to the "
                f"{layer_synchronizer.runtime.name} runtime, this cluster uses "
                f"{pl.runtime.name}"
            )
        if len(layer_synchronizer.events) < num_layers:
            raise _fail(
                f"layer_synchronizer has {len(layer_synchronizer.events)} events, "
                f"the source cache has {num_layers} layers"
            )
        events, gate = layer_synchronizer.events, layer_synchronizer.gate
    job = _core.TransferJob(
        pl.runtime,
        plan,
        tensor_addrs_of(src_cache),
        plans,
        layer_synchronizer,
        pl.sync_timeout,
        events,
        gate,
        tensors_per_layer=tpl,
    )
    # a push (op) is synchronous: on the host runtime it runs on the calling thread
    here = op is not None and pl.runs_here(plans)
    pl.launch(job, src_cache.cache_id, touched, notice, here)
    return job, len(plans)


def _write_config(
    pl: Planner,
    i: int,
    cfg,
    src_entry: MemoryEntry,
    src_idx,
    dst_idx,
    block_size: int,
    plan,
    num_layers: int,
    touched: set,
    tpl: int,
    op: Optional[str],
    peer,
) -> "_core.ConfigPlan":
    """Rules 8-11 for one config against the destination cluster's caches, then its plan;
    for a push (op) within this cluster, no byte it reads is written."""
    where = f"transfer_configs[{i}]: "
    desc: CacheDesc = src_entry.cache.cache_desc
    keyed = isinstance(cfg, TransferWithCacheKeyConfig)
    layers = cfg.src_layer_range
    if layers is None:
        layers = range(num_layers)
    # 8. layers and rows
    if layers.stop > num_layers:
        raise _fail(f"{where}src_layer_range {layers} is outside the source's {num_layers} layers")
    if not keyed and len(dst_addrs_of(cfg)) != tpl * len(layers):
        raise _fail(
            f"{where}dst_addrs has {len(dst_addrs_of(cfg))} addresses, but "
            f"{len(layers)} layers need {tpl * len(layers)} ({tpl} per layer)"
        )
    if src_idx is not None:
        if cfg.src_batch_index != 0:
            raise _fail(
                f"{where}src_batch_index must be 0 with src_block_indices, got "
                f"{cfg.src_batch_index}"
            )
    elif cfg.src_batch_index >= desc.batch_size:
        raise _fail(
            f"{where}src_batch_index {cfg.src_batch_index} must be < the source "
            f"batch size {desc.batch_size}"
        )
    # 10. the destination cluster
    mem = pl.mem
    if cfg.dst_cluster_id != pl.cluster_id:
        if peer is None:
            raise _fail(
                f"{where}cluster {cfg.dst_cluster_id} is not linked", LLMStatusCode.LLM_NOT_YET_LINK
            )
        refusal = peer.link_refusal(pl.runtime)
        if refusal is not None:
            raise _fail(f"{where}{refusal}", refusal.status_code)
        mem = peer.mem
    shift = 0 if src_idx is not None else cfg.src_batch_index * desc.stride
    memo_key = None
    scope = memo_scope(peer, pl.runtime)
    if scope is not None and not keyed and op is None:
        # the same addresses resolved before, in this generation of both clusters' memory:
        # only this call's byte range is checked against the regions found then
        dst = dst_addrs_of(cfg)
        memo_key = (
            id(dst),
            layers.start,
            layers.stop,
            tpl,
            shift,
            src_idx is not None,
            desc.placement,
        ) + scope
        hit = pl.memo.get(memo_key)
        if hit is not None and hit.held is dst and hit.fits(plan.dst_lo, plan.dst_hi):
            touched.update(hit.touched)
            return hit.config
    # 9. and 11. bounds of every destination tensor, placement of its cache
    if keyed:
        entry, offset = pl.resolve_key(where, cfg.cache_key, cfg.dst_layer_range, mem, tpl)
        dcache = entry.cache
        if dst_idx is not None and not (
            dcache.is_blocks_cache and dcache.cache_desc.stride == block_size
        ):
            raise _fail(
                f"{where}destination cache {dcache.cache_id} must be a blocks cache "
                f"of {block_size}-byte blocks"
            )
        # (layer ranges have step 1: their tensors are one slice)
        there = cfg.dst_layer_range
        dst = tensor_addrs_of(dcache)[tpl * there.start : tpl * there.stop]
        if offset:
            dst = [a + offset for a in dst]
        regions, bad = entry.locate(
            tpl * there.start, tpl * there.stop, offset + plan.dst_lo, offset + plan.dst_hi
        )
    else:
        dst = dst_addrs_of(cfg)
        regions, bad = mem.registry.locate(dst, plan.dst_lo, plan.dst_hi)
    # each destination cache once, in the order of its first tensor, up to the first tensor
    # that fits no region: C-level passes, no Python per tensor (every region of a cache
    # carries the cache's origin, so any of them stands for it)
    fitted = regions if bad < 0 else regions[:bad]
    by_cache = dict(zip(map(_REGION_CACHE, fitted), fitted))
    src_place = desc.placement
    kinds = pl.choose(Direction.WRITE, peer, src_place, list(by_cache.values()), where)
    for rc, region in by_cache.items():
        dplace = rc.cache_desc.placement
        if src_idx is not None and not rc.is_blocks_cache:
            raise _fail(
                f"{where}PA source to non-PA destination is not supported (cache {rc.cache_id})"
            )
        if dplace == Placement.HOST and region.origin != ALLOCATED and not pl.runtime.is_host:
            # Host memory the caller registered may be pageable, which a device runtime's
            # asynchronous copies refuse. The host runtime writes it like any host memory.
            raise _fail(
                f"{where}on the {pl.runtime.name} runtime a HOST destination must "
                f"be allocated with allocate_cache/allocate_blocks_cache "
                f"(page-locked); cache {rc.cache_id} is registered"
            )
    if bad >= 0:
        layer = layers.start + bad // tpl
        which = "KV"[bad % 2] if tpl == 2 else "tensor"
        raise _fail(
            f"{where}layer {layer} {which} destination "
            f"[{dst[bad] + plan.dst_lo:#x}, {dst[bad] + plan.dst_hi:#x}) is not inside "
            f"memory registered or allocated on cluster {cfg.dst_cluster_id}"
        )
    touched.update((cfg.dst_cluster_id, rc.cache_id) for rc in by_cache)
    route = pl.build_route(peer, kinds, regions)
    kind = copy_kind(src_place, regions[0].cache.cache_desc.placement)
    if (
        op is not None
        and peer is None
        and not (
            keyed and transfer_args.apart(src_entry.cache, entry.cache, entry.origin == ALLOCATED)
        )
    ):
        srcs = tensor_addrs_of(src_entry.cache)[tpl * layers.start : tpl * layers.stop]
        rows = "src_batch_index and the destination row"
        block_ops.check_disjoint(
            op,
            plan,
            [a + shift for a in srcs],
            dst,
            transfer_args.range_params(src_idx, dst_idx, rows),
        )
    config = pl.plan_config(Direction.WRITE, route, layers, shift, kind, dst, regions, tpl)
    if memo_key is not None and mem.registry.disjoint:
        lo_min, hi_max = region_window(dst, regions)
        pl.memo.put(
            memo_key,
            Resolved(dst, lo_min, hi_max, frozenset(touched), config),
        )
    return config
