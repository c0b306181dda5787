"""Scenarios inside one process: B2B, C2B and C2C copies (device to device on a device runtime),
swaps between device and host memory, and the call overhead of transfer_cache_async (the overlap
with a simulated prefill is in .overlap). Each measures its baselines in the same
rounds and checks the bytes of one llmdist transfer before timing."""

from __future__ import annotations

import inspect
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from ..descs import Placement
from ..transfer_types import LayerSynchronizer, TransferConfig
from .peers import llm_datadist_available
from .results import SUBJECT, Result, Run, path_of
from .settings import (
    OVERHEAD_BLOCK,
    OVERHEAD_LAYERS,
    OVERHEAD_PULL_BLOCK,
    SCALING_FACTORS,
    Need,
    size_name,
)
from .workload import (
    CLUSTER_ID,
    CONTIGUOUS,
    NUMPY,
    PER_BLOCK,
    TORCH,
    Bench,
    Go,
    block_pairs,
    check,
    verify_blocks,
)

DEVICE, HOST = Placement.DEVICE, Placement.HOST


def layer_kwargs(bench: Bench) -> dict:
    """tensor_num_per_layer for caches of one tensor per layer (MLA)."""
    return (
        {}
        if bench.settings.tensors_per_layer == 2
        else {"tensor_num_per_layer": bench.settings.tensors_per_layer}
    )


def supports_one_tensor_per_layer(cm) -> bool:
    return "tensor_num_per_layer" in inspect.signature(cm.transfer_cache_async).parameters


def local_result(
    scenario: str,
    case: str,
    block: Optional[int],
    nbytes: int,
    times: Dict[str, List[float]],
    skipped: Dict[str, str],
    verified: Optional[bool],
    **extra,
) -> Result:
    paths = {k: path_of(v, nbytes) for k, v in times.items()}
    return Result(
        scenario, case, block, nbytes, paths, skipped=skipped, verified=verified, extra=extra
    ).finish()


def _block_paths(bench: Bench, llmdist, moved: int, src, dst, si, di, block: int) -> dict:
    """llmdist's call and the baselines of every block scenario: one contiguous copy of the same
    bytes, and one runtime copy per block (source block si[j] to destination block di[j])."""
    dsts = [a + d * block for a in dst.tensor_addrs for d in di]
    srcs = [a + x * block for a in src.tensor_addrs for x in si]
    return {
        SUBJECT: llmdist,
        CONTIGUOUS: bench.contiguous(moved, src, dst),
        PER_BLOCK: bench.per_block(dsts, srcs, block),
    }


def _add_numpy(paths: dict, skipped: dict, numpy_run) -> None:
    """numpy indexing when the caches are host memory, else the reason."""
    if numpy_run is not None:
        paths[NUMPY] = numpy_run
    else:
        skipped[NUMPY] = "device memory is not host memory"


def _add_framework_baselines(
    bench: Bench, paths: dict, skipped: dict, releases: list, numpy_run, torch_args
) -> None:
    """numpy indexing on host memory, else torch indexing on the device, else the reasons."""
    _add_numpy(paths, skipped, numpy_run)
    t = bench.torch_indexing(*torch_args)
    if t is not None:
        paths[TORCH] = t[0]
        releases.append(t[1])
    elif not bench.host_memory:
        skipped[TORCH] = bench.torch_reason()


UPSTREAM = "llm_datadist (CANN)"


def upstream_reason() -> str:
    """Why upstream llm_datadist is not a baseline in this run."""
    why = llm_datadist_available()
    return why or (
        "installed, but this command does not drive it yet (it needs a linked peer "
        "cluster on an Atlas device)"
    )


DMA_VARIANT = "llmdist, DMA copies"


def _add_dma_variant(bench: Bench, paths: dict, llmdist, dst, verify) -> bool:
    """On CUDA with the copy kernel: the same llmdist call with one DMA copy per run instead
    (llmdist.device_copy=dma), switched for that call only. Its bytes are checked once (dst
    cleared, the call, `verify()`); returns that check (True when there is no such variant)."""
    rt = bench.rt
    if not kernel_mode(bench):
        return True

    def dma():
        rt.select_device_copy("dma")
        try:
            llmdist()
        finally:
            rt.select_device_copy("kernel")

    paths[DMA_VARIANT] = dma
    bench.zero(dst)
    dma()
    return verify()


