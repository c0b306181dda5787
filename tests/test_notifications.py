"""Notifications between two processes: send_notification, get/wait_notifications, and notify=
on pull_blocks, pull_cache, push_blocks, push_cache and transfer_cache_async, on every route.
A notification arrives only after the transfer's bytes are complete, never after a failed
transfer, in the order it was sent; the receiver's queue and the payload are bounded."""

from __future__ import annotations

import pytest

from llmdist import (
    BlocksCacheKey,
    CacheKeyByIdAndIndex,
    LLMException,
    LLMRole,
    LLMStatusCode,
    TransferWithCacheKeyConfig,
)
from llmdist.notifications import MAX_PAYLOAD

from .helpers import FailSync, RecordingSync, assert_mem_equal
from .pull_push_routes import (
    FP16,
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
WAIT_MS = 5000


def notes(proc, timeout_ms: int = 0) -> dict:
    return proc.call("notifications", timeout_ms)


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_pull_notifies_the_source(cleanup, local, route):
    mem, transport = route
    p = peer_proc(cleanup, transport)
    model = next(_seeds)
    src = cleanup.dcache(p, mem, 4, [8, 128], blocks=True, key=("blocks", model), seed=model)
    rows = cleanup.dcache(p, mem, 4, [3, 2, 100], seed=model + 1)
    d = local(transport=transport)
    link_to(d, p)
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    before = dst.snapshot()
    d.cm.pull_blocks(
        BlocksCacheKey(p.cluster_id, model), dst.cache, [1, 6], [0, 7], notify=b"pulled blocks"
    )
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
        pairs=[(1, 0), (6, 7)],
    )
    assert_mem_equal(dst.mem(), want, "pulled blocks")
    assert notes(p, WAIT_MS) == {d.cluster_id: [b"pulled blocks"]}
    row = d.allocated(4, [2, 200], dtype=FP16)
    d.cm.pull_cache(
        CacheKeyByIdAndIndex(p.cluster_id, rows.cache_id, 2), row.cache, 1, notify=bytes(range(256))
    )
    assert notes(p, WAIT_MS) == {d.cluster_id: [bytes(range(256))]}


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_push_notifies_after_the_bytes_arrived(cleanup, local, route):
    """The destination reads its memory the moment the notification arrives: the pushed bytes
    are there."""
    mem, transport = route
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": transport}).wait_ready()
    model = next(_seeds)
    dst = cleanup.dcache(dproc, mem, 4, [16, 128], blocks=True, key=("blocks", model), seed=model)
    rows = cleanup.dcache(dproc, mem, 4, [5, 200], seed=model + 1)
    p = local(remote=True, transport=transport, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True)
    pairs = [(2, 3), (3, 4), (9, 0)]
    dproc.send("notified_read", dst.name, WAIT_MS)
    p.cm.push_blocks(
        BlocksCacheKey(dproc.cluster_id, model),
        src.cache,
        [s for s, _ in pairs],
        [b for _, b in pairs],
        notify=b"pushed",
    )
    got, at_notice = dproc.result()
    assert got == {p.cluster_id: [b"pushed"]}
    want = expect_blocks(
        dst.initial,
        dst.tensors,
        256,
        src.mem(),
        src.tensors,
        256,
        range(2),
        range(2),
        2,
        pairs=pairs,
    )
    assert_mem_equal(at_notice, want, "destination memory when the notification arrived")
    srow = p.registered(4, [3, 2, 100], dtype=FP16)
    dproc.send("notified_read", rows.name, WAIT_MS)
    p.cm.push_cache(
        CacheKeyByIdAndIndex(dproc.cluster_id, rows.cache_id, 4), srow.cache, 2, notify=b"row"
    )
    got, at_notice = dproc.result()
    assert got == {p.cluster_id: [b"row"]}
    want = expect_blocks(
        rows.initial,
        rows.tensors,
        400,
        srow.mem(),
        srow.tensors,
        400,
        range(2),
        range(2),
        2,
        row=2,
        dst_row=4,
    )
    assert_mem_equal(at_notice, want, "pushed row when the notification arrived")


