"""Enums, the cache descriptor and the Cache handle that describe KV-cache memory (the cache
keys are in cache_keys.py and exported from here too)."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, List, Optional, Sequence, Tuple, Union

from ._check import (
    check_int64,
    check_int_list,
    check_isinstance,
    check_uint32,
    check_uint64,
    require,
)
from ._core import CopyKind
from .cache_keys import BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from .status import LLMException, LLMStatusCode, NamedIntEnum

__all__ = [
    "Placement",
    "DataType",
    "LLMRole",
    "RegisterMemStatus",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "BlocksCacheKey",
    "Cache",
    "KvCache",
    "Memtype",
    "MemInfo",
]


class Placement(NamedIntEnum):
    """Where a cache's memory lives: host RAM or the accelerator."""

    HOST = 0
    DEVICE = 1


_COPY_KINDS = {
    (Placement.HOST, Placement.HOST): CopyKind.COPY_H2H,
    (Placement.HOST, Placement.DEVICE): CopyKind.COPY_H2D,
    (Placement.DEVICE, Placement.HOST): CopyKind.COPY_D2H,
    (Placement.DEVICE, Placement.DEVICE): CopyKind.COPY_D2D,
}


def copy_kind(src: Placement, dst: Placement) -> CopyKind:
    """The runtime copy kind of bytes moving from memory at src to memory at dst."""
    return _COPY_KINDS[(src, dst)]


