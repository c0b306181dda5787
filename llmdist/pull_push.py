"""pull_blocks, pull_cache, push_blocks, push_cache: synchronous moves of KV blocks and rows
between this cluster and a linked one (or within this cluster), spec section 8.

A pull is a transfer job whose source is the peer's memory and whose destination is a local
cache: it runs on the transfer workers like transfer_cache_async's layer loop (no GIL during the
copies), every layer ready at once, and reads through the route that reaches the peer: this
process's own memory, the peer's memory mapped here (shared memory, device IPC), process reads
(process_vm_readv) of memory the peer registered, or Mooncake batched reads. A push is a
transfer_cache_async call with one keyed config and no synchronizer, waited for. Both wait at
most llm.SyncKvCacheWaitTime ms and raise LLMException with the failure's status code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

from . import _core, block_ops, notifications
from ._core import Direction
from ._check import check_int64, check_isinstance, check_layer_range, check_uint32, require
from .descs import BlocksCacheKey, Cache, CacheKey, CacheKeyByIdAndIndex, Placement, copy_kind
from .registry import MemoryEntry
from .results import config_results
from .status import LLMException, LLMStatusCode
from .transfer_types import TransferWithCacheKeyConfig

if TYPE_CHECKING:
    from .cache_manager import CacheManager

# Upstream's llm.SyncKvCacheWaitTime when the option is not given.
DEFAULT_WAIT_MS = 1000

_PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
_NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST

Key = Union[CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey]


def _fail(message: str, code: LLMStatusCode = _PARAM_INVALID) -> LLMException:
    return LLMException(message, status_code=code)


def check_tensor_num_per_layer(value) -> int:
    """tensor_num_per_layer: a uint32, 1 (one tensor per layer, MLA) or 2 (K and V)."""
    check_uint32("tensor_num_per_layer", value)
    if value != 1 and value != 2:
        raise _fail(f"tensor_num_per_layer must be 1 or 2, but got {value}")
    return value


def layer_ranges(src_range: Optional[range], dst_range: Optional[range], src_tensors: int,
                 dst_tensors: int, tpl: int, src_name: str,
                 dst_name: str) -> Tuple[range, range, int]:
    """Check both layer ranges against the caches' layers (tpl tensors each). Returns the
    ranges and the tensors per layer to move with. Both None: every tensor, tensor i to tensor
    i (caches of one tensor, as in upstream's samples, have no K/V pair); one None: every
    layer of that cache."""
    check_layer_range("src_layer_range", src_range)
    check_layer_range("dst_layer_range", dst_range)
    if src_range is None and dst_range is None:
        require(src_tensors == dst_tensors,
                f"{src_name} has {src_tensors} tensors and {dst_name} {dst_tensors}: without "
                f"layer ranges every tensor is moved, so the counts must be equal")
        return range(src_tensors), range(dst_tensors), 1
    for name, tensors in ((src_name, src_tensors), (dst_name, dst_tensors)):
        require(tensors % tpl == 0, f"{name} has {tensors} tensors, not a multiple of "
                                    f"tensor_num_per_layer {tpl}")
    src = range(src_tensors // tpl) if src_range is None else src_range
    dst = range(dst_tensors // tpl) if dst_range is None else dst_range
    require(src.stop <= src_tensors // tpl,
            f"src_layer_range {src} is outside the {src_tensors // tpl} layers of {src_name}")
    require(dst.stop <= dst_tensors // tpl,
            f"dst_layer_range {dst} is outside the {dst_tensors // tpl} layers of {dst_name}")
    require(len(src) == len(dst), f"src_layer_range {src} and dst_layer_range {dst} must have "
                                  f"the same length")
    return src, dst, tpl


def wait_job(cm: "CacheManager", job, what: str) -> None:
    """Wait for a synchronous job (llm.SyncKvCacheWaitTime ms at most); raise its failure. A job
    still running at the deadline is cancelled (its queued copies land first) and reported as
    LLM_TIMEOUT."""
    wait_ms = cm._sync_timeout if cm._sync_timeout is not None else DEFAULT_WAIT_MS
    if not job.done.wait(wait_ms / 1000.0):
        job.cancel(LLMStatusCode.LLM_TIMEOUT)
        job.done.wait(max(wait_ms / 1000.0, 1.0))
        raise _fail(f"{what} did not finish within {wait_ms} ms (llm.SyncKvCacheWaitTime)",
                    LLMStatusCode.LLM_TIMEOUT)
    results, errors = config_results(job)
    code = results[0] if results else None
    if code == LLMStatusCode.LLM_SUCCESS:
        return
    if code is None:        # cancelled before any copy was issued
        code = job.cancel_code if job.cancel_code is not None else LLMStatusCode.LLM_FAILED
    raise _fail(f"{what} failed: {errors[0] if errors else None or code}", code)


# ------------------------------------------------------------------------------------------
# pull

def _local_cache(cm: "CacheManager", name: str, cache: Cache) -> MemoryEntry:
    check_isinstance(name, cache, Cache)
    cm._check_open()
    entry = cm._mem.entries.get(cache.cache_id)
    if not cache._valid or entry is None or entry.cache is not cache:
        raise _fail(f"{name} {cache.cache_id} is not allocated or registered in this cache "
                    f"manager", _NOT_EXIST)
    return entry


def _find(mem, key: Key) -> Tuple[MemoryEntry, int]:
    """The cache a key names on its cluster, and the row it names (0 for blocks)."""
    entry, row = mem.find(key)
    if entry is None:
        raise _fail(f"no cache for {key!r} on cluster {key.cluster_id}", _NOT_EXIST)
    return entry, row


def pull(cm: "CacheManager", what: str, key: Key, dst_cache: Cache, src_blocks, dst_blocks,
         dst_row: Optional[int], size: int, src_range: Optional[range],
         dst_range: Optional[range], tpl: int, notify: Optional[bytes] = None) -> None:
    """Copy from the cache key names on its cluster into dst_cache, synchronously; then send
    notify (when given) to that cluster.
    dst_row None: dst_blocks are the destination (pull_blocks); else row dst_row of a
    non-blocks dst_cache (pull_cache), size bytes of it (-1: the whole source row)."""
    payload = None if notify is None else notifications.check_payload("notify", notify)
    dst_entry = _local_cache(cm, "dst_cache" if dst_row is None else "cache", dst_cache)
    ddesc = dst_cache.cache_desc
    blocks_key = isinstance(key, BlocksCacheKey)
    src_idx = _core.parse_indices("src_blocks", src_blocks) if dst_row is None else None
    dst_idx = _core.parse_indices("dst_blocks", dst_blocks) if dst_row is None else None
    tpl = check_tensor_num_per_layer(tpl)
    if dst_row is None:
        require(dst_cache.is_blocks_cache, f"dst_cache {dst_cache.cache_id} must be a blocks cache")
        require(len(dst_idx) > 0, "dst_blocks must not be empty")
        block_ops.check_written_once("dst_blocks", dst_blocks)
        if blocks_key:
            require(len(src_idx) > 0, "src_blocks must not be empty with a BlocksCacheKey")
            require(len(src_idx) == len(dst_idx),
                    f"src_blocks and dst_blocks must have the same length, got {len(src_idx)} "
                    f"and {len(dst_idx)}")
        else:
            require(len(src_idx) == 0, "src_blocks must be empty unless src_cache_key is a "
                                       "BlocksCacheKey (the source row is cut into blocks)")
        require(dst_idx.max_value < ddesc.batch_size,
                f"dst_blocks has block {dst_idx.max_value}, but dst_cache has "
                f"{ddesc.batch_size} blocks")
    else:
        require(not dst_cache.is_blocks_cache, f"cache {dst_cache.cache_id} must not be a blocks "
                                               f"cache (pull_blocks fills blocks)")
        require(dst_row < ddesc.batch_size,
                f"batch_index {dst_row} must be < the batch size {ddesc.batch_size} of cache "
                f"{dst_cache.cache_id}")
    me = cm._cluster_id
    own = key.cluster_id == me
    peer = None
    if not own:
        peer = cm._linked_peer(key.cluster_id)
        peer.await_ipc_ready(cm._runtime)
        peer.check_transfer(cm._runtime)
    cm._take_slot()         # a pull counts against llmdist.max_inflight_tasks like a transfer
    try:
        with cm._lock:
            if own:
                spec, local_addrs, touched = _pull_plan(cm, key, dst_entry, dst_row, size,
                                                        src_idx, dst_idx, src_range, dst_range,
                                                        tpl, cm._mem, None, what)
            else:
                with peer.lock:
                    spec, local_addrs, touched = _pull_plan(cm, key, dst_entry, dst_row, size,
                                                            src_idx, dst_idx, src_range,
                                                            dst_range, tpl, peer.mem, peer)
            plan, cfg, tpl = spec
            job = _core.TransferJob(cm._runtime, plan, local_addrs, [cfg], None,
                                    cm._sync_timeout, tensors_per_layer=tpl)
            cm._launch(job, dst_cache.cache_id, [touched])
    except BaseException:
        cm._slots.release()
        raise
    wait_job(cm, job, f"{what} from cluster {key.cluster_id}")
    if type(key) is CacheKey:
        # a pull by CacheKey releases the key (as upstream): here, or on the peer
        if own:
            cm.release_key(key)
        else:
            peer.pulled_by_key(key)
    if payload is not None:
        cm._notify_now(key.cluster_id, payload, what)


def _pull_plan(cm: "CacheManager", key: Key, dst_entry: MemoryEntry, dst_row: Optional[int],
               size: int, src_idx, dst_idx, src_range, dst_range, tpl: int, mem, peer,
               what: str = "pull"):
    """Resolve the source cache, check ranges and bounds on both sides (and, within this
    cluster, that no byte read is written), choose the route. Returns ((plan, layer-loop config), source tensor addresses as this process reaches
    them, the (cluster, cache) pairs the job touches)."""
    src_entry, row = _find(mem, key)
    src = src_entry.cache
    if peer is not None and not src_entry.remote_accessible:
        raise _fail(f"cache {src.cache_id} of cluster {key.cluster_id} is not remote accessible")
    sdesc, ddesc = src.cache_desc, dst_entry.cache.cache_desc
    src_layers, dst_layers, tpl = layer_ranges(src_range, dst_range, sdesc.num_tensors,
                                               ddesc.num_tensors, tpl,
                                               f"source cache {src.cache_id}",
                                               f"cache {dst_entry.cache.cache_id}")
    stride = sdesc.stride
    shift = 0
    if src_idx is not None and len(src_idx):
        # B2B: the blocks of both caches must be the same size
        require(src.is_blocks_cache, f"source cache {src.cache_id} is not a blocks cache")
        require(stride == ddesc.stride, f"the source's blocks are {stride} bytes, the "
                                        f"destination's {ddesc.stride}: they must be equal")
        require(src_idx.max_value < sdesc.batch_size,
                f"src_blocks has block {src_idx.max_value}, but the source cache has "
                f"{sdesc.batch_size} blocks")
        plan = _core.plan_b2b(src_idx, dst_idx, stride)
    else:
        require(row < sdesc.batch_size, f"{key!r} names row {row}, but the source cache has "
                                        f"{sdesc.batch_size} rows")
        shift = row * stride
        if dst_idx is not None:
            # C2B: the source row is cut into destination blocks
            block = ddesc.stride
            chunks = -(-stride // block)
            require(len(dst_idx) <= chunks,
                    f"dst_blocks has {len(dst_idx)} blocks, but a source row of {stride} bytes "
                    f"fills at most {chunks} blocks of {block} bytes")
            plan = _core.plan_c2b(dst_idx, stride, block)
        else:
            # C2C into one destination row
            check_int64("size", size)
            require(size == -1 or size > 0, f"size must be -1 or > 0, but got {size}")
            nbytes = stride if size == -1 else size
            require(nbytes <= stride, f"size {nbytes} is larger than the source row of "
                                      f"{stride} bytes")
            require(nbytes <= ddesc.stride, f"{nbytes} bytes do not fit the destination row of "
                                            f"{ddesc.stride} bytes")
            plan = _core.plan_c2c(nbytes)
    # bounds: every source range inside its tensor of the cache the key names, every
    # destination range inside its tensor of dst_cache
    # (layer ranges have step 1: their tensors are one slice)
    srcs = src._tensor_addrs[tpl * src_layers.start:tpl * src_layers.stop]
    sregions, bad = src_entry.locate(tpl * src_layers.start, tpl * src_layers.stop,
                                     plan.src_lo + shift, plan.src_hi + shift)
    if bad >= 0:
        raise _fail(f"layer {src_layers.start + bad // tpl} of source cache {src.cache_id}: "
                    f"[{srcs[bad] + plan.src_lo + shift:#x}, {srcs[bad] + plan.src_hi + shift:#x}) "
                    f"is not inside memory registered or allocated on cluster {key.cluster_id}")
    daddrs = dst_entry.cache._tensor_addrs
    doff = 0 if dst_row is None else dst_row * ddesc.stride
    dsts = daddrs[tpl * dst_layers.start:tpl * dst_layers.stop]
    if doff:
        dsts = [a + doff for a in dsts]
    dregions, bad = dst_entry.locate(tpl * dst_layers.start, tpl * dst_layers.stop,
                                     doff + plan.dst_lo, doff + plan.dst_hi)
    if bad >= 0:
        raise _fail(f"layer {dst_layers.start + bad // tpl} of cache {dst_entry.cache.cache_id}: "
                    f"[{dsts[bad] + plan.dst_lo:#x}, {dsts[bad] + plan.dst_hi:#x}) is not inside "
                    f"memory registered or allocated here")
    if sdesc.placement == Placement.HOST and ddesc.placement == Placement.DEVICE and peer is not None:
        raise _fail("a HOST source cache of another cluster cannot be pulled into DEVICE memory")
    kind = copy_kind(sdesc.placement, ddesc.placement)
    touched = {(key.cluster_id, src.cache_id), (cm._cluster_id, dst_entry.cache.cache_id)}
    # The cache here (the destination) drives the layer loop: its layers, its row; the source
    # tensors are the targets, each already at the source row.
    targets = [a + shift for a in srcs] if shift else srcs
    if peer is None:
        block_ops.check_disjoint(what, plan, targets, dsts,
                                 range_params(src_idx, dst_idx, "the source row and batch_index"))
    route = cm._route(peer, sregions)
    cfg = cm._config_plan(route, dst_layers, doff, kind, targets, sregions, Direction.READ, tpl)
    return (plan, cfg, tpl), list(daddrs), touched


def range_params(src_idx, dst_idx, rows: str) -> str:
    """The arguments that chose the byte ranges of a pull or push, for its error messages
    (rows: those of a row-to-row copy)."""
    if src_idx is not None and len(src_idx):
        return "src_blocks and dst_blocks"
    if dst_idx is not None:
        return "the source row and dst_blocks"
    return rows


# ------------------------------------------------------------------------------------------
# push

def push(cm: "CacheManager", what: str, key: Union[BlocksCacheKey, CacheKeyByIdAndIndex],
         src_cache: Cache, src_blocks: Optional[Sequence[int]], dst_blocks: Optional[Sequence[int]],
         src_batch_index: int, src_range: Optional[range], dst_range: Optional[range],
         tpl: int, notify: Optional[bytes] = None) -> None:
    """Write src_cache's blocks or row into the cache key names on its cluster, synchronously:
    one keyed transfer_cache_async config with every layer ready, waited for; then send notify
    (when given) to that cluster."""
    check_isinstance("src_cache", src_cache, Cache)
    payload = None if notify is None else notifications.check_payload("notify", notify)
    tpl = check_tensor_num_per_layer(tpl)
    check_layer_range("src_layer_range", src_range)
    check_layer_range("dst_layer_range", dst_range)
    tensors = src_cache.cache_desc.num_tensors
    if src_range is None and dst_range is None:
        # every tensor to the same tensor (see layer_ranges); the destination's count is
        # checked against the ranges when the key is resolved
        src_range = dst_range = range(tensors)
        tpl = 1
    src_range = range(tensors // tpl) if src_range is None else src_range
    dst_range = range(tensors // tpl) if dst_range is None else dst_range
    require(len(src_range) == len(dst_range), f"src_layer_range {src_range} and "
                                              f"dst_layer_range {dst_range} must have the same "
                                              f"length")
    cfg = TransferWithCacheKeyConfig(key, src_range, dst_range, src_batch_index)
    if dst_blocks is not None:
        _core.parse_indices("dst_blocks", dst_blocks)
        block_ops.check_written_once("dst_blocks", dst_blocks)
    block_size = None
    if dst_blocks is not None and not src_blocks:
        # C2B: the source row is cut into blocks of the destination's block size
        block_size = _remote_block_size(cm, key)
    job, _ = cm._start_transfer(src_cache, None, [cfg], src_blocks or None, dst_blocks,
                                block_size, tpl, False, what)
    wait_job(cm, job, f"{what} to cluster {key.cluster_id}")
    if payload is not None:
        cm._notify_now(key.cluster_id, payload, what)


def _remote_block_size(cm: "CacheManager", key: BlocksCacheKey) -> int:
    """The block size of the blocks cache key names on its cluster."""
    mem = cm._mem if key.cluster_id == cm._cluster_id else cm._linked_peer(key.cluster_id).mem
    entry, _ = _find(mem, key)
    return entry.cache.cache_desc.stride
