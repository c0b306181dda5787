"""Reads: pull_blocks and pull_cache, planned in Direction.READ by the transfer planner.

A pull is a job whose source is the cache a key names (on a linked cluster or this one) and
whose destination is a cache here: it runs on the transfer workers like a write (no GIL during
the copies), every layer ready at once, through the route that reaches the source (spec
section 8)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from . import _core, block_ops, transfer_args
from ._check import check_int64, check_isinstance, require
from ._core import Direction
from .descs import (
    BlocksCacheKey,
    Cache,
    CacheKey,
    CacheKeyByIdAndIndex,
    copy_kind,
    tensor_addrs_of,
)
from .plan_memo import Resolved, memo_scope
from .registry import ALLOCATED, MemoryEntry
from .status import LLMException, LLMStatusCode
from .transfers import DEFAULT_WAIT_MS, Planner, find_key, live_entry

Key = Union[CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey]


def _fail(message: str) -> LLMException:
    return LLMException(message, status_code=LLMStatusCode.LLM_PARAM_INVALID)


def pull(
    pl: Planner,
    what: str,
    key: Key,
    dst_cache: Cache,
    src_blocks,
    dst_blocks,
    dst_row: Optional[int],
    size: int,
    src_range: Optional[range],
    dst_range: Optional[range],
    tpl: int,
):
    """Copy from the cache key names on its cluster into dst_cache, synchronously; returns the
    source's peer (None: this cluster). dst_row None: dst_blocks are the destination
    (pull_blocks); else row dst_row of a non-blocks dst_cache (pull_cache), size bytes of it
    (-1: the whole source row)."""
    check_isinstance("dst_cache" if dst_row is None else "cache", dst_cache, Cache)
    pl.check_open()
    dst_entry = live_entry(pl.mem, "dst_cache" if dst_row is None else "cache", dst_cache)
    ddesc = dst_cache.cache_desc
    blocks_key = isinstance(key, BlocksCacheKey)
    src_idx = _core.parse_indices("src_blocks", src_blocks) if dst_row is None else None
    dst_idx = _core.parse_indices("dst_blocks", dst_blocks) if dst_row is None else None
    tpl = transfer_args.check_tensor_num_per_layer(tpl)
    if dst_row is None:
        # checks made on every call raise directly: require's f-string message would be built
        # on every call
        if not dst_cache.is_blocks_cache:
            raise _fail(f"dst_cache {dst_cache.cache_id} must be a blocks cache")
        if not len(dst_idx):
            raise _fail("dst_blocks must not be empty")
        block_ops.check_indices_written_once("dst_blocks", dst_idx)
        if blocks_key:
            if not len(src_idx):
                raise _fail("src_blocks must not be empty with a BlocksCacheKey")
            if len(src_idx) != len(dst_idx):
                raise _fail(
                    f"src_blocks and dst_blocks must have the same length, got {len(src_idx)} "
                    f"and {len(dst_idx)}"
                )
        elif len(src_idx):
            raise _fail(
                "src_blocks must be empty unless src_cache_key is a "
                "BlocksCacheKey (the source row is cut into blocks)"
            )
        if dst_idx.max_value >= ddesc.batch_size:
            raise _fail(
                f"dst_blocks has block {dst_idx.max_value}, but dst_cache has "
                f"{ddesc.batch_size} blocks"
            )
    else:
        require(
            not dst_cache.is_blocks_cache,
            f"cache {dst_cache.cache_id} must not be a blocks cache (pull_blocks fills blocks)",
        )
        require(
            dst_row < ddesc.batch_size,
            f"batch_index {dst_row} must be < the batch size {ddesc.batch_size} of cache "
            f"{dst_cache.cache_id}",
        )
    peer = None
    if key.cluster_id != pl.cluster_id:
        peer = pl.ready_peer(key.cluster_id)
    pl.take_slot()  # a pull counts against llmdist.max_inflight_tasks like a write
    try:
        job = pl.run_planned(
            lambda: _pull_job(
                pl,
                what,
                key,
                dst_entry,
                dst_row,
                size,
                src_idx,
                dst_idx,
                src_range,
                dst_range,
                tpl,
                peer,
            ),
            [] if peer is None else [peer],
        )
    except BaseException:
        pl.slots.release()
        raise
    pl.finish(job, f"{what} from cluster {key.cluster_id}")
    return peer


def _pull_job(
    pl: Planner,
    what: str,
    key: Key,
    dst_entry: MemoryEntry,
    dst_row: Optional[int],
    size: int,
    src_idx,
    dst_idx,
    src_range,
    dst_range,
    tpl: int,
    peer,
):
    """Plan the pull (locks held) and launch its job."""
    plan, cfg, tpl, touched = _pull_plan(
        pl, what, key, dst_entry, dst_row, size, src_idx, dst_idx, src_range, dst_range, tpl, peer
    )
    job = _core.TransferJob(
        pl.runtime,
        plan,
        list(tensor_addrs_of(dst_entry.cache)),
        [cfg],
        None,
        pl.sync_timeout,
        tensors_per_layer=tpl,
    )
    pl.launch(job, dst_entry.cache.cache_id, [touched], here=pl.runs_here([cfg]))
    return job


def _pull_plan(
    pl: Planner,
    what: str,
    key: Key,
    dst_entry: MemoryEntry,
    dst_row: Optional[int],
    size: int,
    src_idx,
    dst_idx,
    src_range,
    dst_range,
    tpl: int,
    peer,
) -> Tuple[object, "_core.ConfigPlan", int, set]:
    """Resolve the source cache, check ranges and bounds on both sides (and, within this
    cluster, that no byte read is written), choose the route. Returns the byte plan, the
    layer loop's config, the tensors per layer and the (cluster, cache) pairs it touches."""
    memo_key = None
    call_tpl = tpl
    scope = memo_scope(peer, pl.runtime)
    if scope is not None and dst_row is None:
        # pulled before with the same key, caches and layers in this generation of both
        # clusters' memory: only this call's blocks are checked
        memo_key = (key, dst_entry, src_range, dst_range, tpl, len(src_idx) > 0) + scope
        hit = pl.memo.get(memo_key)
        if hit is not None:
            got = _memoised_pull(what, key, hit, dst_entry, src_idx, dst_idx, size)
            if got is not None:
                if peer is None:
                    _keep_local_pull(pl, what, key, dst_entry, hit, src_range, dst_range, call_tpl)
                return got
    mem = pl.mem if peer is None else peer.mem
    src_entry, row = find_key(mem, key)
    src = src_entry.cache
    if peer is not None and not src_entry.remote_accessible:
        raise LLMException(
            f"cache {src.cache_id} of cluster {key.cluster_id} is not remote accessible",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    sdesc, ddesc = src.cache_desc, dst_entry.cache.cache_desc
    src_layers, dst_layers, tpl = transfer_args.layer_ranges(
        src_range,
        dst_range,
        sdesc.num_tensors,
        ddesc.num_tensors,
        tpl,
        f"source cache {src.cache_id}",
        f"cache {dst_entry.cache.cache_id}",
    )
    plan, shift = _byte_plan(key, src_entry, row, dst_entry, dst_row, src_idx, dst_idx, size)
    # bounds: every source range inside its tensor of the cache the key names, every
    # destination range inside its tensor of dst_cache
    # (layer ranges have step 1: their tensors are one slice)
    srcs = tensor_addrs_of(src)[tpl * src_layers.start : tpl * src_layers.stop]
    sregions, bad = src_entry.locate(
        tpl * src_layers.start, tpl * src_layers.stop, plan.src_lo + shift, plan.src_hi + shift
    )
    if bad >= 0:
        raise LLMException(
            f"layer {src_layers.start + bad // tpl} of source cache {src.cache_id}: "
            f"[{srcs[bad] + plan.src_lo + shift:#x}, {srcs[bad] + plan.src_hi + shift:#x}) "
            f"is not inside memory registered or allocated on cluster {key.cluster_id}",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    daddrs = tensor_addrs_of(dst_entry.cache)
    doff = 0 if dst_row is None else dst_row * ddesc.stride
    dsts = daddrs[tpl * dst_layers.start : tpl * dst_layers.stop]
    if doff:
        dsts = [a + doff for a in dsts]
    dregions, bad = dst_entry.locate(
        tpl * dst_layers.start, tpl * dst_layers.stop, doff + plan.dst_lo, doff + plan.dst_hi
    )
    if bad >= 0:
        raise LLMException(
            f"layer {dst_layers.start + bad // tpl} of cache {dst_entry.cache.cache_id}: "
            f"[{dsts[bad] + plan.dst_lo:#x}, {dsts[bad] + plan.dst_hi:#x}) is not inside "
            f"memory registered or allocated here",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    kinds = pl.choose(Direction.READ, peer, ddesc.placement, sregions[:1])  # one source cache
    kind = copy_kind(sdesc.placement, ddesc.placement)
    touched = {(key.cluster_id, src.cache_id), (pl.cluster_id, dst_entry.cache.cache_id)}
    # The cache here (the destination) drives the layer loop: its layers, its row; the source
    # tensors are the targets, each already at the source row.
    targets = [a + shift for a in srcs] if shift else srcs
    check_overlap = peer is None and not transfer_args.apart(
        src, dst_entry.cache, dst_entry.origin == ALLOCATED
    )
    if check_overlap:
        block_ops.check_disjoint(
            what,
            plan,
            targets,
            dsts,
            transfer_args.range_params(src_idx, dst_idx, "the source row and batch_index"),
        )
    route = pl.build_route(peer, kinds, sregions)
    cfg = pl.plan_config(Direction.READ, route, dst_layers, doff, kind, targets, sregions, tpl)
    if memo_key is not None:
        fixed = _Fixed(src_entry, row, tpl, targets, dsts, check_overlap, ddesc)
        resolved = Resolved(None, 0, 0, frozenset(touched), cfg, fixed)
        pl.memo.put(memo_key, resolved)
        if peer is None:
            _keep_local_pull(pl, what, key, dst_entry, resolved, src_range, dst_range, call_tpl)
    return plan, cfg, tpl, touched


def _keep_local_pull(
    pl: Planner, what: str, key: Key, dst_entry: MemoryEntry, resolved, src_range, dst_range, tpl
) -> None:
    """Keep a LocalPull for later pull_blocks of this shape (lock held): block to block from a
    BlocksCacheKey of this cluster, with no overlap check, on the host runtime."""
    fixed = resolved.extra
    if (
        what != "pull_blocks"
        or type(key) is not BlocksCacheKey
        or not fixed.stride
        or fixed.check_overlap
        or not pl.runtime.is_host
        or pl.memo.local_pull(key, dst_entry.cache, src_range, dst_range, tpl) is not None
    ):
        return
    cache = dst_entry.cache
    pull = _core.LocalPull(
        planner=pl,
        mem=pl.mem,
        generation=pl.mem.generation,
        runtime=pl.runtime,
        config=resolved.config,
        dst_addrs=list(tensor_addrs_of(cache)),
        inflight_entry=((pl.cluster_id, cache.cache_id), [resolved.touched]),
        what=f"{what} from cluster {key.cluster_id}",
        stride=fixed.stride,
        src_blocks=fixed.src_blocks,
        dst_blocks=cache.cache_desc.batch_size,
        src_size=fixed.src_size,
        dst_size=fixed.dst_size,
        tensors_per_layer=fixed.tpl,
        wait_ms=pl.sync_timeout if pl.sync_timeout is not None else DEFAULT_WAIT_MS,
    )
    pl.memo.keep_local_pull(key, cache, src_range, dst_range, tpl, pull)


class _Fixed:
    """What a local pull resolved that does not depend on its blocks (kept in the memo)."""

    __slots__ = (
        "src_entry",
        "row",
        "tpl",
        "targets",
        "dsts",
        "check_overlap",
        "stride",
        "src_blocks",
        "src_size",
        "dst_size",
    )

    def __init__(
        self,
        src_entry: MemoryEntry,
        row: int,
        tpl: int,
        targets,
        dsts,
        check_overlap: bool,
        dst_desc,
    ) -> None:
        self.src_entry = src_entry
        self.row = row
        self.tpl = tpl
        self.targets = targets
        self.dsts = dsts
        self.check_overlap = check_overlap
        sdesc = src_entry.cache.cache_desc
        # B2B with the same block size on both sides: the case planned without _byte_plan
        same = src_entry.cache.is_blocks_cache and sdesc.stride == dst_desc.stride
        self.stride = sdesc.stride if same else 0
        self.src_blocks = sdesc.batch_size
        self.src_size = sdesc.size
        self.dst_size = dst_desc.size


def _memoised_pull(what: str, key: Key, hit, dst_entry: MemoryEntry, src_idx, dst_idx, size):
    """The plan of a local pull resolved before (plan_memo), when this call's byte ranges fit
    both caches' tensors; None sends the call through the full checks."""
    fixed = hit.extra
    if fixed.stride and len(src_idx):
        if src_idx.max_value >= fixed.src_blocks:
            return None  # refused by the full checks
        plan, shift = _core.plan_b2b(src_idx, dst_idx, fixed.stride), 0
    else:
        plan, shift = _byte_plan(
            key, fixed.src_entry, fixed.row, dst_entry, None, src_idx, dst_idx, size
        )
    if not (
        0 <= plan.src_lo + shift <= plan.src_hi + shift <= fixed.src_size
        and 0 <= plan.dst_lo <= plan.dst_hi <= fixed.dst_size
    ):
        return None
    if fixed.check_overlap:
        block_ops.check_disjoint(
            what,
            plan,
            fixed.targets,
            fixed.dsts,
            transfer_args.range_params(src_idx, dst_idx, "the source row and batch_index"),
        )
    return plan, hit.config, fixed.tpl, set(hit.touched)


def _byte_plan(
    key: Key,
    src_entry: MemoryEntry,
    row: int,
    dst_entry: MemoryEntry,
    dst_row,
    src_idx,
    dst_idx,
    size,
):
    """The pull's byte plan and the source row's offset: block to block, a source row cut into
    destination blocks, or row to row (dst_row)."""
    src = src_entry.cache
    sdesc, ddesc = src.cache_desc, dst_entry.cache.cache_desc
    stride = sdesc.stride
    shift = 0
    if src_idx is not None and len(src_idx):
        # B2B: the blocks of both caches must be the same size
        if not src.is_blocks_cache:
            raise _fail(f"source cache {src.cache_id} is not a blocks cache")
        if stride != ddesc.stride:
            raise _fail(
                f"the source's blocks are {stride} bytes, the "
                f"destination's {ddesc.stride}: they must be equal"
            )
        if src_idx.max_value >= sdesc.batch_size:
            raise _fail(
                f"src_blocks has block {src_idx.max_value}, but the source cache has "
                f"{sdesc.batch_size} blocks"
            )
        plan = _core.plan_b2b(src_idx, dst_idx, stride)
    else:
        if row >= sdesc.batch_size:
            raise _fail(
                f"{key!r} names row {row}, but the source cache has {sdesc.batch_size} rows"
            )
        shift = row * stride
        if dst_idx is not None:
            # C2B: the source row is cut into destination blocks
            plan = transfer_args.c2b_plan(dst_idx, stride, ddesc.stride, "dst_blocks")
        else:
            # C2C into one destination row
            check_int64("size", size)
            require(size == -1 or size > 0, f"size must be -1 or > 0, but got {size}")
            nbytes = stride if size == -1 else size
            require(
                nbytes <= stride, f"size {nbytes} is larger than the source row of {stride} bytes"
            )
            require(
                nbytes <= ddesc.stride,
                f"{nbytes} bytes do not fit the destination row of {ddesc.stride} bytes",
            )
            plan = _core.plan_c2c(nbytes)
    return plan, shift
