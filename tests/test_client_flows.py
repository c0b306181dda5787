"""Real clients' call sequences and upstream's sample programs (spec sections 7 and 10), each role
in its own process on 127.0.0.1, with numpy arrays in place of NPU tensors and every byte
checked: transfer_cache_async_sample, hixl_transfer_backend_sample (both listen, both link, pull
and push, both unlink), pull_blocks_sample (rank-table link, pull, swap out and in),
pull_cache_sample (a CacheKey per row), pull_blocks_xpyd_sample (one decode, two prefills),
push_blocks_sample, push_cache_sample (rows by CacheKeyByIdAndIndex), vllm-ascend's HIXL
connector (MLA caches of one tensor per layer, five layers, by model id, pulled by layer range),
an SGLang-style push (link with only the remote ip), omni-infer's recovery (the pull fails after
the prefill dies; force-unlink, link to its restart, the retried pull succeeds), and links made
and ended from both sides at once."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
from typing import Dict, Tuple

import numpy as np
import pytest

from llmdist import BlocksCacheKey, DataType, LLMException, LLMRole, LLMStatusCode

from . import flow_procs
from .decode_procs import Cleanup, cluster_info
from .helpers import Env, free_port

CTX = mp.get_context("spawn")
HOST = "127.0.0.1"
SUCCESS = LLMStatusCode.LLM_SUCCESS
FLOW_S = 120.0
_ids = itertools.count(700)


class Flow:
    """Roles of one flow, each in a child process, sharing one barrier (plus `extra` parties in
    this process)."""

    def __init__(self, roles: Dict[str, Tuple[str, dict]], extra: int = 0) -> None:
        self.barrier = CTX.Barrier(len(roles) + extra)
        self.queue = CTX.Queue()
        self.procs = {
            name: CTX.Process(
                target=flow_procs.run_role,
                args=(name, func, kwargs, self.barrier, self.queue),
                name=f"flow-{name}",
                daemon=True,
            )
            for name, (func, kwargs) in roles.items()
        }
        self.outcomes: Dict[str, tuple] = {}
        for p in self.procs.values():
            p.start()

    def wait_msg(self, name: str, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{name} did not say {what!r} within {timeout} s"
            try:
                msg = self.queue.get(timeout=left)
            except queue_mod.Empty:
                continue
            if msg[1] == "msg" and msg[0] == name and msg[2] == what:
                return
            if msg[1] in ("done", "error"):
                self.outcomes[msg[0]] = msg[1:]
                assert msg[1] != "error", f"{msg[0]} failed:\n{msg[2]}"

    def finish(self, timeout: float = FLOW_S) -> Dict[str, tuple]:
        """Wait for every role's outcome; fail on an error or a failed check."""
        deadline = time.monotonic() + timeout
        try:
            while len(self.outcomes) < len(self.procs):
                left = deadline - time.monotonic()
                assert left > 0, f"roles {set(self.procs) - set(self.outcomes)} did not finish"
                try:
                    msg = self.queue.get(timeout=min(left, 1.0))
                except queue_mod.Empty:
                    dead = [
                        n
                        for n, p in self.procs.items()
                        if not p.is_alive() and n not in self.outcomes
                    ]
                    if dead:
                        time.sleep(0.5)
                        try:
                            msg = self.queue.get(timeout=0.5)
                        except queue_mod.Empty:
                            raise AssertionError(f"roles {dead} died without an outcome")
                    else:
                        continue
                if msg[1] in ("done", "error"):
                    self.outcomes[msg[0]] = msg[1:]
        finally:
            self.close()
        for name, out in self.outcomes.items():
            assert out[0] == "done", f"{name} failed:\n{out[1]}\nchecks: {out[2]}"
            assert out[2] == [], f"{name}: failed checks {out[2]}"
        return self.outcomes

    def close(self) -> None:
        for p in self.procs.values():
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


# --------------------------------------------------------------------------------------------
# upstream samples
# --------------------------------------------------------------------------------------------
def test_transfer_cache_async_sample():
    """A blocks source without block indices: block 0 of layer 0 arrives; both sides
    unlink with force, both succeed."""
    port = free_port()
    Flow(
        {"prompt": ("tca_prompt", {"port": port}), "decoder": ("tca_decoder", {"port": port})}
    ).finish()


def test_hixl_transfer_backend_sample():
    """Both listen and link to each other at once; the prompt pulls, the decoder pushes; both
    unlink without force."""
    pport, dport = free_port(), free_port()
    Flow(
        {
            "prompt": ("hixl_prompt", {"pport": pport, "dport": dport}),
            "decoder": ("hixl_decoder", {"pport": pport, "dport": dport}),
        }
    ).finish()


def test_pull_blocks_xpyd_sample():
    """One decoder pulls from two prompts; cluster ids are ip:port packed into 48 bits."""
    p1, p2, d = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
    Flow(
        {
            "prompt1": ("xpyd_prompt", {"local_ip_port": p1}),
            "prompt2": ("xpyd_prompt", {"local_ip_port": p2}),
            "decoder": ("xpyd_decoder", {"local_ip_port": d, "remote_ip_port": f"{p1};{p2}"}),
        }
    ).finish()


