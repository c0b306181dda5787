"""vLLM engines for the vLLM benchmark (`llmdist bench vllm`) and the tests on real vLLM: a
tiny Llama checkpoint with seeded random weights (its greedy tokens depend on every KV block),
vLLM KV transfer configs (LLMDistConnector or NixlConnector), and an offline vLLM engine in a
child process driven over a Pipe.

vLLM and torch are imported inside the functions: importing this module needs neither."""

from __future__ import annotations

import ctypes
import json
import os
import time
import traceback
from typing import Any, Dict, Optional

BLOCK_SIZE = 32  # vLLM's CPU attention needs multiples of 32

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 32,
}


def write_checkpoint(path: str, seed: int = 1234, std: float = 0.3) -> str:
    """A Llama checkpoint of seeded random weights in path (config.json + safetensors)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    c = LLAMA
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    w = {
        "model.embed_tokens.weight": rnd(v, h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": rnd(v, h),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w.update(
            {
                p + "self_attn.q_proj.weight": rnd(q, h),
                p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h),
                p + "self_attn.o_proj.weight": rnd(h, q),
                p + "mlp.gate_proj.weight": rnd(i, h),
                p + "mlp.up_proj.weight": rnd(i, h),
                p + "mlp.down_proj.weight": rnd(h, i),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        )
    save_file({k: t.contiguous() for k, t in w.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)
    return path


def kv_transfer_config(role: str, extra=None, policy: str = "recompute", engine_id=None):
    from vllm.config import KVTransferConfig

    if extra and extra.get("connector") == "NixlConnector":
        # vLLM's reference connector (pip install nixl nixl-cu12 --no-deps; UCX over TCP)
        os.environ.setdefault("UCX_TLS", "tcp,sm,self")
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(extra["side_channel_port"])
        return KVTransferConfig(
            kv_connector="NixlConnector",
            kv_role="kv_both",
            kv_buffer_device="cpu",
            engine_id=engine_id,
            kv_load_failure_policy=policy,
        )
    return KVTransferConfig(
        kv_connector="LLMDistConnector",
        engine_id=engine_id,
        kv_connector_module_path="llmdist.integrations.vllm",
        kv_role=role,
        kv_connector_extra_config=dict(extra or {"mode": "pull"}),
        kv_load_failure_policy=policy,
    )


# ------------------------------------------------------------------------------------------
# An engine in a child process

_nixl_times: list = []


def _watch_nixl_transfers() -> None:
    """Keep NixlConnector's per-transfer durations (its telemetry) where the bench reads them."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats
    except ImportError:
        return
    orig = NixlKVConnectorStats.record_transfer

    def record(self, res):
        if res is not None:
            _nixl_times.append(res.xferDuration / 1e6)
        return orig(self, res)

    NixlKVConnectorStats.record_transfer = record


def _take_transfer_times() -> dict:
    """Seconds per transfer since the last call: "transfer", the data movement alone
    (LLMDistConnector's pull_blocks/push_blocks, NixlConnector's transfer telemetry), and
    "call", LLMDistConnector's transfer with the notification that tells the peer."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = getattr(get_kv_transfer_group(), "worker_side", None)
    if worker is not None:
        out = {"transfer": list(worker.transfer_times), "call": list(worker.call_times)}
        worker.transfer_times, worker.call_times = [], []
        return out
    out = {"transfer": list(_nixl_times), "call": []}
    _nixl_times.clear()
    return out


def engine_main(
    conn,
    model: str,
    role,
    extra,
    policy: str,
    num_blocks: int,
    engine_id=None,
    chunk_tokens: Optional[int] = None,
) -> None:
    """Child entry point: one vllm LLM (chunk_tokens: the most tokens one step computes, so
    that longer prompts are prefilled in chunks); obeys ("generate", prompts, max_tokens,
    params), ("free_blocks",), ("kv", block ids), ("exit",)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # one OpenMP thread, bound to no core: vLLM's CPU build otherwise binds every engine's
    # spinning OpenMP threads to the same cores, and the engines of one machine take turns
    # (decode TTFTs of 30 to 470 ms in one run instead of 25 to 70)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        kw: Dict[str, Any] = {}
        if chunk_tokens is not None:
            kw["max_num_batched_tokens"] = chunk_tokens
        if role is not None:
            kw["kv_transfer_config"] = kv_transfer_config(role, extra, policy, engine_id)
        llm = LLM(
            model=model,
            skip_tokenizer_init=True,
            dtype="float32",
            block_size=BLOCK_SIZE,
            max_model_len=512,
            max_num_seqs=8,
            enforce_eager=True,
            seed=0,
            num_gpu_blocks_override=num_blocks,
            enable_prefix_caching=True,
            **kw,
        )
    except BaseException:  # noqa: BLE001 - the parent gets every startup failure
        conn.send(("err", traceback.format_exc()))
        return
    _watch_nixl_transfers()
    last_end = [0.0]
    conn.send(("ready", os.getpid()))
    while True:
        try:
            cmd, *args = conn.recv()
        except (EOFError, OSError):
            break
        try:
            if cmd == "exit":
                conn.send(("ok", None))
                break
            if cmd == "generate":
                prompts, max_tokens, params = args
                sps = [
                    SamplingParams(
                        temperature=0.0,
                        max_tokens=max_tokens,
                        ignore_eos=True,
                        detokenize=False,
                        extra_args=None if p is None else {"kv_transfer_params": p},
                    )
                    for p in params
                ]
                outs = llm.generate(
                    [TokensPrompt(prompt_token_ids=list(t)) for t in prompts], sps, use_tqdm=False
                )
                last_end[0] = time.time()
                conn.send(
                    (
                        "ok",
                        [
                            (
                                list(o.outputs[0].token_ids),
                                o.kv_transfer_params,
                                o.outputs[0].finish_reason,
                            )
                            for o in outs
                        ],
                    )
                )
            elif cmd == "free_blocks":
                # step until no request holds blocks (a served engine steps on its own; the
                # offline LLM only inside generate), at most timeout_s
                (timeout_s,) = args
                core = llm.llm_engine.engine_core.engine_core
                deadline = time.monotonic() + timeout_s
                while core.scheduler.has_requests() and time.monotonic() < deadline:
                    llm.llm_engine.step()
                    time.sleep(0.01)
                conn.send(("ok", core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()))
            elif cmd == "last_generate_end":
                conn.send(("ok", last_end[0]))  # time.time() when the last one returned
            elif cmd == "transfer_times":
                # seconds per transfer since the last call (see _take_transfer_times)
                conn.send(("ok", _take_transfer_times()))
            elif cmd == "layerwise_started":
                # (transfers that went out layer by layer, those of them started while the
                # forward still ran)
                from vllm.distributed.kv_transfer import get_kv_transfer_group

                w = get_kv_transfer_group().worker_side
                conn.send(("ok", (w.streams.started, w.streams.overlapped)))
            elif cmd == "reset_prefix_cache":
                conn.send(("ok", llm.reset_prefix_cache()))
            elif cmd == "zero_kv":
                # overwrite every registered KV byte of the given blocks (shows that decode
                # tokens depend on the KV the connector moved)
                (blocks,) = args
                from vllm.distributed.kv_transfer import get_kv_transfer_group

                layout = get_kv_transfer_group().worker_side.layout
                for a in layout.addrs:
                    for b in blocks:
                        ctypes.memset(a + b * layout.block_bytes, 0, layout.block_bytes)
                conn.send(("ok", None))
            else:
                conn.send(("err", f"unknown command {cmd}"))
        except BaseException:  # noqa: BLE001 - the parent gets every command's failure
            conn.send(("err", traceback.format_exc()))


