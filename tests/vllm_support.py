"""Helpers of the tests on real vLLM (tests/test_vllm_*.py): worker-side connectors without an
engine, vLLM's real Scheduler with LLMDistConnector, and (from llmdist.bench.vllm_engine) the
random Llama checkpoint and engines in child processes.

Everything here imports vLLM and torch lazily: the tests skip when vLLM is not importable."""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

from llmdist.bench.vllm_engine import (  # noqa: E402,F401
    BLOCK_SIZE,
    LLAMA,
    Engine,
    kv_transfer_config,
    write_checkpoint,
)

# ------------------------------------------------------------------------------------------
# A child process driven over a pipe


class ChildWorker:
    """A spawned process running target(conn, *args): it answers ("ready", ...) once, then
    ("ok", result) per command; ("exit",) ends it."""

    def __init__(self, target, *args, what: str = "the worker") -> None:
        ctx = mp.get_context("spawn")
        self.what = what
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child,) + args)
        self.proc.start()
        assert self.conn.poll(120), f"{what} did not start"
        msg = self.conn.recv()
        assert msg[0] == "ready", msg[1]
        self.ready = msg[1:]

    def send(self, *cmd):
        self.conn.send(cmd)

    def result(self, timeout: float = 60.0):
        assert self.conn.poll(timeout), f"{self.what} did not answer"
        msg = self.conn.recv()
        assert msg[0] == "ok", msg[1]
        return msg[1]

    def call(self, *cmd):
        self.send(*cmd)
        return self.result()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("exit",))
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ------------------------------------------------------------------------------------------
# A worker-side connector without an engine

NUM_BLOCKS = 12
LAYERS = 3


def kv_tensors(layout: str, seed):
    """Per-layer CPU tensors: "cpu" is vLLM's CPU attention layout [num_blocks, kv_heads,
    block_size, 2*head_size]; "gpu" the GPU backends' [2, num_blocks, block_size, kv_heads,
    head_size]. Random bytes (seed) or zeros (seed None)."""
    import torch

    shape = (
        (NUM_BLOCKS, 2, BLOCK_SIZE, 2 * 32)
        if layout == "cpu"
        else (2, NUM_BLOCKS, BLOCK_SIZE, 2, 32)
    )
    g = torch.Generator().manual_seed(seed or 0)
    return {
        f"model.layers.{n}.self_attn.attn": (
            torch.randn(*shape, generator=g, dtype=torch.float32)
            if seed is not None
            else torch.zeros(*shape, dtype=torch.float32)
        ).to(torch.bfloat16)
        for n in range(LAYERS)
    }


def block_bytes(kv, layout: str, blocks):
    """The bytes of each block of every layer (K and V apart in the GPU layout)."""
    out = []
    for t in kv.values():
        for b in blocks:
            parts = [t[b]] if layout == "cpu" else [t[0, b], t[1, b]]
            out.append(
                b"".join(
                    x.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
                    for x in parts
                )
            )
    return out


def worker_connector(role: str, extra=None):
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from llmdist.integrations.vllm import LLMDistConnector

    cfg = VllmConfig(kv_transfer_config=kv_transfer_config(role, extra))
    return LLMDistConnector(cfg, KVConnectorRole.WORKER, None), cfg.kv_transfer_config.engine_id


def run_step(conn_, meta, timeout_s: float, until):
    """One step's start_load_kv with meta, then results until until(sent, recved, failed)."""
    conn_.bind_connector_metadata(meta)
    conn_.start_load_kv(None)
    conn_.clear_connector_metadata()
    sent, recved, failed = set(), set(), set()
    deadline = time.monotonic() + timeout_s
    while True:
        r = conn_.get_transfer_results(set())
        sent |= r.finished_sending
        recved |= r.finished_recving
        failed |= r.failed_recving
        if until(sent, recved, failed) or time.monotonic() > deadline:
            return sent, recved, failed
        time.sleep(0.01)


def prefill_worker_main(conn, layout: str, seed: int, extra=None) -> None:
    """Child: a prefill worker connector over random KV tensors. ("lease", req id, seconds)
    hands it a finished request and waits until it reports it sent, returning the seconds it
    took; ("blocks", ids) returns the bytes of blocks."""
    try:
        from llmdist.integrations.vllm import LLMDistConnectorMetadata

        c, engine_id = worker_connector("kv_producer", extra)
        kv = kv_tensors(layout, seed)
        c.register_kv_caches(kv)
        conn.send(("ready", engine_id, c.get_handshake_metadata().port))
        while True:
            cmd, *args = conn.recv()
            if cmd == "exit":
                break
            if cmd == "blocks":
                conn.send(("ok", block_bytes(kv, layout, args[0])))
            elif cmd == "lease":
                rid, lease_s, wait_s = args
                t0 = time.monotonic()
                meta = LLMDistConnectorMetadata(reqs_to_send={rid: time.time() + lease_s})
                sent, _, _ = run_step(c, meta, wait_s, lambda s, r, f: rid in s)
                conn.send(("ok", (rid in sent, time.monotonic() - t0)))
        c.shutdown()
    except BaseException:
        conn.send(("err", traceback.format_exc()))


# ------------------------------------------------------------------------------------------
# vLLM's real Scheduler with LLMDistConnector (no workers: their output is made by the test)


def make_scheduler(
    model: str,
    role: str,
    num_blocks: int = 40,
    extra=None,
    policy: str = "recompute",
    max_num_batched_tokens: int = 1024,
):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    mc = ModelConfig(model=model, skip_tokenizer_init=True, max_model_len=512, dtype="float32")
    cfg = VllmConfig(
        model_config=mc,
        cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=512,
            is_encoder_decoder=False,
            enable_chunked_prefill=True,
        ),
        kv_transfer_config=kv_transfer_config(role, extra, policy),
    )
    cfg.cache_config.num_gpu_blocks = num_blocks
    kvc = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["model.layers.0.self_attn.attn"],
                FullAttentionSpec(
                    block_size=BLOCK_SIZE, num_kv_heads=2, head_size=32, dtype=torch.float32
                ),
            )
        ],
    )
    return Scheduler(cfg, kvc, StructuredOutputManager(cfg), block_size=BLOCK_SIZE, log_stats=False)


_req_ids = iter(range(10**6))


def make_request(tokens, max_tokens: int, params=None):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    sp = SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=True,
        extra_args=None if params is None else {"kv_transfer_params": params},
    )
    return Request(
        f"req-{next(_req_ids)}",
        list(tokens),
        sp,
        None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )


def model_output(sched_out, sending=(), recving=(), failed=(), invalid=(), partial=()):
    """What the workers return for a scheduled step: token 7 for every request that ran,
    none for those in partial (a chunk of their prompt is not its end)."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    ids = list(sched_out.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[] if r in partial else [7] for r in ids],
        kv_connector_output=KVConnectorOutput(
            finished_sending=set(sending),
            finished_recving=set(recving),
            failed_recving=set(failed),
            invalid_block_ids=set(invalid),
        ),
    )


def step(sched, **worker):
    """One scheduler step; returns (scheduler output, engine outputs)."""
    out = sched.schedule()
    return out, sched.update_from_output(out, model_output(out, **worker))
