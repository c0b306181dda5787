"""``python -m llmdist demo``: a simulated prefill that streams its KV cache layer by layer.

A toy model (numpy matmuls) computes one layer after the other and writes each layer's K and V
into a paged ("blocks") source cache, then marks the layer done (one ``threading.Event`` per
layer). A ``LayerSynchronizer`` waits on those events, so ``transfer_cache_async`` copies layer
``l`` into the destination blocks cache while layer ``l + 1`` is being computed. At the end every
byte of the destination is checked, and the *tail* (end of prefill to end of transfer) is compared
with the time to send the whole cache after prefill.

Modes (a mode is a function ``run(args, out) -> exit code`` registered in ``MODES``):

- ``two-process`` (default): a decode cluster runs in a child process (multiprocessing, spawn)
  that listens on 127.0.0.1 and allocates the destination blocks cache; the prefill (this
  process) links to it and streams into that cache by key (``TransferWithCacheKeyConfig``).
  The decode side verifies every byte: the prefill sends it the block mapping and a BLAKE2b
  digest per moved block (16 bytes per block, not the data); every other block must still hold
  the canary byte. ``--transport`` picks the data path: ``direct`` (same host: copies into the
  decode's shared memory), ``mooncake`` (Mooncake Transfer Engine over loopback TCP) or
  ``auto`` (what llmdist picks: direct on one host).
- ``local``: one process, destination = a cache owned by the same LLMDataDist (local cluster
  id); the prefill checks the bytes itself.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from . import (BlocksCacheKey, CacheDesc, DataType, LayerSynchronizer, LLMClusterInfo, LLMConfig,
               LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement, TransferConfig,
               TransferWithCacheKeyConfig)

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


DIGEST_BYTES = 16


def block_digests(views: List[np.ndarray], table: List[int], threads: int = 2) -> List[bytes]:
    """Per tensor, the BLAKE2b digests (``DIGEST_BYTES`` each, concatenated in table order) of
    the blocks listed in ``table``. hashlib drops the GIL on large buffers, so tensors are hashed
    on ``threads`` threads."""
    idx = [int(b) for b in table]

    def one(view: np.ndarray) -> bytes:
        return b"".join(hashlib.blake2b(view[b], digest_size=DIGEST_BYTES).digest() for b in idx)

    if threads <= 1 or len(views) < 2:
        return [one(v) for v in views]
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(one, views))


def verify_digests(dst_views: List[np.ndarray], src_table: List[int], dst_table: List[int],
                   digests: List[bytes], canary: int = CANARY) -> Verdict:
    """What the decode process checks, knowing only the block mapping and the source digests:
    every block in ``dst_table`` hashes to its source block's digest, every other destination
    block still holds the canary byte."""
    if len(digests) != len(dst_views) or any(len(g) != DIGEST_BYTES * len(dst_table)
                                              for g in digests):
        return Verdict(False, 0, 0, 0, f"expected {len(dst_views)} tensors x {len(dst_table)} "
                       f"digests, got {len(digests)} tensors")
    got = block_digests(dst_views, dst_table)
    d = np.asarray(dst_table, dtype=np.intp)
    pool, block = dst_views[0].shape
    others = np.setdiff1d(np.arange(pool), d)
    moved = untouched = 0
    for t, (g, want) in enumerate(zip(got, digests)):
        if g != want:
            j = next(j for j in range(len(d))
                     if g[j * DIGEST_BYTES:(j + 1) * DIGEST_BYTES]
                     != want[j * DIGEST_BYTES:(j + 1) * DIGEST_BYTES])
            return Verdict(False, moved + untouched, moved, untouched,
                           f"tensor {t} (layer {t // 2} {'KV'[t % 2]}): destination block {d[j]} "
                           f"does not match source block {src_table[j]} (BLAKE2b digests differ)")
        moved += len(d) * block
        rest = dst_views[t][others]
        if rest.size and not (rest == canary).all():
            j = int(np.flatnonzero((rest != canary).any(axis=1))[0])
            return Verdict(False, moved + untouched, moved, untouched,
                           f"tensor {t}: destination block {others[j]} was not in the transfer "
                           f"but changed")
        untouched += rest.size
    return Verdict(True, moved + untouched, moved, untouched,
                   f"{moved} bytes in {len(d) * len(dst_views)} blocks match the source's "
                   f"digests; {untouched} other bytes untouched")


def check_model_pages(dst_views: List[np.ndarray], layout: PagedLayout, table: List[int],
                      layer: int, k: np.ndarray, v: np.ndarray) -> bool:
    """The destination, read back through the block table, holds the model's K and V."""
    dim, dt = layout.dim, layout.dtype
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
                 model_ok: bool, statuses, extra: List[str] = (), checker: str = "") -> bool:
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
    for line in extra:
        w(f"  {line}\n")
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
        w(f"  verify     {name}{checker}: {v.message}\n")
    if not model_ok:
        w("  verify     the pages do not decode to the model's K/V\n")
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