@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_transfer_cache_async_notifies_each_destination(cleanup, local, route):
    mem, transport = route
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": transport}).wait_ready()
    model = next(_seeds)
    dst = cleanup.dcache(dproc, mem, 4, [16, 128], blocks=True, key=("blocks", model), seed=model)
    p = local(remote=True, transport=transport, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True)
    dproc.send("notified_read", dst.name, WAIT_MS)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(dproc.cluster_id, model), range(2), range(2))
    task = p.cm.transfer_cache_async(
        src.cache, RecordingSync(), [cfg, cfg], [1, 5], [2, 8], notify=b"layers sent"
    )
    assert task.synchronize(WAIT_MS) == SUCCESS
    assert task.notification_error is None
    got, at_notice = dproc.result()
    # one notification per destination cluster, however many configs write to it
    assert got == {p.cluster_id: [b"layers sent"]}
    want = expect_blocks(
        dst.initial,
        dst.tensors,
        256,
        src.mem(),
        src.tensors,
        256,
        range(2),
        range(2),
        2,
        pairs=[(1, 2), (5, 8)],
    )
    assert_mem_equal(at_notice, want, "destination memory when the notification arrived")
    assert notes(dproc, 200) == {}


def test_order_per_peer(cleanup, local):
    """send_notification and notify= of every call arrive in the order they were sent."""
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": "direct"}).wait_ready()
    model = next(_seeds)
    cleanup.dcache(dproc, PEER_MEM, 4, [16, 128], blocks=True, key=("blocks", model), seed=1)
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True)
    dst = p.registered(4, [16, 128], dtype=FP16, blocks=True)
    key = BlocksCacheKey(dproc.cluster_id, model)
    sent = []
    for i in range(5):
        sent += [f"a{i}".encode(), f"b{i}".encode(), f"c{i}".encode(), f"d{i}".encode()]
        p.dd.send_notification(dproc.cluster_id, sent[-4])
        p.cm.push_blocks(key, src.cache, [i], [i], notify=sent[-3])
        p.cm.pull_blocks(key, dst.cache, [i], [i + 1], notify=sent[-2])
        cfg = TransferWithCacheKeyConfig(key, range(2), range(2))
        task = p.cm.transfer_cache_async(
            src.cache, RecordingSync(), [cfg], [i], [i + 8], notify=sent[-1]
        )
        assert task.synchronize(WAIT_MS) == SUCCESS
    assert notes(dproc, WAIT_MS) == {p.cluster_id: sent}
    # and the other way, to a listener that linked nothing itself
    dproc.call("notify", p.cluster_id, b"one")
    dproc.call("notify", p.cluster_id, b"two")
    assert p.dd.wait_notifications(WAIT_MS) == {dproc.cluster_id: [b"one", b"two"]}
    assert p.dd.get_notifications() == {}


@pytest.mark.skipif(
    PEER_MEM != "registered",
    reason="the failing read needs the process route "
    "(memory the peer registered), which device runtimes do not use",
)
def test_no_notification_after_a_failed_transfer(cleanup, local):
    p = peer_proc(cleanup, "direct")
    model = next(_seeds)
    # a cache whose addresses are not mapped in the peer: process reads of it fail
    p.call("register_unmapped", "bad", 4, [8, 128], True, ("blocks", model))
    good = cleanup.dcache(p, "registered", 4, [8, 128], blocks=True, key=("blocks", model + 1))
    d = local()
    link_to(d, p)
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    with pytest.raises(LLMException) as ei:
        d.cm.pull_blocks(
            BlocksCacheKey(p.cluster_id, model), dst.cache, [1], [1], notify=b"must not arrive"
        )
    assert ei.value.status_code == LLMStatusCode.LLM_FAILED
    # a refused call sends nothing either
    with pytest.raises(LLMException) as ei:
        d.cm.pull_blocks(
            BlocksCacheKey(p.cluster_id, model + 1), dst.cache, [1], [99], notify=b"must not arrive"
        )
    assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert notes(p, 300) == {}
    # the next transfer is not held up, and notifies
    d.cm.pull_blocks(BlocksCacheKey(p.cluster_id, model + 1), dst.cache, [2], [3], notify=b"after")
    assert notes(p, WAIT_MS) == {d.cluster_id: [b"after"]}
    assert good.cache_id


