"""``python -m llmdist demo``: a simulated prefill that streams its KV cache layer by layer.

A toy model (numpy matmuls) computes one layer after the other and writes each layer's K and V
into a paged ("blocks") source cache, then marks the layer done (one ``threading.Event`` per
layer). A ``LayerSynchronizer`` waits on those events, so ``transfer_cache_async`` copies layer
``l`` into the destination blocks cache while layer ``l + 1`` is being computed. At the end the
demo checks every byte of the destination and compares the *tail* (end of prefill to end of
transfer) with the time to send the whole cache after prefill.

Modes: ``local`` (default; one process, destination = a cache owned by the same LLMDataDist,
local cluster id). A mode is a function ``run(args) -> exit code`` registered in ``MODES``; the
pieces below (layout, model, synchronizer, verification, report) are meant to be shared by the
modes that come later (e.g. a decode process receiving over a link).
"""

from __future__ import annotations

import argparse
import ctypes
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from . import (BlocksCacheKey, CacheDesc, DataType, LayerSynchronizer, LLMConfig, LLMDataDist,
               LLMRole, LLMStatusCode, Placement, TransferConfig)

CANARY = 0x5A

_DTYPES = {
    "float16": (np.float16, DataType.DT_FLOAT16),
    "float32": (np.float32, DataType.DT_FLOAT),
}


# ------------------------------------------------------------------------------------------
# Layout of the paged KV cache


@dataclass
class PagedLayout:
    """One prompt's K and V per layer, ``tokens x dim`` each, paged into blocks of
    ``block_size`` bytes (``tokens_per_block`` tokens). Each cache tensor (layer l: K = 2l,
    V = 2l + 1) holds a pool of ``pool_blocks`` blocks."""

    layers: int
    tokens: int
    dim: int
    dtype: np.dtype
    data_type: DataType
    block_size: int
    pool_blocks: int

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def tokens_per_block(self) -> int:
        return self.block_size // self.row_bytes

    @property
    def blocks_needed(self) -> int:
        return -(-self.tokens // self.tokens_per_block)

    @property
    def num_tensors(self) -> int:
        return 2 * self.layers

    @property
    def tensor_bytes(self) -> int:
        return self.pool_blocks * self.block_size

    @property
    def bytes_to_move(self) -> int:
        return self.num_tensors * self.blocks_needed * self.block_size

    def cache_desc(self) -> CacheDesc:
        elems = self.block_size // self.dtype.itemsize
        return CacheDesc(num_tensors=self.num_tensors, shape=[self.pool_blocks, elems],
                         data_type=self.data_type, placement=Placement.DEVICE)

    def check(self) -> Optional[str]:
        if self.layers < 1 or self.tokens < 1 or self.dim < 1:
            return "--layers, --tokens and --dim must be >= 1"
        if self.block_size % self.row_bytes:
            return (f"--block-size {self.block_size} must be a multiple of one token's row "
                    f"(dim {self.dim} x {self.dtype.itemsize} bytes = {self.row_bytes})")
        if self.pool_blocks < self.blocks_needed:
            return (f"--blocks {self.pool_blocks} is smaller than the {self.blocks_needed} blocks "
                    f"that {self.tokens} tokens need")
        return None


def tensor_views(addrs: List[int], nbytes: int, block_size: int) -> List[np.ndarray]:
    """uint8 views ``[blocks, block_size]`` of cache tensors at the given addresses."""
    return [np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(a))
            .reshape(-1, block_size) for a in addrs]


def aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


# ------------------------------------------------------------------------------------------
# The toy model


class ToyModel:
    """``layers`` layers of ``x -> (K = x Wk, V = x Wv, x = tanh(x Wo + x))`` on a
    ``tokens x dim`` float32 activation."""

    def __init__(self, layout: PagedLayout, seed: int):
        rng = np.random.default_rng(seed)
        d = layout.dim
        scale = np.float32(1.0 / np.sqrt(d))
        self.weights = [
            tuple(rng.standard_normal((d, d), dtype=np.float32) * scale for _ in range(3))
            for _ in range(layout.layers)]
        self.x0 = rng.standard_normal((layout.tokens, d), dtype=np.float32)

    def layers(self):
        """Yields (layer, K, V) one layer at a time."""
        x = self.x0
        for layer, (wk, wv, wo) in enumerate(self.weights):
            k = x @ wk
            v = x @ wv
            x = np.tanh(x @ wo + x)
            yield layer, k, v