def stream_prefill(cm, model, layout, src_cache, src_views, configs, src_table, dst_table,
                   wait_ms):
    """Start the layer-wise transfer, then run the model: each layer's K and V are written into
    the source blocks and the layer is released to the transfer at once. Returns the
    synchronizer, the task, the times of the call, of its return and of the end of prefill, and
    the first and last layer's K/V (for checking pages)."""
    sync = LayerEvents(layout.layers)
    t_call = time.perf_counter()
    task = cm.transfer_cache_async(src_cache, sync, configs, src_table, dst_table)
    t_start = time.perf_counter()
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
        task.synchronize(wait_ms)
        raise
    return sync, task, t_call, t_start, time.perf_counter(), kv_first, kv_last


def run_local(args, out=sys.stdout) -> int:
    """One process: the source cache is numpy memory registered with LLMDataDist (like a
    framework's tensors), the destination a cache LLMDataDist allocates, on its own cluster."""
    if args.transport != "auto":
        out.write("error: --transport applies to --mode two-process (a local transfer copies "
                  "inside this process)\n")
        return 2
    if args.auth_key:
        out.write("error: --auth-key applies to --mode two-process (a local transfer makes no "
                  "link)\n")
        return 2
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
    cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
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
        sync, task, t_call, t0, t_prefill_end, kv_first, kv_last = stream_prefill(
            cm, model, layout, src_cache, src_views, configs, src_table, dst_table, None)
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


# ------------------------------------------------------------------------------------------
# Mode two-process: the decode cluster in a child process


HOST = "127.0.0.1"
LINK_MS = 5000           # link_clusters / unlink_clusters timeout
READY_S = 60.0           # the child's start-up (spawn: a fresh interpreter imports numpy, llmdist)
REPLY_S = 60.0           # any other answer from the child (verification hashes 2 x the cache)
TASK_MS = 60_000         # bound on waiting for a transfer
CHILD_IDLE_S = 120.0     # the child gives up on a silent parent after this long
TRANSPORTS = ("auto", "direct", "mooncake")


class DemoError(Exception):
    """The demo cannot go on (the decode process failed, did not answer, or a link failed)."""