class DataType(Enum):
    """Element type of a cache tensor (upstream numeric values)."""

    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_INT8 = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 6
    DT_UINT16 = 7
    DT_UINT32 = 8
    DT_INT64 = 9
    DT_UINT64 = 10
    DT_DOUBLE = 11
    DT_BOOL = 12
    DT_STRING = 13
    DT_BF16 = 27

    __hash__ = object.__hash__  # members are singletons: a C slot instead of Enum's Python hash

    @property
    def element_size(self) -> int:
        """Bytes per element; DT_STRING has none and raises LLMException(LLM_PARAM_INVALID)."""
        size = _ELEMENT_SIZES.get(self)
        if size is None:
            raise LLMException(
                f"{self} has no fixed element size and cannot be used for a cache",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        return size


_ELEMENT_SIZES = {
    DataType.DT_FLOAT: 4,
    DataType.DT_FLOAT16: 2,
    DataType.DT_INT8: 1,
    DataType.DT_INT32: 4,
    DataType.DT_UINT8: 1,
    DataType.DT_INT16: 2,
    DataType.DT_UINT16: 2,
    DataType.DT_UINT32: 4,
    DataType.DT_INT64: 8,
    DataType.DT_UINT64: 8,
    DataType.DT_DOUBLE: 8,
    DataType.DT_BOOL: 1,
    DataType.DT_BF16: 2,
}


class LLMRole(NamedIntEnum):
    """Role of an LLMDataDist instance in disaggregated serving."""

    PROMPT = 1
    DECODER = 2
    MIX = 3


class RegisterMemStatus(Enum):
    """State of a memory registration."""

    OK = 0
    PREPARING = 1
    FAILED = 2


class Memtype(Enum):
    """Kind of memory a MemInfo names."""

    MEM_TYPE_DEVICE = 0
    MEM_TYPE_HOST = 1


class MemInfo:
    """A memory range (type, address, size), the argument of remap_registered_memory."""

    def __init__(self, mem_type: Memtype, addr: int, size: int) -> None:
        check_isinstance("mem_type", mem_type, Memtype)
        check_isinstance("addr", addr, int)
        check_isinstance("size", size, int)
        self._mem_type = mem_type
        self._addr = addr
        self._size = size

    @property
    def mem_type(self) -> Memtype:
        return self._mem_type

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"MemInfo(mem_type={self._mem_type}, addr={self._addr}, size={self._size})"


class CacheDesc:
    """Layout of a cache: num_tensors tensors of one shape and data type, in one placement."""

    def __init__(
        self,
        num_tensors: int,
        shape: Union[List[int], Tuple[int, ...]],
        data_type: DataType,
        placement: Placement = Placement.DEVICE,
        batch_dim_index: int = 0,
        seq_len_dim_index: int = -1,
        kv_tensor_format: Optional[str] = None,
    ) -> None:
        check_uint32("num_tensors", num_tensors)
        dims = check_int_list("shape", shape, check_int64)
        check_isinstance("data_type", data_type, DataType)
        check_isinstance("placement", placement, Placement)
        check_isinstance("batch_dim_index", batch_dim_index, int)
        check_isinstance("seq_len_dim_index", seq_len_dim_index, int)
        check_isinstance("kv_tensor_format", kv_tensor_format, str, allow_none=True)
        require(len(dims) > 0, "shape must not be empty")
        require(0 not in dims, f"shape must not contain a zero dim, but got {list(dims)}")
        require(
            0 <= batch_dim_index < len(dims),
            f"batch_dim_index {batch_dim_index} is out of range [0, {len(dims)})",
        )
        require(
            seq_len_dim_index == -1 or 0 <= seq_len_dim_index < len(dims),
            f"seq_len_dim_index {seq_len_dim_index} must be -1 or in range [0, {len(dims)})",
        )
        self._num_tensors = num_tensors
        # The caller's list itself, as upstream: changing it (or update_dim) changes the desc.
        self._shape = shape if isinstance(shape, list) else list(dims)
        self._fixed = False  # the copy a Cache holds may not change (see Cache)
        self._data_type = data_type
        self._placement = placement
        self._batch_dim = batch_dim_index
        self._seq_len_dim_index = seq_len_dim_index
        self._kv_tensor_format = kv_tensor_format

    @property
    def num_tensors(self) -> int:
        """Number of tensors in the cache (2 per layer for layer-wise transfer)."""
        return self._num_tensors

    @property
    def shape(self) -> List[int]:
        """Shape of each tensor: the live list, as upstream (a copy for a cache's own desc)."""
        return list(self._shape) if self._fixed else self._shape

    def update_dim(self, dim_index: int, dim_value: int) -> None:
        """Set shape[dim_index] to dim_value (> 0), as upstream; refused on the desc of a
        cache, whose memory is already sized."""
        check_isinstance("dim_index", dim_index, int)
        check_int64("dim_value", dim_value)
        require(not self._fixed, "the desc of a cache cannot change: its memory is sized by it")
        require(
            -len(self._shape) <= dim_index < len(self._shape),
            f"dim_index {dim_index} is out of range for a shape of {len(self._shape)} dims",
        )
        require(dim_value > 0, f"dim_value must be > 0, but got {dim_value}")
        self._shape[dim_index] = dim_value

    def _fixed_copy(self) -> "CacheDesc":
        """A copy that cannot change, for a Cache (its memory is sized by it)."""
        copy = CacheDesc(
            self._num_tensors,
            list(self._shape),
            self._data_type,
            self._placement,
            self._batch_dim,
            self._seq_len_dim_index,
            self._kv_tensor_format,
        )
        copy._fixed = True
        return copy

    @property
    def data_type(self) -> DataType:
        """Element type of each tensor."""
        return self._data_type

    @property
    def placement(self) -> Placement:
        """Whether the memory is on the host or the device."""
        return self._placement

    @property
    def batch_dim(self) -> int:
        """Index of the batch dimension in shape."""
        return self._batch_dim

    batch_dim_index = batch_dim

    @property
    def batch_size(self) -> int:
        """shape[batch_dim]: number of rows (or of blocks, for a blocks cache)."""
        return self._shape[self._batch_dim]

    @property
    def seq_len_dim_index(self) -> int:
        """Index of the sequence-length dimension, or -1 when not given."""
        return self._seq_len_dim_index

    @property
    def kv_tensor_format(self) -> Optional[str]:
        """Optional data-format tag of the tensors (kept, not interpreted)."""
        return self._kv_tensor_format

    @property
    def size(self) -> int:
        """Bytes of ONE tensor: prod(shape) * element size; LLMException if it has none."""
        if min(self._shape, default=1) <= 0:  # read per transfer: message built on failure only
            raise LLMException(
                f"cannot compute the tensor size of shape {list(self._shape)}: negative dim",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        return math.prod(self._shape) * self._data_type.element_size

    @property
    def stride(self) -> int:
        """Bytes of one row (one block in a blocks cache): size // batch_size."""
        return self.size // self.batch_size

    def __repr__(self) -> str:
        return (
            f"CacheDesc(num_tensors={self._num_tensors}, shape={list(self._shape)}, "
            f"data_type={self._data_type}, placement={self._placement}, "
            f"batch_dim_index={self._batch_dim}, seq_len_dim_index={self._seq_len_dim_index}, "
            f"kv_tensor_format={self._kv_tensor_format!r})"
        )


class Cache:
    """Cache memory handle made by the CacheManager: an id, a layout, one address per tensor."""

    def __init__(
        self,
        cache_id: int,
        cache_desc: CacheDesc,
        tensor_addrs: Sequence[int],
        is_blocks_cache: bool = False,
    ) -> None:
        check_int64("cache_id", cache_id)
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        addrs = check_int_list("tensor_addrs", tensor_addrs, check_uint64)
        check_isinstance("is_blocks_cache", is_blocks_cache, bool)
        require(
            len(addrs) == cache_desc.num_tensors,
            f"tensor_addrs has {len(addrs)} addresses but cache_desc.num_tensors is "
            f"{cache_desc.num_tensors}",
        )
        self._cache_id = cache_id
        # its own copy: the caller's desc may change (update_dim) once the memory is sized
        self._cache_desc = cache_desc if cache_desc._fixed else cache_desc._fixed_copy()
        self._tensor_addrs: List[int] = list(addrs)
        self._is_blocks_cache = is_blocks_cache
        self._valid = True

    @property
    def cache_id(self) -> int:
        """Id given by the CacheManager (-1 for a CPU cache made by create_cpu_cache)."""
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        """Layout of the cache (a copy of the desc it was made with, which cannot change)."""
        return self._cache_desc

    @property
    def tensor_addrs(self) -> List[int]:
        """Address of each tensor, in order (a copy; empty once the cache is released)."""
        return list(self._tensor_addrs)

    @property
    def is_blocks_cache(self) -> bool:
        """True for a blocks (paged-attention) cache, whose shape[0] counts blocks."""
        return self._is_blocks_cache

    def _invalidate(self) -> None:
        """Mark the cache released: it no longer names memory, so it must not be used."""
        self._valid = False
        self._tensor_addrs = []

    @classmethod
    def create_cpu_cache(cls, cache_desc: CacheDesc, addrs: Sequence[int]) -> "Cache":
        """Wrap host memory the caller owns as a blocks cache (id -1) without registering it."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        checked = check_int_list("addrs", addrs, check_uint64)
        require(
            cache_desc.placement == Placement.HOST,
            f"cache_desc.placement must be Placement.HOST, but got {cache_desc.placement}",
        )
        require(cache_desc.num_tensors > 0, "cache_desc.num_tensors must be > 0")
        require(
            len(checked) == cache_desc.num_tensors,
            f"addrs has {len(checked)} addresses but cache_desc.num_tensors is "
            f"{cache_desc.num_tensors}",
        )
        require(all(a != 0 for a in checked), "addrs must not contain a zero address")
        return cls(-1, cache_desc, list(checked), is_blocks_cache=True)

    def __repr__(self) -> str:
        state = "" if self._valid else ", released"
        return (
            f"Cache(cache_id={self._cache_id}, cache_desc={self._cache_desc!r}, "
            f"num_tensor_addrs={len(self._tensor_addrs)}, "
            f"is_blocks_cache={self._is_blocks_cache}{state})"
        )


def tensor_addrs_of(cache: Cache) -> List[int]:
    """The tensor addresses of cache without a copy (Cache.tensor_addrs copies): what the
    planners read on every transfer. Callers do not change the list."""
    return cache._tensor_addrs


def is_live(cache: Cache) -> bool:
    """Whether cache still names memory (not released)."""
    return cache._valid


def invalidate(cache: Cache) -> None:
    """Mark cache released (its cache manager freed or forgot its memory)."""
    cache._invalidate()


def fixed_copy(desc: CacheDesc) -> CacheDesc:
    """A copy of desc that cannot change, to size a new cache with."""
    return desc._fixed_copy()


class KvCache:
    """Upstream's handle of a cache made by its v1 KvCacheManager, which llmdist does not
    provide: the type, its fields and create_cpu_cache, for code that imports or builds it.
    llmdist's cache manager takes and returns Cache."""

    def __init__(
        self,
        cache_id: int,
        cache_desc: CacheDesc,
        per_device_tensor_addrs: List[List[int]],
        kv_cache_manager: Any = None,
    ) -> None:
        check_int64("cache_id", cache_id)
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("per_device_tensor_addrs", per_device_tensor_addrs, list)
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._per_device_tensor_addrs = [
            check_int_list("per_device_tensor_addrs", a, check_uint64)
            for a in per_device_tensor_addrs
        ]

    @property
    def cache_id(self) -> int:
        """Id of the cache (-1 for a CPU cache)."""
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        """Layout of the cache."""
        return self._cache_desc

    @property
    def per_device_tensor_addrs(self) -> List[List[int]]:
        """Tensor addresses, one list per device."""
        return [list(a) for a in self._per_device_tensor_addrs]

    @classmethod
    def create_cpu_cache(
        cls, cache_desc: CacheDesc, addrs: Union[List[int], List[List[int]]]
    ) -> "KvCache":
        """Wrap host memory: addrs one address per tensor, or one such list per device."""
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        require(cache_desc.placement == Placement.HOST, "cache_desc placement must be HOST")
        check_isinstance("addrs", addrs, list)
        require(len(addrs) > 0, "addrs must not be empty")
        per_device = addrs if isinstance(addrs[0], list) else [addrs]
        for a in per_device:
            require(
                isinstance(a, list) and len(a) == cache_desc.num_tensors,
                f"each list of addrs must hold cache_desc.num_tensors "
                f"({cache_desc.num_tensors}) addresses",
            )
        return cls(-1, cache_desc, per_device)

    def __repr__(self) -> str:
        return (
            f"KvCache(cache_id={self._cache_id}, num_devices={len(self._per_device_tensor_addrs)})"
        )