def write_kv(views: List[np.ndarray], layout: PagedLayout, table: List[int], layer: int,
             k: np.ndarray, v: np.ndarray) -> None:
    """Page one layer's K and V (``tokens x dim`` each) into the blocks listed in ``table``."""
    tpb, dim, dt = layout.tokens_per_block, layout.dim, layout.dtype
    full, rem = divmod(layout.tokens, tpb)
    idx = np.asarray(table, dtype=np.intp)
    for t, data in ((2 * layer, k), (2 * layer + 1, v)):
        blocks = views[t].view(dt).reshape(layout.pool_blocks, -1, dim)
        if full:
            blocks[idx[:full], :tpb] = data[:full * tpb].reshape(full, tpb, dim)
        if rem:
            blocks[idx[full], :rem] = data[full * tpb:]


# ------------------------------------------------------------------------------------------
# Layer readiness


class LayerEvents(LayerSynchronizer):
    """One ``threading.Event`` per layer, set by the model when the layer's K and V are written."""

    def __init__(self, layers: int):
        self.events = [threading.Event() for _ in range(layers)]
        self.returned = [0.0] * layers
        self.cancelled = False

    def mark_done(self, layer: int) -> None:
        self.events[layer].set()

    def cancel(self) -> None:
        """The model failed: every waiting and future layer answers False (the task fails)."""
        self.cancelled = True
        for ev in self.events:
            ev.set()

    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        ok = self.events[layer_index].wait(
            None if timeout_in_millis is None else timeout_in_millis / 1000.0)
        self.returned[layer_index] = time.perf_counter()
        return ok and not self.cancelled


class AllReady(LayerSynchronizer):
    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        return True


# ------------------------------------------------------------------------------------------
# Verification


@dataclass
class Verdict:
    ok: bool
    bytes_checked: int
    moved_bytes: int
    untouched_bytes: int
    message: str


def verify(src_views: List[np.ndarray], src_table: List[int], dst_views: List[np.ndarray],
           dst_table: List[int], canary: int = CANARY) -> Verdict:
    """Every destination byte: blocks in ``dst_table`` equal their source blocks, all other
    destination blocks still hold the canary byte."""
    s = np.asarray(src_table, dtype=np.intp)
    d = np.asarray(dst_table, dtype=np.intp)
    pool = dst_views[0].shape[0]
    block = dst_views[0].shape[1]
    others = np.setdiff1d(np.arange(pool), d)
    moved = untouched = 0
    for t, (sv, dv) in enumerate(zip(src_views, dst_views)):
        got, want = dv[d], sv[s]
        if not np.array_equal(got, want):
            j = int(np.flatnonzero((got != want).any(axis=1))[0])
            off = int(np.flatnonzero(got[j] != want[j])[0])
            return Verdict(False, moved + untouched, moved, untouched,
                           f"tensor {t} (layer {t // 2} {'KV'[t % 2]}): destination block "
                           f"{d[j]} byte {off} is {got[j, off]:#04x}, source block {s[j]} has "
                           f"{want[j, off]:#04x}")
        moved += got.size
        rest = dv[others]
        if rest.size and not (rest == canary).all():
            j = int(np.flatnonzero((rest != canary).any(axis=1))[0])
            return Verdict(False, moved + untouched, moved, untouched,
                           f"tensor {t}: destination block {others[j]} was not in the transfer "
                           f"but changed")
        untouched += rest.size
    return Verdict(True, moved + untouched, moved, untouched,
                   f"{moved} bytes in {len(d) * len(dst_views)} blocks match the source; "
                   f"{untouched} other bytes untouched")


