"""A disaggregated-serving proxy for vLLM with LLMDistConnector (pull mode): each OpenAI
completion or chat request goes to a prefill server with max_tokens 1 and
kv_transfer_params {"do_remote_decode": true}; the kv_transfer_params it answers with (where
the KV blocks are) go with the original request to a decode server, whose answer (streamed or
not) is returned. Prefill and decode servers are picked round-robin.

    python examples/vllm/proxy.py --port 8000 \\
        --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200

Needs fastapi, uvicorn and httpx (all installed with vLLM)."""

from __future__ import annotations

import argparse
import itertools
import uuid
from typing import List

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def make_app(prefills: List[str], decodes: List[str], timeout_s: float) -> FastAPI:
    app = FastAPI()
    client = httpx.AsyncClient(timeout=timeout_s)
    next_prefill = itertools.cycle(prefills)
    next_decode = itertools.cycle(decodes)

    async def serve(path: str, request: Request):
        body = await request.json()
        rid = str(uuid.uuid4())
        headers = {"X-Request-Id": rid}
        # 1. prefill: compute the prompt's KV, keep it for the decode, answer where it is
        pre = dict(body, max_tokens=1, stream=False,
                   kv_transfer_params={"do_remote_decode": True})
        pre.pop("max_completion_tokens", None)
        pre.pop("stream_options", None)
        r = await client.post(next(next_prefill) + path, json=pre, headers=headers)
        if r.status_code != 200:
            return JSONResponse(r.json(), status_code=r.status_code)
        params = r.json().get("kv_transfer_params")
        # 2. decode: pull the KV (the decode's connector), then generate
        dec = dict(body, kv_transfer_params=params)
        url = next(next_decode) + path
        if body.get("stream"):
            async def chunks():
                async with client.stream("POST", url, json=dec, headers=headers) as s:
                    async for chunk in s.aiter_bytes():
                        yield chunk
            return StreamingResponse(chunks(), media_type="text/event-stream")
        r = await client.post(url, json=dec, headers=headers)
        return JSONResponse(r.json(), status_code=r.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve("/v1/chat/completions", request)

    @app.get("/healthcheck")
    async def health():
        return {"prefill": prefills, "decode": decodes}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", action="append", required=True, help="a prefill server URL")
    ap.add_argument("--decode", action="append", required=True, help="a decode server URL")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream call")
    args = ap.parse_args()
    uvicorn.run(make_app(args.prefill, args.decode, args.timeout), host=args.host,
                port=args.port)


if __name__ == "__main__":
    main()