def test_no_notification_when_the_synchronizer_fails(cleanup, local):
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": "direct"}).wait_ready()
    model = next(_seeds)
    cleanup.dcache(dproc, PEER_MEM, 4, [16, 128], blocks=True, key=("blocks", model))
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(dproc.cluster_id, model), range(2), range(2))
    task = p.cm.transfer_cache_async(src.cache, FailSync(1), [cfg], [0], [0], notify=b"no")
    assert task.synchronize(WAIT_MS) == LLMStatusCode.LLM_PARAM_INVALID
    assert task.notification_error is None
    assert notes(dproc, 300) == {}


def test_queue_bound(cleanup, local):
    dproc = cleanup.spawn(
        next(_ids), options={"llmdist.transport": "direct", "llmdist.notify_queue_depth": "3"}
    ).wait_ready()
    model = next(_seeds)
    cleanup.dcache(dproc, PEER_MEM, 4, [16, 128], blocks=True, key=("blocks", model))
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    for i in range(3):
        p.dd.send_notification(dproc.cluster_id, b"%d" % i)
    with pytest.raises(LLMException) as ei:
        p.dd.send_notification(dproc.cluster_id, b"3")
    assert ei.value.status_code == LLMStatusCode.LLM_LINK_BUSY
    assert "llmdist.notify_queue_depth" in str(ei.value)
    # a transfer whose notification finds the queue full: the bytes moved, the call says the
    # notification did not arrive
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True)
    with pytest.raises(LLMException) as ei:
        p.cm.push_blocks(
            BlocksCacheKey(dproc.cluster_id, model), src.cache, [0], [0], notify=b"full"
        )
    assert ei.value.status_code == LLMStatusCode.LLM_LINK_BUSY
    assert "succeeded, but its notification" in str(ei.value)
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(dproc.cluster_id, model), range(2), range(2))
    task = p.cm.transfer_cache_async(src.cache, RecordingSync(), [cfg], [0], [0], notify=b"x")
    assert task.synchronize(WAIT_MS) == LLMStatusCode.LLM_LINK_BUSY
    assert task.get_results() == [SUCCESS]
    assert "llmdist.notify_queue_depth" in task.notification_error
    assert notes(dproc) == {p.cluster_id: [b"0", b"1", b"2"]}
    p.dd.send_notification(dproc.cluster_id, b"room again")
    assert notes(dproc) == {p.cluster_id: [b"room again"]}


def test_payload_and_argument_errors(cleanup, local):
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": "direct"}).wait_ready()
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    for bad, words in (
        (b"x" * (MAX_PAYLOAD + 1), f"at most {MAX_PAYLOAD} bytes"),
        ("text", "must be bytes"),
    ):
        with pytest.raises(LLMException) as ei:
            p.dd.send_notification(dproc.cluster_id, bad)
        assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert words in str(ei.value) and "payload" in str(ei.value)
    p.dd.send_notification(dproc.cluster_id, b"x" * MAX_PAYLOAD)
    src = p.registered(4, [12, 128], dtype=FP16, blocks=True)
    with pytest.raises(LLMException) as ei:
        p.cm.push_blocks(
            BlocksCacheKey(dproc.cluster_id, 1),
            src.cache,
            [0],
            [0],
            notify=b"y" * (MAX_PAYLOAD + 1),
        )
    assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID and "notify" in str(ei.value)
    with pytest.raises(LLMException) as ei:
        p.dd.send_notification(next(_ids), b"nobody")
    assert ei.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    with pytest.raises(LLMException) as ei:
        p.dd.wait_notifications(-1)
    assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert notes(dproc, WAIT_MS) == {p.cluster_id: [b"x" * MAX_PAYLOAD]}


def test_link_down_fails_the_sender(cleanup, local):
    dproc = cleanup.spawn(next(_ids), options={"llmdist.transport": "direct"}).wait_ready()
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    dproc.kill()
    with pytest.raises(LLMException) as ei:
        for _ in range(100):  # until this side notices the link is gone
            p.dd.send_notification(dproc.cluster_id, b"gone")
    assert ei.value.status_code in (LLMStatusCode.LLM_NOT_YET_LINK, LLMStatusCode.LLM_LINK_FAILED)
