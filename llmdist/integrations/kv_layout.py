"""How a serving engine's per-layer KV tensors map onto one llmdist blocks cache.

Every layer's tensor has a block dimension; the bytes of one block are contiguous. Layouts:
- block dimension first (`[num_blocks, ...]`: vLLM's CPU attention `[num_blocks, kv_heads,
  block_size, 2*head_size]`, MLA, FlashInfer's `[num_blocks, 2, ...]`): one llmdist tensor per
  layer (tensor_num_per_layer 1);
- a leading K/V dimension of 2 (`[2, num_blocks, ...]`, FlashAttention and most GPU backends):
  K and V are two llmdist tensors per layer (tensor_num_per_layer 2).
Each llmdist tensor is registered as `[num_blocks, block_bytes]` of uint8, so any dtype and
any layout inside a block moves byte for byte."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..descs import CacheDesc, DataType, Placement


@dataclass
class KVLayout:
    """The blocks cache that holds every layer: its tensors' addresses, in layer order."""

    addrs: List[int]
    num_blocks: int
    block_bytes: int
    tensors_per_layer: int
    placement: Placement
    device: str  # "cpu", "cuda", "npu"
    device_index: int

    def desc(self) -> CacheDesc:
        return CacheDesc(
            len(self.addrs), [self.num_blocks, self.block_bytes], DataType.DT_UINT8, self.placement
        )


def _placement(tensor) -> Placement:
    return Placement.HOST if tensor.device.type == "cpu" else Placement.DEVICE


def layout_of(kv_caches: Dict[str, object], num_blocks: Optional[int] = None) -> KVLayout:
    """The layout of kv_caches (layer name -> tensor, in layer order). num_blocks, when known
    (the engine's KV cache config), tells a leading K/V dimension from a block dimension.
    Raises ValueError naming the layer and the rule a tensor breaks."""
    if not kv_caches:
        raise ValueError("kv_caches is empty: no KV tensor to register")
    addrs: List[int] = []
    shape0 = None
    tpl = block_bytes = blocks = None
    first = next(iter(kv_caches.values()))
    for name, t in kv_caches.items():
        shape = tuple(t.shape)
        if shape0 is None:
            shape0 = shape
        elif shape != shape0:
            raise ValueError(
                f"layer {name} has shape {shape}, layer 0 {shape0}: every layer's "
                f"KV tensor must have the same shape (hybrid caches are not "
                f"supported)"
            )
        if t.device != first.device:
            raise ValueError(f"layer {name} is on {t.device}, layer 0 on {first.device}")
        esize = t.element_size()
        kv_first = (
            len(shape) >= 3
            and shape[0] == 2
            and (num_blocks is None or shape[1] == num_blocks)
            and (num_blocks is None or shape[0] != num_blocks)
        )
        bdim = 1 if kv_first else 0
        n = shape[bdim]
        inner = shape[bdim + 1 :]
        bb = math.prod(inner) * esize
        if t.stride(bdim) * esize != bb or not _dense(t, bdim + 1):
            raise ValueError(
                f"layer {name}: the bytes of one block must be contiguous "
                f"(shape {shape}, strides {tuple(t.stride())})"
            )
        if kv_first:
            if t.stride(0) * esize < n * bb:
                raise ValueError(
                    f"layer {name}: K and V overlap (shape {shape}, strides {tuple(t.stride())})"
                )
            addrs += [t.data_ptr(), t.data_ptr() + t.stride(0) * esize]
        else:
            addrs.append(t.data_ptr())
        tpl, block_bytes, blocks = (2 if kv_first else 1), bb, n
    index = first.device.index if first.device.index is not None else 0
    return KVLayout(addrs, blocks, block_bytes, tpl, _placement(first), first.device.type, index)


def _dense(t, start: int) -> bool:
    """Dimensions start.. of t are laid out without gaps (row-major)."""
    expect = 1
    for d in range(t.dim() - 1, start - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def runtime_of(layout: KVLayout) -> str:
    """The llmdist runtime that moves these tensors' bytes."""
    return {"cpu": "host", "cuda": "cuda", "npu": "acl"}.get(layout.device, "auto")


def clip_remote(remote: Sequence[int], local: Sequence[int]) -> List[int]:
    """The remote blocks matching local ones: the last len(local) of them (blocks the decode
    already holds from its own prefix cache come first and are not pulled)."""
    return list(remote[len(remote) - len(local) :]) if local else []