def _measure_blocks(
    bench: Bench,
    label: str,
    llmdist,
    src,
    dst,
    si,
    di,
    block: int,
    moved: int,
    releases: list,
    torch_args: tuple,
):
    """Run llmdist once and check that blocks di of dst hold blocks si of src, then time it
    against the runtime's per-block loop and contiguous copy, DMA (CUDA kernel mode) and the
    framework baselines. Returns (bytes right, times, baselines skipped with the reason)."""

    def verify() -> bool:
        return verify_blocks(bench, src, dst, si, di, block)

    llmdist()
    ok = verify()
    paths = _block_paths(bench, llmdist, moved, src, dst, si, di, block)
    skipped: Dict[str, str] = {}
    ok = _add_dma_variant(bench, paths, llmdist, dst, verify) and ok
    _add_framework_baselines(
        bench, paths, skipped, releases, bench.numpy_indexing(src, dst, si, di, block), torch_args
    )
    return ok, bench.rounds(label, paths), skipped


def _kind(bench: Bench, src: Placement, dst: Placement) -> str:
    if bench.host_memory:
        return "host runtime"
    names = {DEVICE: "D", HOST: "H"}
    return f"{names[src]}2{names[dst]}"


# ------------------------------------------------------------------------------------------
# B2B


def b2b(bench: Bench, run: Run) -> None:
    s = bench.settings
    nt = s.layers * s.tensors_per_layer
    for block in s.blocks:
        label = f"b2b {size_name(block)}"
        bench.progress.step(label)
        moved = nt * s.pairs * block
        copies = 4 if bench.torch else 2  # llmdist's caches (+ torch's own)
        plan = bench.budget.fit_pool(label, Need(copies * nt * block, 0))
        run.note(plan.note)
        src = bench.blocks_cache(nt, plan.pool, block)
        dst = bench.blocks_cache(nt, plan.pool, block)
        releases = [lambda: bench.free(src, dst)]
        try:
            bench.fill(src)
            bench.zero(dst)
            si, di = block_pairs(plan.pool, s.pairs, s.seed)
            cfg = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs))]
            kw = layer_kwargs(bench)

            def llmdist():
                check(
                    bench.cm.transfer_cache_async(src, Go(), cfg, si, di, **kw).synchronize(),
                    "B2B transfer",
                )

            ok, times, skipped = _measure_blocks(
                bench,
                label,
                llmdist,
                src,
                dst,
                si,
                di,
                block,
                moved,
                releases,
                (nt, plan.pool, block, si, di),
            )
            skipped[UPSTREAM] = upstream_reason()
            run.results.append(
                local_result(
                    "b2b",
                    f"{_kind(bench, DEVICE, DEVICE)} {s.layers} layers",
                    block,
                    moved,
                    times,
                    skipped,
                    ok,
                    pool=plan.pool,
                    pairs=s.pairs,
                    tensors=nt,
                )
            )
        finally:
            for r in reversed(releases):
                r()


# ------------------------------------------------------------------------------------------
# C2B and C2C: row 1 of a two-row cache, `pairs` blocks long


def c2b(bench: Bench, run: Run) -> None:
    s = bench.settings
    nt = s.layers * s.tensors_per_layer
    for block in s.blocks:
        label = f"c2b {size_name(block)}"
        bench.progress.step(label)
        row = s.pairs * block
        moved = nt * row
        plan = bench.budget.fit_pool(label, Need(nt * block, 2 * nt * row), minimum=s.pairs)
        run.note(plan.note)
        src = bench.cache(nt, 2, row)
        dst = bench.blocks_cache(nt, plan.pool, block)
        releases = [lambda: bench.free(src, dst)]
        try:
            bench.fill(src)
            bench.zero(dst)
            _, di = block_pairs(plan.pool, s.pairs, s.seed)
            chunks = list(range(s.pairs, 2 * s.pairs))  # row 1 in block-sized chunks
            cfg = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs), None, 1)]
            kw = layer_kwargs(bench)

            def llmdist():
                check(
                    bench.cm.transfer_cache_async(
                        src, Go(), cfg, None, di, block, **kw
                    ).synchronize(),
                    "C2B transfer",
                )

            ok, times, skipped = _measure_blocks(
                bench,
                label,
                llmdist,
                src,
                dst,
                chunks,
                di,
                block,
                moved,
                releases,
                (nt, plan.pool, block, chunks, di, 2 * s.pairs),
            )
            run.results.append(
                local_result(
                    "c2b",
                    f"{_kind(bench, DEVICE, DEVICE)} {s.layers} layers",
                    block,
                    moved,
                    times,
                    skipped,
                    ok,
                    pool=plan.pool,
                    pairs=s.pairs,
                    tensors=nt,
                )
            )
        finally:
            for r in reversed(releases):
                r()