def check_model_pages(dst_views: List[np.ndarray], layout: PagedLayout, table: List[int],
                      layer: int, k: np.ndarray, v: np.ndarray) -> bool:
    """The destination, read back through the block table, holds the model's K and V."""
    tpb, dim, dt = layout.tokens_per_block, layout.dim, layout.dtype
    idx = np.asarray(table, dtype=np.intp)
    for t, data in ((2 * layer, k), (2 * layer + 1, v)):
        rows = dst_views[t].view(dt).reshape(layout.pool_blocks, -1, dim)[idx].reshape(-1, dim)
        if not np.array_equal(rows[:layout.tokens], data.astype(dt)):
            return False
    return True


# ------------------------------------------------------------------------------------------
# Report


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _fmt_t(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1.0 else f"{s:.3f} s"


@dataclass
class Timings:
    prefill_s: float          # first layer's compute starts .. last layer marked done
    tail_s: float             # last layer marked done .. layer-wise transfer complete
    last_sync_tail_s: float   # last synchronize_layer returned .. transfer complete
    streamed_total_s: float   # transfer_cache_async called .. layer-wise transfer complete
    full_s: float             # all layers ready: call .. complete (sending everything after prefill)
    call_s: float             # time for transfer_cache_async to return (layer-wise call)


def print_report(out, mode: str, layout: PagedLayout, tm: Timings, verdicts: List[Verdict],
                 model_ok: bool, statuses) -> bool:
    ok = all(v.ok for v in verdicts) and model_ok and all(
        s == LLMStatusCode.LLM_SUCCESS for s in statuses)
    moved = layout.bytes_to_move
    w = out.write
    w(f"llmdist demo, mode {mode}: simulated prefill streaming its KV cache layer by layer\n")
    w(f"  model      {layout.layers} layers, {layout.tokens} tokens x {layout.dim} dim, "
      f"KV {layout.dtype.name}\n")
    w(f"  KV cache   {layout.num_tensors} tensors x {layout.blocks_needed} blocks of "
      f"{_fmt_bytes(layout.block_size)} ({layout.tokens_per_block} tokens/block, pool "
      f"{layout.pool_blocks}); {_fmt_bytes(moved)} to move\n")
    w(f"  prefill    {_fmt_t(tm.prefill_s)} ({_fmt_t(tm.prefill_s / layout.layers)}/layer); "
      f"transfer_cache_async returned in {tm.call_s * 1e6:.0f} us (first call)\n")
    w(f"  tail       {_fmt_t(tm.tail_s)} from end of prefill to end of transfer "
      f"({_fmt_t(tm.last_sync_tail_s)} after the last layer was released)\n")
    w(f"  after      {_fmt_t(tm.full_s)} to send everything once prefill is done "
      f"({moved / tm.full_s / 1e9:.2f} GB/s)\n")
    hidden = 1.0 - tm.tail_s / tm.full_s if tm.full_s > 0 else 0.0
    w(f"  overlap    layer-wise streaming hides {hidden * 100:.1f}% of the transfer time "
      f"(tail = {tm.tail_s / tm.full_s:.2f}x the post-prefill transfer)\n")
    for name, v in zip(("streamed", "all-ready"), verdicts):
        w(f"  verify     {name}: {v.message}\n")
    if not model_ok:
        w("  verify     destination pages do not decode to the model's K/V\n")
    bad = [s for s in statuses if s != LLMStatusCode.LLM_SUCCESS]
    if bad:
        w(f"  transfer   failed: {bad}\n")
    w("PASS\n" if ok else "FAIL\n")
    return ok


# ------------------------------------------------------------------------------------------
# Modes


def layout_from_args(args) -> PagedLayout:
    dtype, data_type = _DTYPES[args.dtype]
    dtype = np.dtype(dtype)
    layout = PagedLayout(args.layers, args.tokens, args.dim, dtype, data_type, args.block_size, 0)
    if layout.block_size % layout.row_bytes or layout.block_size < layout.row_bytes:
        return layout  # check() explains
    layout.pool_blocks = args.blocks if args.blocks else 2 * layout.blocks_needed
    return layout


def run_local(args, out=sys.stdout) -> int:
    """One process: the source cache is numpy memory registered with LLMDataDist (like a
    framework's tensors), the destination a cache LLMDataDist allocates, on its own cluster."""
    layout = layout_from_args(args)
    problem = layout.check()
    if problem:
        out.write(f"error: {problem}\n")
        return 2

    rng = random.Random(args.seed)
    src_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    dst_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    model = ToyModel(layout, args.seed)

    cid = args.cluster_id
    dd = LLMDataDist(LLMRole.PROMPT, cid)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    dd.init(cfg.generate_options())
    try:
        cm = dd.cache_manager
        desc = layout.cache_desc()

        src_mem = aligned_empty(layout.num_tensors * layout.tensor_bytes)
        src_mem.fill(0)
        src_views = list(src_mem.reshape(layout.num_tensors, layout.pool_blocks, layout.block_size))
        src_cache = cm.register_blocks_cache(desc, [int(v.ctypes.data) for v in src_views],
                                             BlocksCacheKey(cid, 0))
        dst_cache = cm.allocate_blocks_cache(desc, BlocksCacheKey(cid, 1))
        dst_views = tensor_views(dst_cache.tensor_addrs, layout.tensor_bytes, layout.block_size)
        for v in dst_views:
            v.fill(CANARY)
        configs = [TransferConfig(cid, list(dst_cache.tensor_addrs))]

        # 1. prefill, streaming each layer as soon as it is written
        sync = LayerEvents(layout.layers)
        t_call = time.perf_counter()
        task = cm.transfer_cache_async(src_cache, sync, configs, src_table, dst_table)
        t0 = time.perf_counter()
        kv_first = kv_last = None
        try:
            for layer, k, v in model.layers():
                write_kv(src_views, layout, src_table, layer, k, v)
                sync.mark_done(layer)
                if layer == 0:
                    kv_first = (k, v)
                kv_last = (k, v)
        except BaseException:
            sync.cancel()
            task.synchronize()
            raise
        t_prefill_end = time.perf_counter()
        status_streamed = task.synchronize()
        t_done = time.perf_counter()
        results = task.get_results()
        verdict_streamed = verify(src_views, src_table, dst_views, dst_table)
        model_ok = (check_model_pages(dst_views, layout, dst_table, 0, *kv_first)
                    and check_model_pages(dst_views, layout, dst_table, layout.layers - 1, *kv_last))

        # 2. the same transfer with every layer ready: the cost of sending after prefill
        for v in dst_views:
            v.fill(CANARY)
        t1 = time.perf_counter()
        status_full = cm.transfer_cache_async(src_cache, AllReady(), configs, src_table,
                                              dst_table).synchronize()
        full_s = time.perf_counter() - t1
        verdict_full = verify(src_views, src_table, dst_views, dst_table)

        tm = Timings(prefill_s=t_prefill_end - t0, tail_s=t_done - t_prefill_end,
                     last_sync_tail_s=t_done - sync.returned[-1],
                     streamed_total_s=t_done - t_call, full_s=full_s, call_s=t0 - t_call)
        ok = print_report(out, "local", layout, tm, [verdict_streamed, verdict_full], model_ok,
                          [status_streamed, status_full] + [r for r in results if r is not None])

        del dst_views
        cm.deallocate_blocks_cache(dst_cache)
        cm.unregister_cache(src_cache.cache_id)
        return 0 if ok else 1
    finally:
        dd.finalize()


MODES: Dict[str, Callable] = {
    "local": run_local,
}
DEFAULT_MODE = "local"


# ------------------------------------------------------------------------------------------
# Command line


def _size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=sorted(MODES), default=DEFAULT_MODE,
                   help="where the destination lives (default: %(default)s)")
    p.add_argument("--layers", type=int, default=32, help="model layers (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default: %(default)s)")
    p.add_argument("--dim", type=int, default=512,
                   help="K/V width per token, elements (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float16",
                   help="KV cache element type (default: %(default)s)")
    p.add_argument("--block-size", type=_size, default=16 << 10, metavar="BYTES",
                   help="bytes per cache block, e.g. 16384 or 16K (default: 16K)")
    p.add_argument("--blocks", type=int, default=0, metavar="N",
                   help="blocks in each cache tensor's pool (default: twice what the prompt needs)")
    p.add_argument("--cluster-id", type=int, default=1,
                   help="local cluster id (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def main(args, out=sys.stdout) -> int:
    return MODES[args.mode](args, out=out)