def _decode_main(conn, spec: dict) -> None:
    """Child process: a DECODER cluster listening on ``spec["host"]`` (port picked by the OS)
    that allocates the destination blocks cache under ``BlocksCacheKey(cluster_id, 0)``, fills
    it with the canary byte and serves the parent's commands over ``conn``:

        ("verify", src_table, dst_table, digests) -> ("ok", Verdict fields as a dict)
        ("reset",)                                -> ("ok", None)  (canary again)
        ("exit", prefill_cluster_id)              -> ("ok", None), then unlink, finalize, exit

    Start-up failures and failed commands answer ("err", traceback). Without a command for
    ``spec["idle_s"]`` seconds, or when the parent's end closes, it finalizes and exits."""
    cluster_id = spec["cluster_id"]
    dd = LLMDataDist(LLMRole.DECODER, cluster_id)
    views: List[np.ndarray] = []
    try:
        try:
            cfg = LLMConfig()
            cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
            cfg.enable_cache_manager = True
            cfg.enable_remote_cache_accessible = True
            cfg.listen_ip_info = f"{spec['host']}:0"
            options = cfg.generate_options()
            if spec.get("auth_key"):
                options["llmdist.auth_key"] = spec["auth_key"]
            dd.init(options)
            dtype, data_type = _DTYPES[spec["dtype"]]
            elems = spec["block_size"] // np.dtype(dtype).itemsize
            desc = CacheDesc(num_tensors=spec["num_tensors"], shape=[spec["pool_blocks"], elems],
                             data_type=data_type, placement=Placement.DEVICE)
            cache = dd.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(cluster_id, 0))
            views = tensor_views(cache.tensor_addrs, spec["pool_blocks"] * spec["block_size"],
                                 spec["block_size"])
            for v in views:
                v.fill(spec["canary"])
        except BaseException:
            conn.send(("err", traceback.format_exc()))
            return
        conn.send(("ready", dd.listen_port, os.getpid()))
        while True:
            try:
                if not conn.poll(spec["idle_s"]):
                    break
                cmd, *params = conn.recv()
            except (EOFError, OSError):
                break
            try:
                result = None
                if cmd == "verify":
                    src_table, dst_table, digests = params
                    result = verify_digests(views, src_table, dst_table, digests,
                                            spec["canary"]).__dict__
                elif cmd == "reset":
                    for v in views:
                        v.fill(spec["canary"])
                elif cmd == "exit":
                    info = LLMClusterInfo()
                    info.remote_cluster_id = params[0]
                    dd.unlink_clusters([info], LINK_MS, force=True)
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                reply = ("ok", result)
            except Exception:
                reply = ("err", traceback.format_exc())
            try:
                conn.send(reply)
            except (EOFError, OSError):
                break
            if cmd == "exit":
                break
    finally:
        views.clear()   # no view may outlive the shared memory finalize frees
        dd.finalize()


