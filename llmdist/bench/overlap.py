"""The overlap scenario: a simulated prefill of `--layers` layers streams its cache layer by
layer (compute released by a Python synchronizer, or by events on a model stream); the figure is
the tail after the last layer, in units of one layer's copy."""

from __future__ import annotations

import math
import statistics
import threading
import time

import numpy as np

from .._core import Stream
from ..descs import Placement
from ..events import EventSynchronizer
from ..transfer_types import LayerSynchronizer, TransferConfig
from .local import kernel_mode, layer_kwargs, local_result
from .results import SUBJECT, Run
from .settings import Need, size_name
from .workload import (
    CLUSTER_ID,
    Bench,
    Go,
    block_pairs,
    check,
    device_sync,
    verify_blocks,
)

DEVICE, HOST = Placement.DEVICE, Placement.HOST


class LayerEvents(LayerSynchronizer):
    """One threading.Event per layer; records when each wait returned."""

    def __init__(self, layers: int) -> None:
        self.events = [threading.Event() for _ in range(layers)]
        self.returned = [0.0] * layers

    def synchronize_layer(self, layer_index, timeout_in_millis):
        ok = self.events[layer_index].wait(
            None if timeout_in_millis is None else timeout_in_millis / 1000.0
        )
        self.returned[layer_index] = time.perf_counter()
        return ok


class Compute:
    """One layer of simulated prefill lasting about `seconds`: a sleep (an accelerator computing
    while the host idles), or matmuls calibrated on whole steps: torch on the runtime's device when
    torch imports, else numpy on the host (busy cores, competing with host copies)."""

    def __init__(self, kind: str, seconds: float, torch_dev=None) -> None:
        self.kind = kind
        self.seconds = seconds
        self.reps = 1
        self.sync = None
        if kind == "sleep":
            return
        if torch_dev is not None:
            torch, dev = torch_dev
            self.a = torch.randn((2048, 2048), device=dev)
            self.b = torch.randn((2048, 2048), device=dev)
            self.sync = device_sync(torch, dev)
        else:
            rng = np.random.default_rng(0)
            self.a = rng.standard_normal((128, 128), dtype=np.float32)
            self.b = rng.standard_normal((128, 128), dtype=np.float32)
        for _ in range(3):
            self.step_time()
        for _ in range(3):
            t = statistics.median([self.step_time() for _ in range(5)])
            self.reps = max(1, math.ceil(self.reps * seconds / max(t, 1e-9)))

    def step_time(self) -> float:
        t0 = time.perf_counter()
        self()
        return time.perf_counter() - t0

    def __call__(self) -> None:
        if self.kind == "sleep":
            time.sleep(self.seconds)
            return
        for _ in range(self.reps):
            self.a @ self.b
        if self.sync is not None:
            self.sync()


class DeviceWork:
    """Simulated layers for an event-gated prefill: per layer, work queued on a model stream and
    then the layer's event, which the transfer stream waits on (no host thread per layer).
    The work is torch fp16 matmuls with torch events (CUDA, when torch imports), else a device
    copy of `nbytes` standing in for a layer's compute."""

    def __init__(self, bench: Bench, layers: int, nbytes: int, use_torch: bool) -> None:
        self.bench = bench
        self.bufs = []
        if use_torch:
            torch, dev = bench.torch
            self.a = torch.randn((2048, 2048), dtype=torch.float16, device=dev)
            self.model = torch.cuda.Stream()
            self.events = [torch.cuda.Event() for _ in range(layers)]
            with torch.cuda.stream(self.model):
                for ev in self.events:
                    ev.record()  # torch creates an event at its first record
            torch.cuda.synchronize()
            self.sync = EventSynchronizer(bench.rt, [ev.cuda_event for ev in self.events])
            self.torch = torch
        else:
            self.torch = None
            self.model = Stream(bench.rt)
            self.sync = EventSynchronizer(bench.rt, layers)
            self.bufs = [bench.cache(1, 1, nbytes) for _ in range(2)]
            self.nbytes = nbytes

    def layer(self, i: int) -> None:
        if self.torch is not None:
            with self.torch.cuda.stream(self.model):
                for _ in range(2):
                    self.a @ self.a
                self.events[i].record()
            self.sync.mark_recorded(i)
        else:
            self.bench.rt.memcpy(
                self.bufs[1].tensor_addrs[0], self.bufs[0].tensor_addrs[0], self.nbytes, self.model
            )
            self.sync.record(i, self.model)

    def finish(self) -> None:
        """Wait until the model's stream has run every layer."""
        self.model.synchronize()

    def close(self) -> None:
        self.bench.free(*self.bufs)
        if self.torch is None:
            self.model.close()


