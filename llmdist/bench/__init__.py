"""``python -m llmdist bench``: the benchmark suite on the runtime LLMDIST_RUNTIME picks.

Every scenario times llmdist and its baselines in the same rounds and reports ratios; the run
prints a table (a progress line on stderr while it runs) and can write a JSON file (schema in
docs/bench.md), a PNG plot, and the change against an earlier JSON file."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, TextIO

from .results import Run, compare, load, machine_info, save
from .settings import (
    DEFAULT_BLOCKS,
    DEFAULT_LAYERS,
    DEFAULT_PAIRS,
    PRESETS,
    GiB,
    Settings,
    parse_size,
    size_name,
)
from .table import Progress, render, render_compare

LOCAL = ("b2b", "c2b", "c2c", "swap", "overlap", "overhead")
CLUSTER = ("cluster",)
ALL = LOCAL + CLUSTER


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(ALL)}, or 'local' / 'all' (default: all); or vllm",
    )
    p.add_argument(
        "--blocks",
        default=None,
        help=f"block sizes, comma-separated (default {DEFAULT_BLOCKS}, or the preset's)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"layers of the cache (default {DEFAULT_LAYERS}, or the preset's)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=DEFAULT_PAIRS,
        help="blocks moved per tensor (default %(default)s; never scaled down)",
    )
    p.add_argument(
        "--repeat", type=int, default=5, help="timed rounds per case (default %(default)s)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model shape: layers, KV heads, head dim, dtype, block tokens",
    )
    p.add_argument(
        "--mem-gib",
        type=float,
        default=None,
        help="memory a run may take, GiB (default: half of what is free)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write every figure to FILE")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="bandwidth vs block size per path (needs matplotlib: llmdist[plot])",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="JSON",
        default=None,
        help="OLD.json: print the change from OLD to this run; OLD.json NEW.json: "
        "only compare two files (no run)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    v = p.add_argument_group(
        "scenario vllm (alone: vLLM's NixlConnector and LLMDistConnector "
        "on CPU engines; --repeat rounds; needs vllm)"
    )
    v.add_argument(
        "--prompts",
        default="70,33,100,250",
        help="prompt lengths in tokens of one round (default %(default)s)",
    )
    v.add_argument(
        "--vllm-modes",
        default="nixl,pull,push,layerwise",
        help="connectors to run (default %(default)s)",
    )
    v.add_argument(
        "--vllm-port",
        type=int,
        default=45500,
        help="first port the engines listen on (default %(default)s)",
    )


def settings_from(args) -> Settings:
    """Settings from the command line; ValueError naming the option and the rule."""
    names: List[str] = []
    for s in args.scenarios or ["all"]:
        if s == "all":
            names += ALL
        elif s == "local":
            names += LOCAL
        elif s in ALL:
            names.append(s)
        else:
            raise ValueError(f"unknown scenario {s!r}: choose from {', '.join(ALL)}, local, all")
    names = list(dict.fromkeys(names))
    for opt in ("pairs", "repeat"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt} must be >= 1, got {getattr(args, opt)}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if args.mem_gib is not None and args.mem_gib <= 0:
        raise ValueError(f"--mem-gib must be > 0, got {args.mem_gib}")
    notes = []
    preset = PRESETS.get(args.preset) if args.preset else None
    layers = args.layers or (preset.layers if preset else DEFAULT_LAYERS)
    blocks_text = args.blocks or (size_name(preset.block_size) if preset else DEFAULT_BLOCKS)
    blocks = sorted({parse_size(b) for b in blocks_text.split(",") if b.strip()})
    if not blocks:
        raise ValueError("--blocks: give at least one size")
    s = Settings(
        scenarios=names,
        blocks=blocks,
        layers=layers,
        pairs=args.pairs,
        repeat=args.repeat,
        preset=args.preset,
        mem_budget=int(args.mem_gib * GiB) if args.mem_gib else None,
        notes=notes,
    )
    if preset:
        s.dtype = preset.dtype
        s.tensors_per_layer = preset.tensors_per_layer
        notes.append(
            f"preset {preset.name}: {preset.about}; {preset.layers} layers, block "
            f"{preset.block_tokens} tokens x {preset.kv_heads} KV heads x "
            f"{preset.head_dim} x {preset.dtype} = {size_name(preset.block_size)}"
        )
        if args.blocks:
            notes.append(f"--blocks {args.blocks} replaces the preset's block size")
        if args.layers:
            notes.append(f"--layers {args.layers} replaces the preset's {preset.layers} layers")
        bad = [b for b in blocks if b % s.np_dtype.itemsize]
        if bad:
            raise ValueError(
                f"--blocks: {bad[0]} bytes is not a whole number of {s.dtype} elements"
            )
    return s


def _one_tensor_per_layer(settings: Settings, cm, run: Run) -> None:
    """A cache of one tensor per layer (MLA) needs tensor_num_per_layer; without it in this
    build, each layer's block is moved as two tensors of half the bytes (the same bytes per
    layer), and the run says so."""
    from .local import supports_one_tensor_per_layer

    if settings.tensors_per_layer == 1 and not supports_one_tensor_per_layer(cm):
        item = settings.np_dtype.itemsize
        if any(b % (2 * item) for b in settings.blocks):
            raise ValueError("a block of one tensor per layer cannot be split in two halves here")
        settings.tensors_per_layer = 2
        settings.blocks = [b // 2 for b in settings.blocks]
        run.note(
            "one tensor per layer (tensor_num_per_layer=1) is not available in this build: "
            "each layer's block is moved as two tensors of half its size "
            f"({', '.join(size_name(b) for b in settings.blocks)} each), the same bytes "
            "per layer"
        )


def versions() -> dict:
    import numpy

    from .. import __version__
    from .peers import peer_versions

    return {"llmdist": __version__, "numpy": numpy.__version__, **peer_versions()}


def runtime_choice(info: dict) -> str:
    """How the runtime was chosen: named by LLMDIST_RUNTIME (or --runtime), or by auto, with
    why auto passed over each device runtime it tries first (ACL, then CUDA)."""
    import os

    choice = os.environ.get("LLMDIST_RUNTIME", "auto") or "auto"
    active = info["active"]
    if choice != "auto":
        return f"runtime: {active}, chosen by LLMDIST_RUNTIME={choice}"
    passed = []
    for name in ("acl", "cuda"):
        if name == active:
            break
        passed.append(f"{name}: {info['runtimes'][name].get('reason', 'not chosen')}")
    why = f" because {'; '.join(passed)}" if passed else " (the first it tries)"
    return f"runtime: auto chose {active}{why}"


def run_bench(settings: Settings, out: TextIO = sys.stdout, quiet: bool = False) -> Run:
    """Run the scenarios; returns the Run (results, notes) after printing its table."""
    from .. import runtimes
    from .local import SCENARIOS, steps
    from .workload import Bench

    progress = Progress(enabled=not quiet)
    t0 = time.perf_counter()
    bench = Bench(settings, progress)
    rt = bench.rt
    run = Run(
        machine=machine_info(),
        runtime={
            "name": rt.name,
            "version": rt.version,
            "library": rt.library,
            "device_id": rt.device_id,
            "info": runtimes.runtime_info(),
        },
        versions=versions(),
        settings=settings.to_json(),
        memory=bench.budget.to_json(),
    )
    for n in settings.notes:
        run.note(n)
    try:
        _one_tensor_per_layer(settings, bench.cm, run)
        run.settings = settings.to_json()
        from .cluster import cluster as cluster_scenario
        from .cluster import cluster_steps
        from .overhead import overhead
        from .overlap import overlap

        table = dict(SCENARIOS, overhead=overhead, overlap=overlap, cluster=cluster_scenario)
        for name in settings.scenarios:
            progress.plan(cluster_steps(bench) if name == "cluster" else steps(name, settings))
        for name in settings.scenarios:
            try:
                table[name](bench, run)
            except MemoryError as exc:
                run.note(f"{name}: skipped: {exc}")
    finally:
        progress.clear()
        bench.close()
    run.seconds = time.perf_counter() - t0
    run.machine["load_average_end"] = list(__import__("os").getloadavg())
    run.note(
        f"load average at start {'/'.join(f'{x:.2f}' for x in run.machine['load_average'])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in run.machine['load_average_end'])} on "
        f"{run.machine['cpus']} CPUs: figures are only comparable within one run"
    )
    out.write(
        f"llmdist bench: {rt.name} runtime {rt.version} ({rt.library}), device {rt.device_id}; "
        f"{settings.layers} layers x {settings.tensors_per_layer} tensors, {settings.pairs} "
        f"pairs, {settings.repeat} rounds; memory budget: {bench.budget.how}\n"
    )
    out.write(runtime_choice(run.runtime["info"]) + "\n")
    out.write(render(run.results, run.notes))
    return run


def main(args, out: TextIO = sys.stdout) -> int:
    if "vllm" in (args.scenarios or []):
        if args.scenarios != ["vllm"]:
            print("llmdist bench: scenario vllm runs alone", file=sys.stderr)
            return 2
        from .vllm import main as vllm_main

        return vllm_main(args, out)
    if args.compare and len(args.compare) > 2:
        print("--compare takes OLD.json or OLD.json NEW.json", file=sys.stderr)
        return 2
    if args.compare and len(args.compare) == 2:
        try:
            old, new = (load(p) for p in args.compare)
        except (ValueError, OSError) as exc:
            print(f"llmdist bench: --compare: {exc}", file=sys.stderr)
            return 2
        out.write(render_compare(compare(old, new), *args.compare))
        return 0
    try:
        settings = settings_from(args)
        old = load(args.compare[0]) if args.compare else None
    except (ValueError, OSError) as exc:
        print(f"llmdist bench: {exc}", file=sys.stderr)
        return 2
    run = run_bench(settings, out, quiet=args.quiet)
    data = run.to_json()
    if args.json:
        save(run, args.json)
        out.write(f"wrote {args.json}\n")
    if args.plot:
        from .plot import plot

        try:
            plot(data, args.plot)
            out.write(f"wrote {args.plot}\n")
        except (ImportError, ValueError) as exc:
            print(f"llmdist bench: {exc}", file=sys.stderr)
            return 2
    if old is not None:
        out.write("\n" + render_compare(compare(old, data), args.compare[0], "this run"))
    wrong = [r for r in run.results if r.verified is False]
    return 1 if wrong else 0