class DecodeChild:
    """The parent's handle on the decode process: bounded waits, clean exit, kill on failure."""

    def __init__(self, spec: dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_decode_main, args=(child, spec),
                                name="llmdist-demo-decode", daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        self.port: Optional[int] = None

    def _recv(self, timeout: float, what: str):
        try:
            ready = self.conn.poll(timeout)
            msg = self.conn.recv() if ready else None
        except (EOFError, OSError):
            self.proc.join(1)
            raise DemoError(f"the decode process (pid {self.pid}) ended (exit code "
                            f"{self.proc.exitcode}) before answering {what}") from None
        if msg is None:
            raise DemoError(f"the decode process (pid {self.pid}) did not answer {what} "
                            f"within {timeout:.0f} s")
        if msg[0] == "err":
            raise DemoError(f"the decode process failed at {what}:\n{msg[1]}")
        return msg

    def wait_ready(self, timeout: float = READY_S) -> int:
        _, self.port, self.pid = self._recv(timeout, "start-up")
        return self.port

    def call(self, cmd: str, *params, timeout: float = REPLY_S):
        try:
            self.conn.send((cmd, *params))
        except (EOFError, OSError) as exc:
            raise DemoError(f"the decode process (pid {self.pid}) is gone: {exc}") from None
        return self._recv(timeout, repr(cmd))[1]

    def close(self, prefill_id: Optional[int], graceful: bool = True) -> None:
        """Ask the child to unlink and finalize (bounded), then reap it; kill it if it does
        not end in time (or at once without ``graceful``). Its shared memory is a memfd,
        which goes with the last process holding it."""
        try:
            if graceful and self.proc.is_alive():
                try:
                    self.call("exit", prefill_id, timeout=LINK_MS / 1000.0 + 5.0)
                except DemoError:
                    pass
                self.proc.join(10.0)
        finally:
            killed = self.proc.is_alive()
            if killed:
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.join(10.0)
            self.conn.close()


def _path_description(dd: LLMDataDist, decode_id: int) -> str:
    """The data path llmdist picked for the decode (read from the link; informational)."""
    info = dd.peer_info(decode_id)
    path = info["path"] if info else None
    if path == "direct":
        return ("direct (same host): copies straight into the decode's shared memory (a sealed "
                "memfd it passed over a Unix socket), mapped here")
    if path == "mooncake":
        return ("Mooncake Transfer Engine, TCP over 127.0.0.1, one batched write per layer")
    return str(path)


def run_two_process(args, out=sys.stdout) -> int:
    """The prefill in this process, the decode in a child process on 127.0.0.1: link, stream
    the KV cache by key into the decode's allocated blocks cache, let the decode verify."""
    layout = layout_from_args(args)
    problem = layout.check()
    if problem:
        out.write(f"error: {problem}\n")
        return 2

    rng = random.Random(args.seed)
    src_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    dst_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    model = ToyModel(layout, args.seed)

    prefill_id, decode_id = args.cluster_id, args.cluster_id + 1
    notes = []
    spec = dict(cluster_id=decode_id, host=HOST, dtype=args.dtype,
                num_tensors=layout.num_tensors, pool_blocks=layout.pool_blocks,
                block_size=layout.block_size, canary=CANARY, idle_s=CHILD_IDLE_S,
                auth_key=args.auth_key)
    t_spawn = time.perf_counter()
    decode = DecodeChild(spec)
    dd: Optional[LLMDataDist] = None
    graceful = False
    progress: List[str] = []     # what is known when something fails
    try:
        port = decode.wait_ready()
        ready_s = time.perf_counter() - t_spawn

        dd = LLMDataDist(LLMRole.PROMPT, prefill_id)
        cfg = LLMConfig()
        cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
        cfg.enable_cache_manager = True
        cfg.enable_remote_cache_accessible = True
        options = cfg.generate_options()
        options["llmdist.transport"] = args.transport
        if args.auth_key:
            options["llmdist.auth_key"] = args.auth_key
        dd.init(options)
        cm = dd.cache_manager

        info = LLMClusterInfo()
        info.remote_cluster_id = decode_id
        info.append_remote_ip_info(HOST, port)
        t_link = time.perf_counter()
        status, _ = dd.link_clusters([info], LINK_MS)
        link_s = time.perf_counter() - t_link
        if status != LLMStatusCode.LLM_SUCCESS:
            raise DemoError(f"link_clusters to cluster {decode_id} at {HOST}:{port} returned "
                            f"{status.name}")
        path = _path_description(dd, decode_id)

        src_mem = aligned_empty(layout.num_tensors * layout.tensor_bytes)
        src_mem.fill(0)
        src_views = list(src_mem.reshape(layout.num_tensors, layout.pool_blocks,
                                         layout.block_size))
        src_cache = cm.register_blocks_cache(layout.cache_desc(),
                                             [int(v.ctypes.data) for v in src_views],
                                             BlocksCacheKey(prefill_id, 0))
        configs = [TransferWithCacheKeyConfig(BlocksCacheKey(decode_id, 0), range(layout.layers),
                                              range(layout.layers))]

        # 1. prefill, streaming each layer into the decode as soon as it is written
        sync, task, t_call, t_start, t_prefill_end, kv_first, kv_last = stream_prefill(
            cm, model, layout, src_cache, src_views, configs, src_table, dst_table, TASK_MS)
        status_streamed = task.synchronize(TASK_MS)
        t_done = time.perf_counter()
        results = task.get_results(TASK_MS)
        progress.append(f"the streamed transfer ended {status_streamed.name}")
        # The source pages must hold the model's K/V; the decode checks its pages against them.
        model_ok = (check_model_pages(src_views, layout, src_table, 0, *kv_first)
                    and check_model_pages(src_views, layout, src_table, layout.layers - 1,
                                          *kv_last))
        digests = block_digests(src_views, src_table)
        t_verify = time.perf_counter()
        verdict_streamed = Verdict(**decode.call("verify", src_table, dst_table, digests))
        verify_s = time.perf_counter() - t_verify

        # 2. the same transfer with every layer ready: the cost of sending after prefill
        decode.call("reset")
        t_full = time.perf_counter()
        status_full = cm.transfer_cache_async(src_cache, AllReady(), configs, src_table,
                                              dst_table).synchronize(TASK_MS)
        full_s = time.perf_counter() - t_full
        progress.append(f"the all-ready transfer ended {status_full.name}")
        verdict_full = Verdict(**decode.call("verify", src_table, dst_table, digests))

        unlink_status, _ = dd.unlink_clusters([info], LINK_MS, force=True)
        cm.unregister_cache(src_cache.cache_id)
        graceful = True

        tm = Timings(prefill_s=t_prefill_end - t_start, tail_s=t_done - t_prefill_end,
                     last_sync_tail_s=t_done - sync.returned[-1],
                     streamed_total_s=t_done - t_call, full_s=full_s, call_s=t_start - t_call)
        extra = [
            f"clusters   prefill {prefill_id} (this process, pid {os.getpid()}) -> decode "
            f"{decode_id} (pid {decode.pid}, listening on {HOST}:{port}); decode ready in "
            f"{_fmt_t(ready_s)}, linked in {_fmt_t(link_s)}",
            f"path       --transport {args.transport}: {path}",
            f"auth       {'shared key: both sides proved it, every control frame is MACed' if args.auth_key else 'no key: same-host identity from the kernel (SO_PEERCRED)'}",
            f"digests    {len(src_table) * layout.num_tensors} BLAKE2b-{8 * DIGEST_BYTES} block "
            f"digests ({_fmt_bytes(len(src_table) * layout.num_tensors * DIGEST_BYTES)}) sent to "
            f"the decode; it checked the streamed cache in {_fmt_t(verify_s)}",
        ]
        if unlink_status != LLMStatusCode.LLM_SUCCESS:
            notes.append(f"unlink_clusters returned {unlink_status.name}")
        extra += [f"note       {n}" for n in notes]
        statuses = [status_streamed, status_full] + [r for r in results if r is not None]
        ok = print_report(out, "two-process", layout, tm, [verdict_streamed, verdict_full],
                          model_ok, statuses, extra=extra, checker=" (checked by the decode)")
        return 0 if ok else 1
    except (DemoError, LLMException) as exc:
        out.write(f"error: {exc}\n" + "".join(f"  ({p})\n" for p in progress) + "FAIL\n")
        return 1
    finally:
        if not graceful:        # a failure: end the child first, so that nothing waits on it
            decode.close(prefill_id, graceful=False)
        try:
            if dd is not None:
                dd.finalize()
        finally:
            decode.close(prefill_id, graceful=graceful)


MODES: Dict[str, Callable] = {
    "two-process": run_two_process,
    "local": run_local,
}
DEFAULT_MODE = "two-process"


# ------------------------------------------------------------------------------------------
# Command line


def _size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=sorted(MODES), default=DEFAULT_MODE,
                   help="where the destination lives: two-process (a decode cluster in a child "
                        "process on 127.0.0.1) or local (this process) (default: %(default)s)")
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
    p.add_argument("--transport", choices=TRANSPORTS, default="auto",
                   help="data path to the decode process (two-process mode): direct (same-host "
                        "shared memory), mooncake (Mooncake Transfer Engine over loopback TCP) "
                        "or auto, llmdist's choice (default: %(default)s)")
    p.add_argument("--cluster-id", type=int, default=1,
                   help="the prefill's cluster id; the decode process is this + 1 "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--auth-key", default=None, metavar="KEY",
                   help="shared key both clusters authenticate their link with "
                        "(llmdist.auth_key; two-process mode; default: none)")


def main(args, out=sys.stdout) -> int:
    return MODES[args.mode](args, out=out)
