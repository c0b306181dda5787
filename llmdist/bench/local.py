"""Scenarios inside one process: B2B, C2B and C2C copies (device to device on a device runtime)
and swaps between device and host memory (the call overhead is in .overhead, the overlap with a
simulated prefill in .overlap). Each measures its baselines in the same rounds and checks the
bytes of one llmdist transfer before timing."""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional

from ..descs import Placement
from ..transfer_types import TransferConfig
from .peers import llm_datadist_available
from .results import SUBJECT, Result, Run, path_of
from .settings import (
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


SCENARIOS: Dict[str, Callable[[Bench, Run], None]] = {
    "b2b": b2b,
    "c2b": c2b,
    "c2c": c2c,
    "swap": swap,
}


def steps(name: str, bench_settings) -> int:
    """How many progress steps a scenario takes (for the progress line)."""
    n = len(bench_settings.blocks)
    return {"b2b": n, "c2b": n, "c2c": n, "swap": 2 * n, "overlap": 3, "overhead": 3}.get(name, 1)