def test_pull_blocks_sample():
    """Rank-table link (query_register_mem_status until OK), pull_blocks, swap_blocks out to a
    CPU cache and back, unlink."""
    from .rendezvous import free_rendezvous_base, rendezvous_options

    opts = rendezvous_options(free_rendezvous_base(), link_total_s=60)
    Flow(
        {
            "prompt": ("pb_prompt", {"rendezvous": opts}),
            "decoder": ("pb_decoder", {"rendezvous": opts}),
        }
    ).finish()


def test_pull_cache_sample():
    """Rank-table link, the prompt allocates a cache under one CacheKey per row, the decoder
    pulls each key's row into a row of its own cache (here crossed, to show which row went
    where)."""
    from .rendezvous import free_rendezvous_base, rendezvous_options

    opts = rendezvous_options(free_rendezvous_base(), link_total_s=60)
    Flow(
        {
            "prompt": ("pc_prompt", {"rendezvous": opts}),
            "decoder": ("pc_decoder", {"rendezvous": opts}),
        }
    ).finish()


def test_pull_from_cache_to_blocks_sample():
    """Rank-table link, then the prompt allocates a cache under a CacheKey; the decoder pulls
    the key's row into block 0 of its blocks cache (and a second pull by the key, released by
    the first, is LLM_KV_CACHE_NOT_EXIST); the prompt's remove_cache_key afterwards is a no-op,
    then it deallocates."""
    from .rendezvous import free_rendezvous_base, rendezvous_options

    opts = rendezvous_options(free_rendezvous_base(), link_total_s=60)
    Flow(
        {
            "prompt": ("pfc_prompt", {"rendezvous": opts}),
            "decoder": ("pfc_decoder", {"rendezvous": opts}),
        }
    ).finish()


def test_switch_role_sample():
    """No llm.EnableSwitchRole: the decoder pulls from the prompt and unlinks; the prompt
    switches to DECODER (listener stopped), the decoder to PROMPT (listening); the former prompt
    links to the former decoder, which pushes its blocks back."""
    pport, dport = free_port(), free_port()
    Flow(
        {
            "prompt": ("sw_prompt", {"pport": pport, "dport": dport}),
            "decoder": ("sw_decoder", {"pport": pport, "dport": dport}),
        }
    ).finish()


def test_push_blocks_sample():
    pport = free_port()
    Flow(
        {"prompt": ("push_prompt", {"pport": pport}), "decoder": ("push_decoder", {"pport": pport})}
    ).finish()


def test_push_cache_sample(tmp_path):
    """push_blocks_sample with rows: the decoder pushes two of its rows into rows of the
    prompt's cache (CacheKeyByIdAndIndex), the second with layer ranges."""
    pport = free_port()
    id_file = str(tmp_path / "prompt_cache_id")
    Flow(
        {
            "prompt": ("push_cache_prompt", {"pport": pport, "id_file": id_file}),
            "decoder": ("push_cache_decoder", {"pport": pport, "id_file": id_file}),
        }
    ).finish()


# --------------------------------------------------------------------------------------------
# real clients
# --------------------------------------------------------------------------------------------
def test_hixl_connector_flow():
    pid_, did = 2**63 + next(_ids), 2**64 - next(_ids)  # ids use all 64 bits
    pport, dport = free_port(), free_port()
    Flow(
        {
            "prefill": ("hixl_connector_prefill", {"cluster_id": pid_, "port": pport}),
            "decode": (
                "hixl_connector_decode",
                {"cluster_id": did, "port": dport, "prefill_id": pid_, "prefill_port": pport},
            ),
        }
    ).finish()


def test_sglang_push_flow():
    pid_, did = next(_ids), next(_ids)
    pport = free_port()
    Flow(
        {
            "prefill": ("sglang_prefill", {"cluster_id": pid_, "port": pport, "decode_id": did}),
            "decode": (
                "sglang_decode",
                {"cluster_id": did, "prefill_id": pid_, "prefill_port": pport},
            ),
        }
    ).finish()


def test_hixl_connector_hybrid_layout():
    """vllm-ascend's HIXL connector on a hybrid model: conv and ssm caches registered over two
    as_strided views of one buffer per layer (overlapping registrations); the decode pulls
    blocks of both, the prefill pushes into both, every byte of the raw buffers checked; after
    the decode withdraws its conv cache, pushes and pulls through the ssm cache still work and
    a push to the conv key is LLM_KV_CACHE_NOT_EXIST."""
    pid_, did = next(_ids), next(_ids)
    pport = free_port()
    Flow(
        {
            "prefill": ("hybrid_prefill", {"cluster_id": pid_, "port": pport, "decode_id": did}),
            "decode": (
                "hybrid_decode",
                {"cluster_id": did, "prefill_id": pid_, "prefill_port": pport},
            ),
        }
    ).finish()