def c2c(bench: Bench, run: Run) -> None:
    s = bench.settings
    nt = s.layers * s.tensors_per_layer
    for block in s.blocks:
        label = f"c2c {size_name(block)}"
        bench.progress.step(label)
        row = s.pairs * block
        moved = nt * row
        bench.budget.fit_pool(label, Need(0, 3 * nt * row), full_pool=1)
        src = bench.cache(nt, 2, row)
        dst = bench.cache(nt, 1, row)
        releases = [lambda: bench.free(src, dst)]
        try:
            bench.fill(src)
            bench.zero(dst)
            cfg = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs), None, 1)]
            kw = layer_kwargs(bench)

            def llmdist():
                check(
                    bench.cm.transfer_cache_async(src, Go(), cfg, **kw).synchronize(),
                    "C2C transfer",
                )

            chunks = list(range(s.pairs, 2 * s.pairs))  # row 1 of src into row 0 of dst
            rows = list(range(s.pairs))
            ok, times, skipped = _measure_blocks(
                bench,
                label,
                llmdist,
                src,
                dst,
                chunks,
                rows,
                block,
                moved,
                releases,
                (nt, s.pairs, block, chunks, rows, 2 * s.pairs),
            )
            run.results.append(
                local_result(
                    "c2c",
                    f"{_kind(bench, DEVICE, DEVICE)} {s.layers} layers, row = {s.pairs} blocks",
                    block,
                    moved,
                    times,
                    skipped,
                    ok,
                    tensors=nt,
                    row_bytes=row,
                )
            )
        finally:
            for r in reversed(releases):
                r()


# ------------------------------------------------------------------------------------------
# Swap between device and host memory


def swap(bench: Bench, run: Run) -> None:
    """Device -> host and host -> device. With CacheManager.swap_blocks both ways; without it,
    device -> host as a transfer_cache_async into an allocated HOST cache, and host -> device is
    reported as not available (transfer_cache_async refuses a HOST source for a DEVICE
    destination)."""
    s = bench.settings
    nt = s.layers * s.tensors_per_layer
    has_swap = hasattr(bench.cm, "swap_blocks")
    for block in s.blocks:
        for src_place, dst_place in ((DEVICE, HOST), (HOST, DEVICE)):
            kind = (
                _kind(bench, src_place, dst_place)
                if not bench.host_memory
                else f"{src_place.name.lower()}->{dst_place.name.lower()}"
            )
            label = f"swap {kind} {size_name(block)}"
            bench.progress.step(label)
            skipped: Dict[str, str] = {}
            if not has_swap and src_place == HOST:
                run.results.append(
                    Result(
                        "swap",
                        kind,
                        block,
                        0,
                        {},
                        skipped={
                            SUBJECT: "swap_blocks is not available in this build (and transfer_cache_async "
                            "refuses a HOST source with a DEVICE destination)"
                        },
                    )
                )
                continue
            moved = nt * s.pairs * block
            pool_min = s.pairs if has_swap else 1  # a dict maps each source block once
            plan = bench.budget.fit_pool(
                label, Need(nt * block, 0), Need(nt * block, 0), minimum=pool_min
            )
            run.note(plan.note)
            src = bench.blocks_cache(nt, plan.pool, block, src_place)
            dst = bench.blocks_cache(nt, plan.pool, block, dst_place)
            releases = [lambda: bench.free(src, dst)]
            try:
                bench.fill(src)
                bench.zero(dst)
                si, di = block_pairs(plan.pool, s.pairs, s.seed)
                if has_swap:
                    mapping = dict(zip(si, di))

                    def llmdist():
                        bench.cm.swap_blocks(src, dst, mapping)

                    how = "swap_blocks"
                else:
                    cfg = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs))]
                    kw = layer_kwargs(bench)

                    def llmdist():
                        check(
                            bench.cm.transfer_cache_async(
                                src, Go(), cfg, si, di, **kw
                            ).synchronize(),
                            "D2H transfer",
                        )

                    how = "transfer_cache_async into an allocated HOST cache (no swap_blocks in this build)"
                llmdist()
                ok = verify_blocks(bench, src, dst, si, di, block)
                paths = _block_paths(bench, llmdist, moved, src, dst, si, di, block)
                _add_numpy(paths, skipped, bench.numpy_indexing(src, dst, si, di, block))
                times = bench.rounds(label, paths)
                run.results.append(
                    local_result(
                        "swap",
                        kind,
                        block,
                        moved,
                        times,
                        skipped,
                        ok,
                        pool=plan.pool,
                        pairs=s.pairs,
                        tensors=nt,
                        llmdist_call=how,
                    )
                )
            finally:
                for r in reversed(releases):
                    r()


