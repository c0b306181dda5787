"""pull_blocks, pull_cache, push_blocks, push_cache between processes on 127.0.0.1 (spec section
8), on every route in the direction it needs: the peer's allocated memory mapped here (shared
memory), memory the peer registered (process_vm_readv / process_vm_writev), Mooncake Transfer
Engine (batched reads / writes), and this cluster's own memory. Every destination byte is
compared with what the source held, and every other byte (the rest of the tensors, the guard
bytes around registered tensors) must be unchanged."""

from __future__ import annotations

import os
import threading
import time

import pytest

from llmdist import (
    BlocksCacheKey,
    CacheKey,
    CacheKeyByIdAndIndex,
    LayerSynchronizer,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

from .decode_procs import cluster_info
from .helpers import assert_mem_equal
from .pull_push_routes import (
    DEVICE_RUNTIME,
    FP16,
    HAVE_MOONCAKE,
    HOST_ONLY,
    LINK_MS,
    NO_ENGINE,
    PEER_MEM,
    ROUTE_IDS,
    ROUTES,
    _ids,
    _seeds,
    expect_blocks,
    link_to,
    peer_proc,
)

# every test runs on each runtime (runtime_params.py)
pytestmark = pytest.mark.all_runtimes

SUCCESS = LLMStatusCode.LLM_SUCCESS
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
NOT_YET_LINK = LLMStatusCode.LLM_NOT_YET_LINK
LINK_FAILED = LLMStatusCode.LLM_LINK_FAILED
TIMEOUT = LLMStatusCode.LLM_TIMEOUT


# --------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("tpl", [2, 1])
def test_pull_blocks_b2b(cleanup, local, route, tpl):
    mem, transport = route
    p = peer_proc(cleanup, transport)
    model = next(_seeds)
    src = cleanup.dcache(p, mem, 6, [12, 128], blocks=True, key=("blocks", model), seed=model)
    d = local(transport=transport)
    dst = d.registered(8, [16, 128], dtype=FP16, blocks=True)
    link_to(d, p)
    pairs = [(3, 8), (4, 9), (5, 10), (0, 2), (11, 15)]
    sl, dl = (range(1, 3), range(2, 4)) if tpl == 2 else (range(1, 5), range(3, 7))
    before = dst.snapshot()
    d.cm.pull_blocks(
        BlocksCacheKey(p.cluster_id, model),
        dst.cache,
        [s for s, _ in pairs],
        [b for _, b in pairs],
        src_layer_range=sl,
        dst_layer_range=dl,
        tensor_num_per_layer=tpl,
    )
    want = expect_blocks(
        before, dst.tensors, 256, src.initial, src.tensors, 256, sl, dl, tpl, pairs=pairs
    )
    assert_mem_equal(dst.mem(), want, "pulled blocks")
    assert_mem_equal(src.read(), src.initial, "the source after a pull")
    # all layers (None ranges) with the same layer counts on both sides
    dst2 = d.allocated(6, [12, 128], dtype=FP16, blocks=True)
    before = dst2.snapshot()
    d.cm.pull_blocks(
        BlocksCacheKey(p.cluster_id, model), dst2.cache, [1, 7], [0, 11], tensor_num_per_layer=tpl
    )
    layers = range(6 // tpl)
    want = expect_blocks(
        before,
        dst2.tensors,
        256,
        src.initial,
        src.tensors,
        256,
        layers,
        layers,
        tpl,
        pairs=[(1, 0), (7, 11)],
    )
    assert_mem_equal(dst2.mem(), want, "pulled blocks, every layer")


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_pull_row_into_blocks_and_into_row(cleanup, local, route):
    """C2B (a CacheKeyByIdAndIndex row cut into blocks) and pull_cache (C2C into a row)."""
    mem, transport = route
    p = peer_proc(cleanup, transport)
    req = next(_seeds)
    src = cleanup.dcache(p, mem, 8, [3, 2, 100], seed=req)  # rows of 400 bytes
    d = local(transport=transport)
    link_to(d, p)
    blocks = d.registered(12, [10, 64], dtype=FP16, blocks=True)  # blocks of 128 bytes
    before = blocks.snapshot()
    d.cm.pull_blocks(
        CacheKeyByIdAndIndex(p.cluster_id, src.cache_id, 1),
        blocks.cache,
        [],
        [7, 2, 9, 0],
        src_layer_range=range(0, 4),
        dst_layer_range=range(2, 6),
    )
    want = expect_blocks(
        before,
        blocks.tensors,
        128,
        src.initial,
        src.tensors,
        400,
        range(0, 4),
        range(2, 6),
        2,
        c2b=[7, 2, 9, 0],
        row=1,
    )
    assert_mem_equal(blocks.mem(), want, "row pulled into blocks")
    rows = d.allocated(12, [5, 200], dtype=FP16)  # rows of 400 bytes
    pull_row(d, p, src, rows, 2, 3, -1, range(1, 4), range(0, 3), "row pulled into a row")
    pull_row(d, p, src, rows, 0, 4, 150, range(0, 1), range(5, 6), "the first 150 bytes of a row")


def pull_row(d, p, src, rows, row, dst_row, size, src_range, dst_range, what):
    """pull_cache of size bytes (-1: all 400) of src's row into row dst_row of rows, for the
    layers of src_range into dst_range; rows then holds exactly that."""
    before = rows.snapshot()
    d.cm.pull_cache(
        CacheKeyByIdAndIndex(p.cluster_id, src.cache_id, row),
        rows.cache,
        dst_row,
        size,
        src_layer_range=src_range,
        dst_layer_range=dst_range,
    )
    want = expect_blocks(
        before,
        rows.tensors,
        400,
        src.initial,
        src.tensors,
        400,
        src_range,
        dst_range,
        2,
        row=row,
        dst_row=dst_row,
        nbytes=None if size == -1 else size,
    )
    assert_mem_equal(rows.mem(), want, what)


def test_pull_cache_by_cache_key_rows(cleanup, local):
    """Without remote-accessible mode a CacheKey names a row: the i-th key of the cache."""
    p = cleanup.spawn(
        next(_ids), role=LLMRole.PROMPT, options={"llmdist.transport": "direct"}
    ).wait_ready()
    req = next(_seeds)
    src = cleanup.dcache(p, "allocated", 4, [1, 2, 100], key=("cache", req), seed=req)
    d = local()
    link_to(d, p)
    rows = d.registered(4, [2, 200], dtype=FP16)
    before = rows.snapshot()
    d.cm.pull_cache(CacheKey(p.cluster_id, req), rows.cache, 1)
    want = expect_blocks(
        before,
        rows.tensors,
        400,
        src.initial,
        src.tensors,
        400,
        range(2),
        range(2),
        2,
        row=0,
        dst_row=1,
    )
    assert_mem_equal(rows.mem(), want)


def test_pull_from_own_cluster(local):
    """The local route: the source key names a cache of this cluster."""
    d = local()
    src = d.registered(4, [8, 64], blocks=True, key=BlocksCacheKey(d.cluster_id, 5))
    dst = d.allocated(4, [8, 64], blocks=True)
    before = dst.snapshot()
    d.cm.pull_blocks(BlocksCacheKey(d.cluster_id, 5), dst.cache, [7, 0], [1, 6])
    want = expect_blocks(
        before,
        dst.tensors,
        64,
        src.mem(),
        src.tensors,
        64,
        range(2),
        range(2),
        2,
        pairs=[(7, 1), (0, 6)],
    )
    assert_mem_equal(dst.mem(), want)


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("tpl", [2, 1])
def test_push_blocks(cleanup, local, route, tpl):
    mem, transport = route
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": transport}).wait_ready()
    model = next(_seeds)
    dst = cleanup.dcache(dproc, mem, 8, [16, 128], blocks=True, key=("blocks", model), seed=model)
    p = local(remote=True, transport=transport, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(6, [12, 128], dtype=FP16, blocks=True)
    pairs = [(2, 3), (3, 4), (9, 0)]
    sl, dl = (range(0, 2), range(1, 3)) if tpl == 2 else (range(2, 6), range(4, 8))
    p.cm.push_blocks(
        BlocksCacheKey(dproc.cluster_id, model),
        src.cache,
        [s for s, _ in pairs],
        [b for _, b in pairs],
        sl,
        dl,
        tpl,
    )
    want = expect_blocks(
        dst.initial, dst.tensors, 256, src.mem(), src.tensors, 256, sl, dl, tpl, pairs=pairs
    )
    assert_mem_equal(dst.read(), want, "pushed blocks")


@pytest.mark.parametrize("route", ROUTES[:2], ids=ROUTE_IDS[:2])
def test_push_cache(cleanup, local, route):
    mem, transport = route
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": transport}).wait_ready()
    dst = cleanup.dcache(dproc, mem, 12, [5, 200], seed=next(_seeds))
    p = local(remote=True, transport=transport, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(8, [3, 2, 100], dtype=FP16)
    p.cm.push_cache(
        CacheKeyByIdAndIndex(dproc.cluster_id, dst.cache_id, 4),
        src.cache,
        2,
        range(1, 3),
        range(4, 6),
    )
    want = expect_blocks(
        dst.initial,
        dst.tensors,
        400,
        src.mem(),
        src.tensors,
        400,
        range(1, 3),
        range(4, 6),
        2,
        row=2,
        dst_row=4,
    )
    assert_mem_equal(dst.read(), want, "pushed row")


@HOST_ONLY
@pytest.mark.parametrize("transport", ["direct", pytest.param("mooncake", marks=NO_ENGINE)])
def test_push_into_registered_host_memory(cleanup, local, transport):
    """HOST memory the peer registered (a serving engine's CPU KV tensors) takes pushes: process
    writes on the direct path, engine writes through Mooncake."""
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": transport}).wait_ready()
    model = next(_seeds)
    dst = cleanup.dcache(
        dproc,
        "registered",
        4,
        [16, 128],
        blocks=True,
        key=("blocks", model),
        seed=model,
        placement="HOST",
        remote_accessible=True,
    )
    p = local(remote=True, transport=transport, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True, placement=Placement.HOST)
    pairs = [(4, 1), (0, 15), (11, 7)]
    p.cm.push_blocks(
        BlocksCacheKey(dproc.cluster_id, model),
        src.cache,
        [s for s, _ in pairs],
        [b for _, b in pairs],
        tensor_num_per_layer=1,
    )
    want = expect_blocks(
        dst.initial,
        dst.tensors,
        256,
        src.mem(),
        src.tensors,
        256,
        range(4),
        range(4),
        1,
        pairs=pairs,
    )
    assert_mem_equal(dst.read(), want, "pushed into registered HOST memory")


def test_registered_host_destination_here(local):
    """A registered HOST destination in this cluster: written on the host runtime; refused with
    the reason on a device runtime, whose asynchronous copies need page-locked host memory."""
    d = local(remote=True)
    src = d.registered(4, [8, 64], blocks=True)
    dst = d.registered(
        4,
        [8, 64],
        blocks=True,
        placement=Placement.HOST,
        key=BlocksCacheKey(d.cluster_id, 77),
        remote_accessible=True,
    )
    before = dst.snapshot()

    def call():
        return d.cm.push_blocks(BlocksCacheKey(d.cluster_id, 77), src.cache, [2, 5], [6, 0])

    if DEVICE_RUNTIME:
        assert code_of(call) == PARAM_INVALID
        with pytest.raises(LLMException, match="page-locked"):
            call()
        assert_mem_equal(dst.mem(), before)
        return
    call()
    want = expect_blocks(
        before,
        dst.tensors,
        64,
        src.mem(),
        src.tensors,
        64,
        range(2),
        range(2),
        2,
        pairs=[(2, 6), (5, 0)],
    )
    assert_mem_equal(dst.mem(), want)


# --------------------------------------------------------------------------------------------
# errors and faults
# --------------------------------------------------------------------------------------------
def code_of(fn, *args, **kwargs):
    with pytest.raises(LLMException) as ei:
        fn(*args, **kwargs)
    return ei.value.status_code


def test_pull_argument_errors(cleanup, local):
    p = peer_proc(cleanup, "direct")
    model = next(_seeds)
    cleanup.dcache(p, "allocated", 4, [8, 128], blocks=True, key=("blocks", model))
    d = local()
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    rows = d.registered(4, [8, 128], dtype=FP16)
    small = d.registered(4, [8, 64], dtype=FP16, blocks=True)
    key = BlocksCacheKey(p.cluster_id, model)
    pull = d.cm.pull_blocks
    # not linked yet
    assert code_of(pull, key, dst.cache, [0], [0]) == NOT_YET_LINK
    link_to(d, p)
    before = dst.snapshot()
    with pytest.raises(TypeError):
        pull("key", dst.cache, [0], [0])
    with pytest.raises(TypeError):
        pull(key, dst.cache, [0], "0")
    with pytest.raises(ValueError):
        pull(key, dst.cache, [-1], [0])
    assert code_of(pull, key, rows.cache, [0], [0]) == PARAM_INVALID  # not a blocks cache
    assert code_of(pull, key, dst.cache, [0], []) == PARAM_INVALID  # no dst blocks
    assert code_of(pull, key, dst.cache, [], [0]) == PARAM_INVALID  # B2B without src
    assert code_of(pull, key, dst.cache, [0, 1], [0]) == PARAM_INVALID  # lengths differ
    assert code_of(pull, key, dst.cache, [8], [0]) == PARAM_INVALID  # past the source
    assert code_of(pull, key, dst.cache, [0], [8]) == PARAM_INVALID  # past the dest
    assert code_of(pull, key, small.cache, [0], [0]) == PARAM_INVALID  # block sizes differ
    assert code_of(pull, key, dst.cache, [0], [0], tensor_num_per_layer=3) == PARAM_INVALID
    assert (
        code_of(
            pull, key, dst.cache, [0], [0], src_layer_range=range(0, 2), dst_layer_range=range(0, 1)
        )
        == PARAM_INVALID
    )
    assert (
        code_of(
            pull, key, dst.cache, [0], [0], src_layer_range=range(1, 3), dst_layer_range=range(0, 2)
        )
        == PARAM_INVALID
    )  # past the layers
    assert (
        code_of(pull, BlocksCacheKey(p.cluster_id, model + 1000), dst.cache, [0], [0]) == NOT_EXIST
    )
    assert (
        code_of(pull, CacheKeyByIdAndIndex(p.cluster_id, 1, 0), dst.cache, [0], [0])
        == PARAM_INVALID
    )  # C2B with src blocks
    assert (
        code_of(pull, CacheKeyByIdAndIndex(p.cluster_id, 2**40, 0), dst.cache, [], [0]) == NOT_EXIST
    )
    assert (
        code_of(d.cm.pull_cache, CacheKeyByIdAndIndex(p.cluster_id, 1, 0), dst.cache)
        == PARAM_INVALID
    )  # blocks dest
    assert (
        code_of(d.cm.pull_cache, CacheKeyByIdAndIndex(p.cluster_id, 1, 0), rows.cache, 0, 0)
        == PARAM_INVALID
    )  # size 0
    assert code_of(d.cm.push_blocks, key, dst.cache, [0], [0]) == PARAM_INVALID  # not remote mode
    assert_mem_equal(dst.mem(), before, "the destination after refused pulls")


def test_push_argument_errors(cleanup, local):
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": "direct"}).wait_ready()
    model = next(_seeds)
    dst = cleanup.dcache(dproc, "allocated", 4, [8, 128], blocks=True, key=("blocks", model))
    p = local(remote=True, role=LLMRole.PROMPT)
    src = p.registered(4, [8, 128], dtype=FP16, blocks=True)
    rows = p.registered(4, [8, 128], dtype=FP16)
    key = BlocksCacheKey(dproc.cluster_id, model)
    assert code_of(p.cm.push_blocks, key, src.cache, [0], [0]) == NOT_YET_LINK
    link_to(p, dproc)
    assert code_of(p.cm.push_blocks, key, rows.cache, [0], [0]) == PARAM_INVALID
    assert code_of(p.cm.push_blocks, key, src.cache, [0], []) == PARAM_INVALID
    assert code_of(p.cm.push_blocks, key, src.cache, [0], [8]) == PARAM_INVALID  # bounds
    assert (
        code_of(p.cm.push_blocks, BlocksCacheKey(dproc.cluster_id, model + 99), src.cache, [0], [0])
        == NOT_EXIST
    )
    with pytest.raises(TypeError):
        p.cm.push_blocks(CacheKeyByIdAndIndex(dproc.cluster_id, dst.cache_id), src.cache, [0], [0])
    idkey = CacheKeyByIdAndIndex(dproc.cluster_id, dst.cache_id, 0)
    assert code_of(p.cm.push_cache, idkey, src.cache) == PARAM_INVALID  # blocks source
    assert code_of(p.cm.push_cache, idkey, rows.cache, 0, None, None, 16) == PARAM_INVALID
    assert_mem_equal(dst.read(), dst.initial, "the destination after refused pushes")


def test_withdrawn_unlinked_and_dead_peer(cleanup, local):
    """A pull of a cache the peer withdrew is LLM_KV_CACHE_NOT_EXIST; after an unlink
    LLM_NOT_YET_LINK; after the peer died LLM_LINK_FAILED (or LLM_NOT_YET_LINK once the link
    noticed). Each call ends at once and the next pull from a live peer works."""
    p = peer_proc(cleanup, "direct")
    m1, m2 = next(_seeds), next(_seeds)
    a = cleanup.dcache(p, "allocated", 4, [8, 128], blocks=True, key=("blocks", m1))
    cleanup.dcache(p, PEER_MEM, 4, [8, 128], blocks=True, key=("blocks", m2))
    d = local()
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    link_to(d, p)
    p.call("release", a.name)
    cleanup.caches.remove(a)
    assert (
        code_of(d.cm.pull_blocks, BlocksCacheKey(p.cluster_id, m1), dst.cache, [0], [0])
        == NOT_EXIST
    )
    d.cm.pull_blocks(BlocksCacheKey(p.cluster_id, m2), dst.cache, [0], [0])
    assert d.dd.unlink_clusters([cluster_info(p.cluster_id)], LINK_MS) == (SUCCESS, [SUCCESS])
    assert (
        code_of(d.cm.pull_blocks, BlocksCacheKey(p.cluster_id, m2), dst.cache, [0], [0])
        == NOT_YET_LINK
    )
    link_to(d, p)
    d.cm.pull_blocks(BlocksCacheKey(p.cluster_id, m2), dst.cache, [1], [1])
    p.kill()
    t0 = time.monotonic()
    assert code_of(d.cm.pull_blocks, BlocksCacheKey(p.cluster_id, m2), dst.cache, [0], [0]) in (
        LINK_FAILED,
        NOT_YET_LINK,
    )
    assert time.monotonic() - t0 < 5.0


def test_timeout_ends_the_call_and_nothing_hangs(cleanup, local):
    """llm.SyncKvCacheWaitTime bounds a pull: a pull that cannot finish in 1 ms raises
    LLM_TIMEOUT after its queued copies landed, and the next pull works."""
    p = peer_proc(cleanup, "direct")
    model = next(_seeds)
    src = cleanup.dcache(p, PEER_MEM, 16, [64, 16384], blocks=True, key=("blocks", model))
    d = local(**{"llm.SyncKvCacheWaitTime": "1"})
    dst = d.allocated(16, [64, 16384], dtype=FP16, blocks=True)
    link_to(d, p)
    blocks = list(range(64))
    assert (
        code_of(
            d.cm.pull_blocks, BlocksCacheKey(p.cluster_id, model), dst.cache, blocks, blocks[::-1]
        )
        == TIMEOUT
    )
    d2 = local()
    link_to(d2, p)
    dst2 = d2.registered(16, [64, 16384], dtype=FP16, blocks=True)
    before = dst2.snapshot()
    d2.cm.pull_blocks(BlocksCacheKey(p.cluster_id, model), dst2.cache, [5], [6])
    want = expect_blocks(
        before,
        dst2.tensors,
        32768,
        src.initial,
        src.tensors,
        32768,
        range(8),
        range(8),
        2,
        pairs=[(5, 6)],
    )
    assert_mem_equal(dst2.mem(), want)


class Blocker(LayerSynchronizer):
    """Holds the transfer worker that runs it inside its first layer until go is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def synchronize_layer(self, layer: int, timeout) -> bool:
        self.entered.set()
        return self.go.wait(60)


class Call:
    """fn(*args) on a thread of its own: the status code it raised (SUCCESS when it returned)
    and when it ended."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.code = None
        self.ended = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            fn(*args, **kwargs)
            self.code = SUCCESS
        except LLMException as exc:
            self.code = exc.status_code
        finally:
            self.ended = time.monotonic()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the call did not end within {timeout} s"
        return self.code


def in_flight(cm, n: int, timeout: float = 10.0) -> None:
    """Wait until n tasks of cm are in flight (submitted and not finished)."""
    deadline = time.monotonic() + timeout
    while len(cm.transfers.inflight) < n:
        assert time.monotonic() < deadline, f"{n} tasks never got in flight"
        time.sleep(0.005)


def other_side(cleanup, op: str):
    """The peer a pull reads from (a PROMPT in remote-accessible mode) or a push writes to (a
    DECODER)."""
    if op == "pull":
        return peer_proc(cleanup, "direct")
    return cleanup.spawn(next(_ids), options={"llmdist.transport": "direct"}).wait_ready()


@pytest.mark.parametrize("op", ["pull", "push"])
@pytest.mark.parametrize("event", ["withdrawn", "unlinked", "peer-died"])
def test_peer_event_during_the_call_ends_it(cleanup, local, event, op):
    """A pull_blocks / push_blocks under way (submitted, waiting for the one transfer worker)
    when the peer's cache is withdrawn, the link is taken down or the peer dies ends at once
    with LLM_KV_CACHE_NOT_EXIST / LLM_LINK_FAILED / LLM_LINK_FAILED, long before
    llm.SyncKvCacheWaitTime (60 s here); nothing of it lands, the transfer that held the worker
    still completes, and a later call with a live cache works."""
    p = other_side(cleanup, op)
    m1, m2 = next(_seeds), next(_seeds)
    gone = cleanup.dcache(p, "allocated", 4, [8, 128], blocks=True, key=("blocks", m1), seed=m1)
    live = cleanup.dcache(p, PEER_MEM, 4, [8, 128], blocks=True, key=("blocks", m2), seed=m2)
    options = {"llm.SyncKvCacheWaitTime": "60000", "llmdist.transfer_workers": "1"}
    d = local(**options) if op == "pull" else local(remote=True, role=LLMRole.PROMPT, **options)
    here = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    link_to(d, p)
    move = d.cm.pull_blocks if op == "pull" else d.cm.push_blocks
    # hold the only worker: a transfer within this cluster waiting in its synchronizer
    own_src = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    own_key = BlocksCacheKey(d.cluster_id, next(_seeds))
    own_dst = d.registered(4, [8, 128], dtype=FP16, blocks=True, key=own_key)
    cfg = (
        TransferConfig(d.cluster_id, own_dst.addrs)
        if op == "pull"  # remote-accessible
        else TransferWithCacheKeyConfig(own_key, range(2), range(2))
    )  # mode needs keys
    blocker = Blocker()
    held = d.cm.transfer_cache_async(own_src.cache, blocker, [cfg], [0], [1])
    assert blocker.entered.wait(10)
    before = here.snapshot()
    call = Call(move, BlocksCacheKey(p.cluster_id, m1), here.cache, [0, 1], [2, 3])
    in_flight(d.cm, 2)
    t0 = time.monotonic()
    if event == "withdrawn":
        p.call("release", gone.name)
        cleanup.caches.remove(gone)
        want = NOT_EXIST
    elif event == "unlinked":
        assert d.dd.unlink_clusters([cluster_info(p.cluster_id)], LINK_MS) == (SUCCESS, [SUCCESS])
        want = LINK_FAILED
    else:
        p.kill()
        want = LINK_FAILED
    assert call.join(10) == want
    assert call.ended - t0 < 10
    blocker.go.set()
    assert held.synchronize(10000) == SUCCESS
    assert_mem_equal(here.mem(), before, f"this side of the ended {op}")
    if event == "unlinked" and op == "push":
        assert_mem_equal(gone.read(), gone.initial, "the peer's cache after the ended push")
    if event == "peer-died":
        p = other_side(cleanup, op)
        m2 = next(_seeds)
        live = cleanup.dcache(p, PEER_MEM, 4, [8, 128], blocks=True, key=("blocks", m2), seed=m2)
    if event != "withdrawn":
        link_to(d, p)
    move(BlocksCacheKey(p.cluster_id, m2), here.cache, [4], [5])
    if op == "pull":
        want_mem = expect_blocks(
            before,
            here.tensors,
            256,
            live.initial,
            live.tensors,
            256,
            range(2),
            range(2),
            2,
            pairs=[(4, 5)],
        )
        assert_mem_equal(here.mem(), want_mem, "a pull after the ended one")
    else:
        want_mem = expect_blocks(
            live.initial,
            live.tensors,
            256,
            here.mem(),
            here.tensors,
            256,
            range(2),
            range(2),
            2,
            pairs=[(4, 5)],
        )
        assert_mem_equal(live.read(), want_mem, "a push after the ended one")


@pytest.mark.skipif(
    not DEVICE_RUNTIME,
    reason="refusals of device runtimes; the host runtime "
    "reaches these caches (test_pull_blocks_b2b)",
)
def test_device_runtime_refusals(cleanup, local):
    """On a device runtime, DEVICE memory another process registered and a peer reached
    through Mooncake are refused with LLM_FEATURE_NOT_ENABLED and the reason, before anything
    moves."""
    p = peer_proc(cleanup, "direct")
    model = next(_seeds)
    cleanup.dcache(p, "registered", 4, [8, 128], blocks=True, key=("blocks", model))
    d = local()
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    link_to(d, p)
    before = dst.snapshot()
    with pytest.raises(LLMException) as ei:
        d.cm.pull_blocks(BlocksCacheKey(p.cluster_id, model), dst.cache, [0], [0])
    assert ei.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "DEVICE memory the peer registered" in str(ei.value)
    if HAVE_MOONCAKE:
        q = peer_proc(cleanup, "mooncake")
        m = next(_seeds)
        cleanup.dcache(q, "allocated", 4, [8, 128], blocks=True, key=("blocks", m))
        e = local(transport="mooncake")
        edst = e.registered(4, [8, 128], dtype=FP16, blocks=True)
        link_to(e, q)
        with pytest.raises(LLMException) as ei:
            e.cm.pull_blocks(BlocksCacheKey(q.cluster_id, m), edst.cache, [0], [0])
        assert ei.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
        assert "Mooncake" in str(ei.value)
    assert_mem_equal(dst.mem(), before, "the destination after refused pulls")


FAKE_CUDA = os.environ.get("LLMDIST_RUNTIME") == "cuda" and bool(
    os.environ.get("LLMDIST_CUDA_LIBRARY")
)


@pytest.mark.skipif(
    not FAKE_CUDA,
    reason="holds copies on the device with the fake CUDA "
    "runtime's copy delay (its cuda-kernel and cuda-dma params)",
)
@pytest.mark.parametrize("event", ["withdrawn", "peer-died"])
def test_peer_event_while_the_pull_copies(cleanup, local, event):
    """The pull's copy from the peer's memory (device IPC) is queued and held on the device
    (300 ms per copy) when the peer withdraws the source or dies. A withdrawal waits for the
    queued copy: by the time the peer's release returns, the pulled bytes are in place and the
    pull succeeds. A dead peer ends the pull with LLM_LINK_FAILED, without waiting out
    llm.SyncKvCacheWaitTime."""
    import ctypes

    fake = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
    fake.fake_cuda_calls.restype = ctypes.c_long

    def copies() -> int:
        return sum(fake.fake_cuda_calls(n) for n in (b"cudaLaunchKernel", b"cudaMemcpyBatchAsync"))

    p = peer_proc(cleanup, "direct")
    m = next(_seeds)
    src = cleanup.dcache(p, "allocated", 4, [8, 128], blocks=True, key=("blocks", m), seed=m)
    d = local(**{"llm.SyncKvCacheWaitTime": "30000"})
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    link_to(d, p)
    before = dst.snapshot()
    want = expect_blocks(
        before,
        dst.tensors,
        256,
        src.initial,
        src.tensors,
        256,
        range(2),
        range(2),
        2,
        pairs=[(0, 5), (3, 1)],
    )
    issued = copies()
    fake.fake_cuda_set_copy_delay_us(300_000)
    try:
        call = Call(d.cm.pull_blocks, BlocksCacheKey(p.cluster_id, m), dst.cache, [0, 3], [5, 1])
        deadline = time.monotonic() + 10
        while copies() == issued:
            assert time.monotonic() < deadline, "the pull's copy was never issued"
            time.sleep(0.002)
        t0 = time.monotonic()
        if event == "withdrawn":
            p.call("release", src.name)
            cleanup.caches.remove(src)
            assert_mem_equal(dst.mem(), want, "the pulled blocks when the release returned")
            assert call.join(10) == SUCCESS
        else:
            p.kill()
            assert call.join(10) == LINK_FAILED
            assert call.ended - t0 < 10
    finally:
        fake.fake_cuda_set_copy_delay_us(-1)


from .helpers import keyed_and_unkeyed  # noqa: E402

auth_mode = keyed_and_unkeyed()  # every test here runs without and with a shared key
