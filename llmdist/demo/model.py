"""The demo's simulated prefill: the paged KV cache layout, a toy model that writes each
layer's K and V into the cache's blocks, and the layer synchronizers that release the layers to
the transfer."""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

import numpy as np

from .. import CacheDesc, DataType, LayerSynchronizer, Placement

DTYPES = {
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
        return CacheDesc(
            num_tensors=self.num_tensors,
            shape=[self.pool_blocks, elems],
            data_type=self.data_type,
            placement=Placement.DEVICE,
        )

    def check(self) -> str | None:
        if self.layers < 1 or self.tokens < 1 or self.dim < 1:
            return "--layers, --tokens and --dim must be >= 1"
        if self.block_size % self.row_bytes:
            return (
                f"--block-size {self.block_size} must be a multiple of one token's row "
                f"(dim {self.dim} x {self.dtype.itemsize} bytes = {self.row_bytes})"
            )
        if self.pool_blocks < self.blocks_needed:
            return (
                f"--blocks {self.pool_blocks} is smaller than the {self.blocks_needed} blocks "
                f"that {self.tokens} tokens need"
            )
        return None


def tensor_views(addrs: list[int], nbytes: int, block_size: int) -> list[np.ndarray]:
    """uint8 views ``[blocks, block_size]`` of cache tensors at the given addresses."""
    return [
        np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(a)).reshape(-1, block_size)
        for a in addrs
    ]


def aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes]


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
            for _ in range(layout.layers)
        ]
        self.x0 = rng.standard_normal((layout.tokens, d), dtype=np.float32)

    def layers(self):
        """Yields (layer, K, V) one layer at a time."""
        x = self.x0
        for layer, (wk, wv, wo) in enumerate(self.weights):
            k = x @ wk
            v = x @ wv
            x = np.tanh(x @ wo + x)
            yield layer, k, v


def write_kv(
    views: list[np.ndarray],
    layout: PagedLayout,
    table: list[int],
    layer: int,
    k: np.ndarray,
    v: np.ndarray,
) -> None:
    """Page one layer's K and V (``tokens x dim`` each) into the blocks listed in ``table``."""
    tpb, dim, dt = layout.tokens_per_block, layout.dim, layout.dtype
    full, rem = divmod(layout.tokens, tpb)
    idx = np.asarray(table, dtype=np.intp)
    for t, data in ((2 * layer, k), (2 * layer + 1, v)):
        blocks = views[t].view(dt).reshape(layout.pool_blocks, -1, dim)
        if full:
            blocks[idx[:full], :tpb] = data[: full * tpb].reshape(full, tpb, dim)
        if rem:
            blocks[idx[full], :rem] = data[full * tpb :]


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

    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        ok = self.events[layer_index].wait(
            None if timeout_in_millis is None else timeout_in_millis / 1000.0
        )
        self.returned[layer_index] = time.perf_counter()
        return ok and not self.cancelled


class AllReady(LayerSynchronizer):
    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        return True


def layout_from_args(args) -> PagedLayout:
    dtype, data_type = DTYPES[args.dtype]
    dtype = np.dtype(dtype)
    layout = PagedLayout(args.layers, args.tokens, args.dim, dtype, data_type, args.block_size, 0)
    if layout.block_size % layout.row_bytes or layout.block_size < layout.row_bytes:
        return layout  # check() explains
    layout.pool_blocks = args.blocks if args.blocks else 2 * layout.blocks_needed
    return layout


def stream_prefill(cm, model, layout, src_cache, src_views, configs, src_table, dst_table, wait_ms):
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
