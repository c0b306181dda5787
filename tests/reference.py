"""A numpy reference model of ``transfer_cache_async`` (spec/API.md section 5.2).

Written straight from the spec, independently of llmdist: it never imports the library.

Memory is modelled as named byte buffers (``numpy.uint8`` arrays).  A destination tensor is
named by a pair ``(buffer_key, byte_offset)``: the tensor starts ``byte_offset`` bytes into
``dst_mem[buffer_key]``.  The model returns the bytes every destination buffer must hold after
the transfer, and a mask of the bytes the transfer writes; every other byte (canaries, guard
bytes around the registered regions, bytes of rows/blocks not addressed) keeps its initial value.

Kinds (per config, per covered source layer ``l``, for its two tensors ``2l`` (K) and ``2l+1`` (V);
``stride`` = the source's row size, or block size for a blocks cache):

* **C2C** (no block indices): ``stride`` bytes from ``src + src_batch_index*stride`` to ``dst``.
* **C2B** (only ``dst_block_indices``, ``B = dst_block_memory_size > 0``): the source row
  ``src + src_batch_index*stride`` is cut into consecutive chunks of ``B`` bytes (the row's last
  chunk may be shorter); chunk ``j`` goes to ``dst + dst_block_indices[j]*B``.
* **B2B** (both index lists): block ``src_block_indices[j]`` (``stride`` bytes at
  ``src + s*stride``) goes to ``dst + dst_block_indices[j]*block_size`` with
  ``block_size = dst_block_memory_size or stride``.

Configs: a ``TransferConfig`` sends source layer ``start + j`` of its ``src_layer_range`` (all
layers when None) to ``dst_addrs[2j]``/``dst_addrs[2j+1]``.  A ``TransferWithCacheKeyConfig``
sends source layer ``l`` to destination layer ``dst_layer_range[l - src_layer_range.start]`` of
the keyed cache, i.e. its tensors ``2*dst_layer``/``2*dst_layer+1``, plus
``key.batch_index * remote_stride`` for a ``CacheKeyByIdAndIndex``; :func:`keyed_dst` builds that
list of destination tensors.

Layers are applied in ascending order and, within a layer, configs in list order.  Tests must not
make two copies write the same destination byte (the order between concurrent copies of one layer
is not part of the contract); :func:`expected_transfer` asserts that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

C2C = "C2C"
C2B = "C2B"
B2B = "B2B"

DstTensor = Tuple[Hashable, int]  # (buffer key, byte offset of the tensor's start in that buffer)


@dataclass
class RefConfig:
    """One transfer config, as the reference model sees it.

    ``dst``: one destination tensor per transferred source tensor, in order: for the j-th layer
    of the range, ``dst[2j]`` receives K and ``dst[2j+1]`` receives V.
    ``src_layer_range``: None = every layer of the source.
    """

    dst: Sequence[DstTensor]
    src_layer_range: Optional[range] = None
    src_batch_index: int = 0


def kind_of(
    src_block_indices: Optional[Sequence[int]], dst_block_indices: Optional[Sequence[int]]
) -> str:
    """The transfer kind the block index lists select (spec 5.2)."""
    if src_block_indices is None and dst_block_indices is None:
        return C2C
    if src_block_indices is None:
        return C2B
    assert dst_block_indices is not None, "PA source to non-PA destination is not a transfer"
    return B2B


def keyed_dst(
    dst_tensors: Sequence[DstTensor],
    src_layer_range: range,
    dst_layer_range: range,
    batch_offset: int = 0,
) -> List[DstTensor]:
    """Destination tensors of a TransferWithCacheKeyConfig.

    ``dst_tensors``: the keyed destination cache's tensors (2 per layer, K then V).
    ``batch_offset``: ``key.batch_index * remote_stride`` for a CacheKeyByIdAndIndex, else 0.
    Source layer ``l`` goes to destination layer ``dst_layer_range[l - src_layer_range.start]``.
    """
    assert len(src_layer_range) == len(dst_layer_range)
    out: List[DstTensor] = []
    for j in range(len(src_layer_range)):
        d = dst_layer_range[j]
        for t in (0, 1):
            key, off = dst_tensors[2 * d + t]
            out.append((key, off + batch_offset))
    return out


def copies_for_tensor(
    kind: str,
    stride: int,
    src_batch_index: int,
    src_block_indices: Optional[Sequence[int]],
    dst_block_indices: Optional[Sequence[int]],
    dst_block_memory_size: Optional[int],
) -> List[Tuple[int, int, int]]:
    """The (src_offset, dst_offset, nbytes) copies of one tensor, offsets from the tensor starts."""
    if kind == C2C:
        return [(src_batch_index * stride, 0, stride)]
    if kind == C2B:
        b = dst_block_memory_size
        assert b is not None and b > 0
        assert len(dst_block_indices) <= math.ceil(stride / b)
        row = src_batch_index * stride
        out = []
        for j, d in enumerate(dst_block_indices):
            n = min(b, stride - j * b)
            assert n > 0
            out.append((row + j * b, d * b, n))
        return out
    assert kind == B2B
    assert src_batch_index == 0
    assert len(src_block_indices) == len(dst_block_indices)
    block_size = dst_block_memory_size or stride
    return [
        (s * stride, d * block_size, stride) for s, d in zip(src_block_indices, dst_block_indices)
    ]


def expected_transfer(
    src: Sequence[np.ndarray],
    src_stride: int,
    dst_mem: Mapping[Hashable, np.ndarray],
    configs: Sequence[RefConfig],
    src_block_indices: Optional[Sequence[int]] = None,
    dst_block_indices: Optional[Sequence[int]] = None,
    dst_block_memory_size: Optional[int] = None,
    layers_done: Optional[int] = None,
) -> Tuple[Dict[Hashable, np.ndarray], Dict[Hashable, np.ndarray]]:
    """Expected destination bytes after a successful transfer.

    ``src``: the source cache's tensors as flat uint8 arrays (their bytes before the transfer).
    ``src_stride``: source row size (block size for a blocks cache) in bytes.
    ``dst_mem``: the destination buffers' initial bytes (not modified).
    ``layers_done``: when given, only source layers ``< layers_done`` are applied (the expected
    state of a transfer stopped before layer ``layers_done``).
    Returns ``(expected, written)``: new arrays per buffer key, and boolean masks of written bytes.
    """
    src = [np.asarray(s, dtype=np.uint8).reshape(-1) for s in src]
    assert len(src) % 2 == 0
    num_layers = len(src) // 2
    kind = kind_of(src_block_indices, dst_block_indices)
    out = {k: np.array(v, dtype=np.uint8, copy=True).reshape(-1) for k, v in dst_mem.items()}
    written = {k: np.zeros(v.size, dtype=bool) for k, v in out.items()}
    for layer in range(num_layers):
        if layers_done is not None and layer >= layers_done:
            break
        for cfg in configs:
            rng = cfg.src_layer_range if cfg.src_layer_range is not None else range(num_layers)
            if layer not in rng:
                continue
            j = layer - rng.start
            assert len(cfg.dst) == 2 * len(rng)
            for t in (0, 1):
                s = src[2 * layer + t]
                key, base = cfg.dst[2 * j + t]
                for so, do, n in copies_for_tensor(
                    kind,
                    src_stride,
                    cfg.src_batch_index,
                    src_block_indices,
                    dst_block_indices,
                    dst_block_memory_size,
                ):
                    assert 0 <= so and so + n <= s.size, "source range outside the source tensor"
                    lo, hi = base + do, base + do + n
                    assert 0 <= lo and hi <= out[key].size, "destination outside its buffer"
                    assert not written[key][lo:hi].any(), (
                        "two copies write the same destination byte: order is not specified"
                    )
                    out[key][lo:hi] = s[so : so + n]
                    written[key][lo:hi] = True
    return out, written


def element_size(dtype_name: str) -> int:
    """Bytes per element of a DataType, by name (spec section 2, the usual sizes)."""
    return {
        "DT_FLOAT": 4,
        "DT_FLOAT16": 2,
        "DT_INT8": 1,
        "DT_INT32": 4,
        "DT_UINT8": 1,
        "DT_INT16": 2,
        "DT_UINT16": 2,
        "DT_UINT32": 4,
        "DT_INT64": 8,
        "DT_UINT64": 8,
        "DT_DOUBLE": 8,
        "DT_BOOL": 1,
        "DT_BF16": 2,
    }[dtype_name]


def tensor_bytes(shape: Sequence[int], dtype_name: str) -> int:
    """Bytes of one tensor: prod(shape) * element size."""
    return math.prod(shape) * element_size(dtype_name)


def row_stride(shape: Sequence[int], dtype_name: str, batch_dim_index: int = 0) -> int:
    """Row size (block size for a blocks cache): tensor bytes // shape[batch_dim_index]."""
    return tensor_bytes(shape, dtype_name) // shape[batch_dim_index]
