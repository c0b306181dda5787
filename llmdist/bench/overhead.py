"""The call overhead scenario: what transfer_cache_async and pull_blocks cost besides their
copies, and how a call's return time grows with its block pairs (in one process)."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Dict, List

import numpy as np

from ..descs import Placement
from ..transfer_types import LayerSynchronizer, TransferConfig
from .local import layer_kwargs, local_result
from .results import SUBJECT, Run
from .settings import OVERHEAD_BLOCK, OVERHEAD_LAYERS, OVERHEAD_PULL_BLOCK, SCALING_FACTORS, Need
from .workload import CLUSTER_ID, Bench, block_pairs, check, verify_blocks


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
        # sub-millisecond calls: as many rounds as the transfer case
        rounds = max(20, 20 * s.repeat)
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
