"""A disaggregated-serving proxy for vLLM with LLMDistConnector, OpenAI-compatible (completions
and chat completions, streamed or not). Prefill and decode servers are picked round-robin.

- pull and push (--mode pull, the default, or push): the request goes to a prefill server with
  max_tokens 1 and kv_transfer_params {"do_remote_decode": true}; the kv_transfer_params it
  answers with (where the KV blocks are) go with the original request to a decode server,
  whose answer is returned.
- layerwise (--mode layerwise): the request goes to a prefill and a decode server at once with
  one transfer id, so the prefill streams each layer while it computes the next; each
  --prefill needs a --prefill-kv ENGINE_ID@HOST:PORT[,PORT...] (its kv_transfer_config's
  engine_id, and the host and base_port + rank its workers listen on, one port per TP rank).

    python examples/vllm/proxy.py --port 8000 \\
        --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
    python examples/vllm/proxy.py --port 8000 --mode layerwise \\
        --prefill http://127.0.0.1:8100 --prefill-kv prefill-0@127.0.0.1:45300 \\
        --decode http://127.0.0.1:8200

Needs fastapi, uvicorn and httpx (all installed with vLLM), and llmdist."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import List, Optional

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmdist.integrations.vllm_params import layerwise_params, prefill_params

log = logging.getLogger("llmdist.vllm.proxy")
MODES = ("pull", "push", "layerwise")


@dataclass
class PrefillKV:
    """Where a prefill server's llmdist workers listen (layerwise mode)."""

    engine_id: str
    host: str
    ports: List[int]

    @classmethod
    def parse(cls, text: str) -> "PrefillKV":
        """ENGINE_ID@HOST:PORT[,PORT...]; ValueError naming the rule."""
        engine_id, at, rest = text.partition("@")
        host, colon, ports = rest.rpartition(":")
        try:
            nums = [int(p) for p in ports.split(",")]
        except ValueError:
            nums = []
        if not (at and colon and engine_id and host and nums and all(0 < p < 65536 for p in nums)):
            raise ValueError(f"--prefill-kv must be ENGINE_ID@HOST:PORT[,PORT...], got {text!r}")
        return cls(engine_id, host, nums)


def prefill_body(body: dict, params: dict) -> dict:
    """The request a prefill server gets: one token, no stream, the connector's params."""
    pre = dict(body, max_tokens=1, stream=False, kv_transfer_params=params)
    pre.pop("max_completion_tokens", None)
    pre.pop("stream_options", None)
    return pre


def make_app(
    prefills: List[str],
    decodes: List[str],
    timeout_s: float,
    mode: str = "pull",
    prefill_kv: Optional[List[PrefillKV]] = None,
    transport: Optional[httpx.AsyncBaseTransport] = None,
) -> FastAPI:
    """The proxy's app. transport replaces the network (tests)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "layerwise" and len(prefill_kv or ()) != len(prefills):
        raise ValueError("layerwise mode needs one --prefill-kv per --prefill")
    app = FastAPI()
    client = httpx.AsyncClient(timeout=timeout_s, transport=transport)
    next_prefill = itertools.cycle(list(zip(prefills, prefill_kv or [None] * len(prefills))))
    next_decode = itertools.cycle(decodes)

    def decode_answer(url: str, dec: dict, headers: dict, stream: bool, background=None):
        if stream:

            async def chunks():
                async with client.stream("POST", url, json=dec, headers=headers) as s:
                    async for chunk in s.aiter_bytes():
                        yield chunk
                if background is not None:
                    await background

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return None

    async def serve(path: str, request: Request):
        body = await request.json()
        rid = str(uuid.uuid4())
        headers = {"X-Request-Id": rid}
        prefill_url, kv = next(next_prefill)
        decode_url = next(next_decode) + path
        if mode == "layerwise":
            # both at once: the decode registers its blocks with the prefill, which streams
            # each layer into them as its forward computes it
            d_params, p_params = layerwise_params(rid, kv.engine_id, kv.host, kv.ports)
            dec = dict(body, kv_transfer_params=d_params)
            pre = asyncio.ensure_future(
                client.post(prefill_url + path, json=prefill_body(body, p_params), headers=headers)
            )
            pre.add_done_callback(_log_prefill_failure)
            streamed = decode_answer(decode_url, dec, headers, bool(body.get("stream")), pre)
            if streamed is not None:
                return streamed
            r = await client.post(decode_url, json=dec, headers=headers)
            await pre
            return JSONResponse(r.json(), status_code=r.status_code)
        # 1. prefill: compute the prompt's KV, keep it for the decode, answer where it is
        r = await client.post(
            prefill_url + path, json=prefill_body(body, prefill_params()), headers=headers
        )
        if r.status_code != 200:
            return JSONResponse(r.json(), status_code=r.status_code)
        # 2. decode: pull the KV (or have it pushed), then generate
        dec = dict(body, kv_transfer_params=r.json().get("kv_transfer_params"))
        streamed = decode_answer(decode_url, dec, headers, bool(body.get("stream")))
        if streamed is not None:
            return streamed
        r = await client.post(decode_url, json=dec, headers=headers)
        return JSONResponse(r.json(), status_code=r.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve("/v1/chat/completions", request)

    @app.get("/healthcheck")
    async def health():
        return {"mode": mode, "prefill": prefills, "decode": decodes}

    return app


def _log_prefill_failure(fut: "asyncio.Future") -> None:
    """Layerwise: a failed prefill leaves the decode to its lease (then it recomputes or fails
    the request, kv_load_failure_policy); say so here."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.error("the prefill request failed: %s: %s", type(exc).__name__, exc)
    elif fut.result().status_code != 200:
        log.error("the prefill answered %d: %s", fut.result().status_code, fut.result().text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--mode", choices=MODES, default="pull")
    ap.add_argument("--prefill", action="append", required=True, help="a prefill server URL")
    ap.add_argument(
        "--prefill-kv",
        action="append",
        type=PrefillKV.parse,
        default=None,
        help="layerwise: ENGINE_ID@HOST:PORT[,PORT...] of each --prefill, in order",
    )
    ap.add_argument("--decode", action="append", required=True, help="a decode server URL")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream call")
    args = ap.parse_args()
    try:
        app = make_app(args.prefill, args.decode, args.timeout, args.mode, args.prefill_kv)
    except ValueError as exc:
        ap.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