def overlap(bench: Bench, run: Run) -> None:
    """A prefill of `layers` layers whose compute per layer takes about twice one layer's copy
    streams its cache layer by layer. The tail (last layer ready -> task done) is reported in
    units of one layer's copy measured in the same rounds (1.0: only the last layer was left).
    Layers are released by a Python synchronizer, or (event-gated) by a runtime event per layer
    recorded on the model's stream, which the transfer stream waits on."""
    s = bench.settings
    L = s.layers
    tpl = s.tensors_per_layer
    nt = L * tpl
    block = max(s.blocks)
    gated_kind = (
        "torch matmul, event-gated"
        if bench.torch and bench.rt.framework_device == "cuda"
        else "device copy, event-gated"
    )
    kinds = ["sleep", gated_kind, "torch matmul" if bench.torch else "numpy matmul"]
    if kernel_mode(bench):
        kinds.insert(2, gated_kind + ", DMA copies")
    bench.progress.plan(len(kinds) - 3)
    plan = bench.budget.fit_pool(f"overlap {size_name(block)}", Need(2 * nt * block, 0))
    run.note(plan.note)
    src = bench.blocks_cache(nt, plan.pool, block)
    dst = bench.blocks_cache(nt, plan.pool, block)
    try:
        bench.fill(src)
        bench.zero(dst)
        si, di = block_pairs(plan.pool, s.pairs, s.seed)
        kw = layer_kwargs(bench)
        allc = [TransferConfig(CLUSTER_ID, list(dst.tensor_addrs))]
        last = [
            TransferConfig(CLUSTER_ID, list(dst.tensor_addrs[(L - 1) * tpl :]), range(L - 1, L))
        ]
        go = Go()

        def one_layer() -> float:
            t0 = time.perf_counter()
            check(
                bench.cm.transfer_cache_async(src, go, last, si, di, **kw).synchronize(),
                "one-layer transfer",
            )
            return time.perf_counter() - t0

        for kind in kinds:
            label = f"overlap {kind}"
            bench.progress.step(label)
            for _ in range(3):
                one_layer()
            layer_s = statistics.median([one_layer() for _ in range(9)])
            gated = "event-gated" in kind
            dma = kind.endswith("DMA copies")
            if gated:
                step = DeviceWork(bench, L, 2 * tpl * s.pairs * block, kind.startswith("torch"))
            else:
                step = Compute(
                    kind.split()[-1],
                    2.0 * layer_s,
                    bench.torch if kind.startswith("torch") else None,
                )
            if dma:
                bench.rt.select_device_copy("dma")
            tails, after, prefill, layer_t = [], [], [], []
            try:
                for i in range(bench.settings.repeat + 1):
                    bench.progress.show(f"{label}: round {i + 1}/{bench.settings.repeat + 1}")
                    sync = step.sync if gated else LayerEvents(L)
                    if gated:
                        sync.reset()
                    t0 = time.perf_counter()
                    task = bench.cm.transfer_cache_async(src, sync, allc, si, di, **kw)
                    try:
                        for layer in range(L):
                            if gated:  # queued on the model's stream, then its event
                                step.layer(layer)
                            else:
                                step()
                                sync.events[layer].set()
                        if gated:
                            step.finish()
                    finally:
                        if not gated:
                            for ev in sync.events:
                                ev.set()
                    t_end = time.perf_counter()
                    check(task.synchronize(), "layer-wise transfer")
                    t_done = time.perf_counter()
                    if i:  # the first round warms up
                        tails.append(t_done - (t_end if gated else sync.returned[L - 1]))
                        after.append(t_done - t_end)
                        prefill.append(t_end - t0)
                        layer_t.append(one_layer())
            finally:
                if dma:
                    bench.rt.select_device_copy("kernel")
                if gated:
                    step.close()
            ok = verify_blocks(bench, src, dst, si, di, block, tensors=[0, nt - 1])
            times = {SUBJECT: tails, "one layer's copy": layer_t}
            res = local_result(
                "overlap",
                f"{kind}, {L} layers",
                block,
                0,
                times,
                {},
                ok,
                tail_in_layer_copies=statistics.median(tails) / statistics.median(layer_t),
                tail_after_prefill_end_s=statistics.median(after),
                prefill_s=statistics.median(prefill),
                compute_per_layer_vs_copy=statistics.median(prefill)
                / L
                / statistics.median(layer_t),
                layer_bytes=tpl * s.pairs * block,
            )
            res.extra["summary"] = (
                f"tail {res.extra['tail_in_layer_copies']:.2f} layer copies "
                f"(prefill {statistics.median(prefill) * 1e3:.1f} ms, compute "
                f"{res.extra['compute_per_layer_vs_copy']:.1f}x a layer's copy)"
            )
            run.results.append(res)
    finally:
        bench.free(src, dst)