class Engine:
    """A vLLM engine in a child process (see engine_main)."""

    def __init__(
        self,
        model: str,
        role,
        extra=None,
        policy: str = "recompute",
        num_blocks: int = 64,
        engine_id=None,
        chunk_tokens: Optional[int] = None,
        trace: Optional[str] = None,
    ) -> None:
        """trace: a file for the host copy engine's trace of this engine (LLMDIST_HOST_TRACE,
        written when the engine exits)."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=engine_main,
            args=(child, model, role, extra, policy, num_blocks, engine_id, chunk_tokens),
        )
        before = os.environ.get("LLMDIST_HOST_TRACE")
        if trace is not None:
            os.environ["LLMDIST_HOST_TRACE"] = trace  # the child reads it when llmdist loads
        try:
            self.proc.start()
        finally:
            if before is None:
                os.environ.pop("LLMDIST_HOST_TRACE", None)
            else:
                os.environ["LLMDIST_HOST_TRACE"] = before
        self.num_blocks = num_blocks

    def wait_ready(self, timeout: float = 240.0) -> "Engine":
        msg = self._recv(timeout)
        if msg[0] != "ready":
            raise RuntimeError(f"the engine did not start:\n{msg[1]}")
        return self

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError(
                f"the engine (pid {self.proc.pid}) did not answer within {timeout} s"
            )
        return self.conn.recv()

    def call(self, *cmd, timeout: float = 120.0):
        self.conn.send(cmd)
        msg = self._recv(timeout)
        if msg[0] != "ok":
            raise RuntimeError(f"{cmd[0]} failed in the engine:\n{msg[1]}")
        return msg[1]

    def generate(self, prompts, max_tokens: int, params=None, timeout: float = 120.0):
        params = list(params) if params is not None else [None] * len(prompts)
        return self.call(
            "generate", [list(p) for p in prompts], max_tokens, params, timeout=timeout
        )

    def generate_while(
        self, other: "Engine", prompts, max_tokens: int, params, timeout: float = 120.0
    ):
        """generate here while other keeps stepping (as a served engine does on its own), until
        it holds no request or this one answered."""
        self.conn.send(("generate", [list(p) for p in prompts], max_tokens, list(params)))
        other.call("free_blocks", timeout / 2, timeout=timeout)
        msg = self._recv(timeout)
        if msg[0] != "ok":
            raise RuntimeError(f"generate failed in the engine:\n{msg[1]}")
        return msg[1]

    def generate_with(
        self,
        prefill: "Engine",
        prompts,
        max_tokens: int,
        params,
        p_params,
        timeout: float = 120.0,
        settle_s: float = 1.0,
    ):
        """The layerwise proxy: the request goes here and to prefill at once; prefill then
        keeps stepping until it holds no request."""
        self.conn.send(("generate", [list(p) for p in prompts], max_tokens, list(params)))
        time.sleep(settle_s)  # let the decode register first, as a proxy waiting for it would
        prefill.generate(prompts, 1, p_params, timeout=timeout)
        prefill.call("free_blocks", timeout / 2, timeout=timeout)
        msg = self._recv(timeout)
        if msg[0] != "ok":
            raise RuntimeError(f"generate failed in the engine:\n{msg[1]}")
        return msg[1]

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("exit", timeout=30)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.kill()