def test_omni_npu_layer_group():
    """omni-npu's DatadistEngine: a further cache registered over the already registered
    tensors of a layer subset (on both sides) is pulled by its own key; only those layers'
    blocks change; once the group is withdrawn its key is LLM_KV_CACHE_NOT_EXIST and the whole
    cache still pulls."""
    pid_, did = next(_ids), next(_ids)
    pport = free_port()
    Flow(
        {
            "prefill": ("layer_group_prefill", {"cluster_id": pid_, "port": pport}),
            "decode": (
                "layer_group_decode",
                {"cluster_id": did, "prefill_id": pid_, "prefill_port": pport},
            ),
        }
    ).finish()


def test_omni_infer_recovery():
    """The decode (this process) pulls; the prefill is killed; the pull fails with a link
    error; unlink_clusters(force=True) + link_clusters to the restarted prefill (same id and
    port); the retried pull brings the new bytes."""
    pid_, port = 2**63 + 5, free_port()
    gen1 = Flow(
        {"p": ("omni_prefill", {"cluster_id": pid_, "port": port, "generation": 1})}, extra=1
    )
    gen1.wait_msg("p", "ready")
    decode = Env(role=LLMRole.DECODER, cluster_id=2**64 - 2)
    try:
        dst = decode.registered(4, [8, 128], dtype=DataType.DT_FLOAT16, blocks=True)
        info = cluster_info(pid_, port)
        assert decode.dd.link_clusters([info], 5000) == (SUCCESS, [SUCCESS])
        key = BlocksCacheKey(pid_, 0)

        def pulled(generation: int) -> bool:
            decode.cm.pull_blocks(key, dst.cache, [0, 5], [2, 3])
            return all(
                np.all(
                    dst.tensor(t).view(np.uint16).reshape(8, 128)[[2, 3]] == generation * 100 + t
                )
                for t in range(4)
            )

        assert pulled(1)
        os.kill(gen1.procs["p"].pid, signal.SIGKILL)
        gen1.procs["p"].join(10)
        with pytest.raises(LLMException) as ei:
            decode.cm.pull_blocks(key, dst.cache, [0, 5], [2, 3])
        assert ei.value.status_code in (
            LLMStatusCode.LLM_LINK_FAILED,
            LLMStatusCode.LLM_NOT_YET_LINK,
        )
        gen2 = Flow(
            {"p": ("omni_prefill", {"cluster_id": pid_, "port": port, "generation": 2})}, extra=1
        )
        try:
            gen2.wait_msg("p", "ready")
            assert decode.dd.unlink_clusters([info], 5000, force=True) == (SUCCESS, [SUCCESS])
            assert decode.dd.link_clusters([info], 5000) == (SUCCESS, [SUCCESS])
            assert pulled(2)
            gen2.barrier.wait(30)
            gen2.finish()
        finally:
            gen2.close()
    finally:
        decode.close()
        for f in [
            f for f in os.listdir("/dev/shm") if f.startswith(f"llmdist-{gen1.procs['p'].pid}-")
        ]:
            os.unlink(os.path.join("/dev/shm", f))


# --------------------------------------------------------------------------------------------
# links from both sides
# --------------------------------------------------------------------------------------------
def test_mutual_links_and_unlinks():
    """Two listening clusters link to each other at the same moment (several rounds): both
    calls succeed, a second call on either side is LLM_ALREADY_LINK, both unlink at once and
    both succeed, and again after that; a never-linked cluster is LLM_NOT_YET_LINK."""
    c = Cleanup()
    try:
        a = c.spawn(next(_ids), role=LLMRole.PROMPT)
        b = c.spawn(next(_ids), role=LLMRole.DECODER)
        a.wait_ready()
        b.wait_ready()
        for _ in range(4):
            a.send("link", b.cluster_id, b.port)
            b.send("link", a.cluster_id, a.port)
            assert a.result() == (SUCCESS, [SUCCESS])
            assert b.result() == (SUCCESS, [SUCCESS])
            assert a.call("linked", b.cluster_id) and b.call("linked", a.cluster_id)
            assert a.call("link", b.cluster_id, b.port)[0] == LLMStatusCode.LLM_ALREADY_LINK
            assert b.call("link", a.cluster_id, a.port)[0] == LLMStatusCode.LLM_ALREADY_LINK
            a.send("unlink", b.cluster_id)
            b.send("unlink", a.cluster_id)
            assert a.result() == (SUCCESS, [SUCCESS])
            assert b.result() == (SUCCESS, [SUCCESS])
            assert a.call("unlink", b.cluster_id) == (SUCCESS, [SUCCESS])
            deadline = time.monotonic() + 5
            while a.call("linked", b.cluster_id) or b.call("linked", a.cluster_id):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert a.call("unlink", 987654) == (
            LLMStatusCode.LLM_NOT_YET_LINK,
            [LLMStatusCode.LLM_NOT_YET_LINK],
        )
    finally:
        c.close()


from .helpers import keyed_and_unkeyed  # noqa: E402

auth_mode = keyed_and_unkeyed()  # every test here runs without and with a shared key