def kernel_mode(bench: Bench) -> bool:
    """CUDA with the copy kernel in use (so a DMA variant means something)."""
    return (
        hasattr(bench.rt, "select_device_copy")
        and getattr(bench.rt, "device_copy", None) == "kernel"
    )


# ------------------------------------------------------------------------------------------
# Call overhead


class Gate(LayerSynchronizer):
    """Holds every layer until released."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return self.event.wait(None if timeout_in_millis is None else timeout_in_millis / 1000.0)


def overhead(bench: Bench, run: Run) -> None:
    """What a call costs besides its copies: the time transfer_cache_async takes to return its
    task (61 layers x `pairs` blocks, layers held back so that nothing copies meanwhile) against
    the same call for one layer; a 61-layer pull_blocks against the same runs through the copy
    engine alone; and the return time of a one-layer call over `pairs` x 1, 16 and 256 pairs
    against the smallest one scaled up (the cost per block pair, flat when the ratio is 1)."""
    _overhead_transfer(bench, run)
    _overhead_pull(bench, run)
    _overhead_scaling(bench, run)


def _held_call(bench: Bench, src, cfgs, si, di, kw) -> float:
    """Seconds transfer_cache_async takes to return, its layers held until it has; then the
    transfer runs to its end."""
    gate = Gate()
    t0 = time.perf_counter()
    task = bench.cm.transfer_cache_async(src, gate, cfgs, si, di, **kw)
    t = time.perf_counter() - t0
    gate.event.set()
    check(task.synchronize(), "transfer")
    return t


def _overhead_transfer(bench: Bench, run: Run) -> None:
    s = bench.settings
    tpl = s.tensors_per_layer
    L = OVERHEAD_LAYERS
    nt = L * tpl
    label = f"overhead {L} layers x {s.pairs} blocks"
    bench.progress.step(label)
    plan = bench.budget.fit_pool(label, Need(2 * nt * OVERHEAD_BLOCK, 0))
    run.note(plan.note)
    src = bench.blocks_cache(nt, plan.pool, OVERHEAD_BLOCK)
    dst = bench.blocks_cache(nt, plan.pool, OVERHEAD_BLOCK)
    try:
        si, di = block_pairs(plan.pool, s.pairs, s.seed)
        kw = layer_kwargs(bench)
        full = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs))]
        one = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs[:tpl]), range(0, 1))]
        times: Dict[str, List[float]] = {SUBJECT: [], "one-layer call": []}
        rounds = max(20, 20 * s.repeat)
        for i in range(rounds + 5):
            if i % 10 == 0:
                bench.progress.show(f"{label}: call {i + 1}/{rounds + 5}")
            for name, cfgs in ((SUBJECT, full), ("one-layer call", one)):
                t = _held_call(bench, src, cfgs, si, di, kw)
                if i >= 5:
                    times[name].append(t)
        res = local_result(
            "overhead",
            f"{L} layers x {s.pairs} blocks, 1 config",
            OVERHEAD_BLOCK,
            0,
            times,
            {},
            None,
            p90_s=float(np.percentile(times[SUBJECT], 90)),
            pool=plan.pool,
        )
        run.results.append(res)
    finally:
        bench.free(src, dst)


def _overhead_pull(bench: Bench, run: Run) -> None:
    """pull_blocks of 61 layers x `pairs` small blocks from a cache of this cluster, against the
    same runs (one copy_pairs call with one wait) through the copy engine: the difference is
    what the call adds to its copies."""
    from .. import _core
    from ..descs import BlocksCacheKey

    s = bench.settings
    tpl = s.tensors_per_layer
    L = OVERHEAD_LAYERS
    nt = L * tpl
    block = OVERHEAD_PULL_BLOCK
    label = f"overhead pull {L} layers x {s.pairs} blocks"
    bench.progress.step(label)
    plan = bench.budget.fit_pool(label, Need(2 * nt * block, 0))
    run.note(plan.note)
    key = BlocksCacheKey(CLUSTER_ID, 99)
    src = bench.cm.allocate_blocks_cache(bench.desc(nt, plan.pool, block, Placement.DEVICE), key)
    dst = bench.blocks_cache(nt, plan.pool, block)
    try:
        bench.fill(src)
        bench.zero(dst)
        si, di = block_pairs(plan.pool, s.pairs, s.seed)
        kw = layer_kwargs(bench)
        runs = _core.plan_b2b(_core.parse_indices("src", si), _core.parse_indices("dst", di), block)
        srcs, dsts = list(src.tensor_addrs), list(dst.tensor_addrs)

        def pull():
            bench.cm.pull_blocks(key, dst, si, di, **kw)

        def engine():
            _core.copy_pairs(
                bench.rt, bench.stream, runs, srcs, dsts, _core.CopyKind.COPY_D2D, "copy"
            )

        pull()
        ok = verify_blocks(bench, src, dst, si, di, block, tensors=[0, nt - 1])
        rounds = max(10, 4 * s.repeat)
        times = bench.rounds(label, {SUBJECT: pull, "same runs, copy engine": engine}, rounds)
        added = statistics.median(times[SUBJECT]) - statistics.median(
            times["same runs, copy engine"]
        )
        res = local_result(
            "overhead",
            f"pull_blocks {L} layers x {s.pairs} blocks",
            block,
            nt * s.pairs * block,
            times,
            {},
            ok,
            call_overhead_s=added,
            pool=plan.pool,
        )
        res.extra["summary"] = f"{added * 1e6:+.1f} us over its copies ({block} B blocks)"
        run.results.append(res)
    finally:
        bench.free(src, dst)


def _overhead_scaling(bench: Bench, run: Run) -> None:
    """A one-layer transfer_cache_async of `pairs` x SCALING_FACTORS pairs of small blocks; each
    size's return time against the smallest one's scaled by the pair count, in the same
    rounds, and its cost per pair."""
    s = bench.settings
    tpl = s.tensors_per_layer
    block = OVERHEAD_PULL_BLOCK
    sizes = [s.pairs * f for f in SCALING_FACTORS]
    label = f"overhead scaling {sizes[0]}-{sizes[-1]} pairs"
    bench.progress.step(label)
    plan = bench.budget.fit_pool(label, Need(2 * tpl * block, 0), full_pool=sizes[-1])
    run.note(plan.note)
    src = bench.blocks_cache(tpl, plan.pool, block)
    dst = bench.blocks_cache(tpl, plan.pool, block)
    try:
        kw = layer_kwargs(bench)
        cfgs = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs), range(0, 1))]
        pairs = {n: block_pairs(plan.pool, n, s.seed) for n in sizes}
        times: Dict[int, List[float]] = {n: [] for n in sizes}
        rounds = max(10, 4 * s.repeat)
        for i in range(rounds + 2):
            bench.progress.show(f"{label}: round {i + 1}/{rounds + 2}")
            for n in sizes:
                t = _held_call(bench, src, cfgs, *pairs[n], kw)
                if i >= 2:
                    times[n].append(t)
        for n in sizes:
            scaled = [t * n / sizes[0] for t in times[sizes[0]]]
            paths = {SUBJECT: times[n]}
            if n != sizes[0]:
                paths[f"{sizes[0]}-pair call x {n // sizes[0]}"] = scaled
            res = local_result(
                "overhead",
                f"1 layer, {n} pairs",
                block,
                0,
                paths,
                {},
                None,
                ns_per_pair=statistics.median(times[n]) / n * 1e9,
                pool=plan.pool,
            )
            res.extra["summary"] = f"{res.extra['ns_per_pair']:.1f} ns per pair"
            run.results.append(res)
    finally:
        bench.free(src, dst)


SCENARIOS: Dict[str, Callable[[Bench, Run], None]] = {
    "b2b": b2b,
    "c2b": c2b,
    "c2c": c2c,
    "swap": swap,
    "overhead": overhead,
}


def steps(name: str, bench_settings) -> int:
    """How many progress steps a scenario takes (for the progress line)."""
    n = len(bench_settings.blocks)
    return {"b2b": n, "c2b": n, "c2c": n, "swap": 2 * n, "overlap": 3, "overhead": 3}.get(name, 1)
