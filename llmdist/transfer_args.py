"""Argument rules shared by transfer_cache_async, the pulls and the pushes: tensors per layer,
layer ranges, the byte plan of a block or row copy, and how errors name those arguments."""

from __future__ import annotations

from typing import Optional, Tuple

from . import _core
from ._check import check_layer_range, check_uint32, require
from .descs import Cache, tensor_addrs_of
from .status import LLMException, LLMStatusCode


def check_tensor_num_per_layer(value) -> int:
    """tensor_num_per_layer: a uint32, 1 (one tensor per layer, MLA) or 2 (K and V)."""
    check_uint32("tensor_num_per_layer", value)
    if value != 1 and value != 2:
        raise LLMException(
            f"tensor_num_per_layer must be 1 or 2, but got {value}",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    return value


def layer_ranges(
    src_range: Optional[range],
    dst_range: Optional[range],
    src_tensors: int,
    dst_tensors: int,
    tpl: int,
    src_name: str,
    dst_name: str,
) -> Tuple[range, range, int]:
    """Check both layer ranges against the caches' layers (tpl tensors each). Returns the
    ranges and the tensors per layer to move with. Both None: every tensor, tensor i to tensor
    i (caches of one tensor, as in upstream's samples, have no K/V pair); one None: every
    layer of that cache."""
    check_layer_range("src_layer_range", src_range)
    check_layer_range("dst_layer_range", dst_range)
    if src_range is None and dst_range is None:
        require(
            src_tensors == dst_tensors,
            f"{src_name} has {src_tensors} tensors and {dst_name} {dst_tensors}: without "
            f"layer ranges every tensor is moved, so the counts must be equal",
        )
        return range(src_tensors), range(dst_tensors), 1
    for name, tensors in ((src_name, src_tensors), (dst_name, dst_tensors)):
        require(
            tensors % tpl == 0,
            f"{name} has {tensors} tensors, not a multiple of tensor_num_per_layer {tpl}",
        )
    src = range(src_tensors // tpl) if src_range is None else src_range
    dst = range(dst_tensors // tpl) if dst_range is None else dst_range
    require(
        src.stop <= src_tensors // tpl,
        f"src_layer_range {src} is outside the {src_tensors // tpl} layers of {src_name}",
    )
    require(
        dst.stop <= dst_tensors // tpl,
        f"dst_layer_range {dst} is outside the {dst_tensors // tpl} layers of {dst_name}",
    )
    require(
        len(src) == len(dst),
        f"src_layer_range {src} and dst_layer_range {dst} must have the same length",
    )
    return src, dst, tpl


def c2b_plan(dst_idx, row_bytes: int, block: int, blocks_name: str):
    """The plan cutting a row of row_bytes into the blocks dst_idx of block bytes each; a row
    fills at most ceil(row_bytes / block) blocks."""
    chunks = -(-row_bytes // block)
    if len(dst_idx) > chunks:
        raise LLMException(
            f"{blocks_name} has {len(dst_idx)} blocks, but a source row of "
            f"{row_bytes} bytes fills at most {chunks} blocks of {block} bytes",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    return _core.plan_c2b(dst_idx, row_bytes, block)


def apart(src: Cache, dst: Cache, dst_tensors_apart: bool) -> bool:
    """Whether a copy from src into distinct blocks or one row of dst can neither write bytes
    it reads nor write a byte twice, known without its ranges: the two caches' memory spans
    do not meet and dst's tensors do not overlap each other (dst_tensors_apart: llmdist
    allocated them side by side). When it is not known, the ranges are compared
    (block_ops.check_disjoint)."""
    if src is dst or not dst_tensors_apart:
        return False
    s, d = tensor_addrs_of(src), tensor_addrs_of(dst)
    if not s or not d:
        return False
    s_lo, s_hi = min(s), max(s) + src.cache_desc.size
    d_lo, d_hi = min(d), max(d) + dst.cache_desc.size
    return s_hi <= d_lo or d_hi <= s_lo


def range_params(src_idx, dst_idx, rows: str) -> str:
    """The arguments that chose the byte ranges of a pull or push, for its error messages
    (rows: those of a row-to-row copy)."""
    if src_idx is not None and len(src_idx):
        return "src_blocks and dst_blocks"
    if dst_idx is not None:
        return "the source row and dst_blocks"
    return rows
