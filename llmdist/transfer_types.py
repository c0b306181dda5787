"""Types a caller hands to transfer_cache_async: the layer synchronizer and the transfer configs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Union

from ._check import (
    check_int_list,
    check_isinstance,
    check_layer_range,
    check_uint32,
    check_uint64,
    require,
)
from .descs import BlocksCacheKey, CacheKeyByIdAndIndex

__all__ = ["LayerSynchronizer", "TransferConfig", "TransferWithCacheKeyConfig"]


class LayerSynchronizer(ABC):
    """Tells the transfer worker when a layer's KV cache is computed and may be sent."""

    @abstractmethod
    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        """Block until layer layer_index is computed; True to send it, False if it failed."""


class TransferConfig:
    """Send source layers to destination tensor addresses given by the caller (K, V per layer)."""

    def __init__(
        self,
        dst_cluster_id: int,
        dst_addrs: Sequence[int],
        src_layer_range: Optional[range] = None,
        src_batch_index: int = 0,
    ) -> None:
        self._dst_cluster_id = check_uint64("dst_cluster_id", dst_cluster_id)
        self._dst_addrs = check_int_list("dst_addrs", dst_addrs, check_uint64)
        self._src_layer_range = check_layer_range("src_layer_range", src_layer_range)
        self._src_batch_index = check_uint32("src_batch_index", src_batch_index)
        # Upstream's attribute, always None there: dst_addrs name the destination layers.
        # Not read by llmdist.
        self.dst_layer_range: Optional[range] = None

    @property
    def dst_cluster_id(self) -> int:
        """Cluster that owns the destination memory."""
        return self._dst_cluster_id

    @dst_cluster_id.setter
    def dst_cluster_id(self, value: int) -> None:
        self._dst_cluster_id = check_uint64("dst_cluster_id", value)

    @property
    def dst_addrs(self) -> List[int]:
        """Destination tensor addresses, 2 per source layer (K then V); a fresh list."""
        return list(self._dst_addrs)

    @dst_addrs.setter
    def dst_addrs(self, value: Sequence[int]) -> None:
        self._dst_addrs = check_int_list("dst_addrs", value, check_uint64)

    @property
    def src_layer_range(self) -> Optional[range]:
        """Source layers to send; None means all layers of the source cache."""
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, value: Optional[range]) -> None:
        self._src_layer_range = check_layer_range("src_layer_range", value)

    @property
    def src_batch_index(self) -> int:
        """Source row to send (0 with source block indices)."""
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, value: int) -> None:
        self._src_batch_index = check_uint32("src_batch_index", value)

    def __repr__(self) -> str:
        return (
            f"TransferConfig(dst_cluster_id={self._dst_cluster_id}, "
            f"dst_addrs={list(self._dst_addrs)}, src_layer_range={self._src_layer_range}, "
            f"src_batch_index={self._src_batch_index})"
        )


def dst_addrs_of(cfg: TransferConfig) -> List[int]:
    """The destination addresses of cfg without a copy (TransferConfig.dst_addrs copies): what
    the write planner reads on every transfer. Callers do not change the list."""
    return cfg._dst_addrs


class TransferWithCacheKeyConfig:
    """Send source layers into layers of a cache the destination cluster registered under a key."""

    def __init__(
        self,
        cache_key: Union[BlocksCacheKey, CacheKeyByIdAndIndex],
        src_layer_range: Optional[range] = None,
        dst_layer_range: Optional[range] = None,
        src_batch_index: int = 0,
    ) -> None:
        check_isinstance("cache_key", cache_key, (BlocksCacheKey, CacheKeyByIdAndIndex))
        src = check_layer_range("src_layer_range", src_layer_range, allow_none=False)
        dst = check_layer_range("dst_layer_range", dst_layer_range, allow_none=False)
        self._check_lengths(src, dst)
        check_uint32("src_batch_index", src_batch_index)
        self._check_key_batch(cache_key, src_batch_index)
        self._cache_key = cache_key
        self._src_layer_range: range = src
        self._dst_layer_range: range = dst
        self._src_batch_index = src_batch_index

    @staticmethod
    def _check_lengths(src: range, dst: range) -> None:
        require(
            len(src) == len(dst),
            f"src_layer_range {src} and dst_layer_range {dst} must have the same length",
        )

    @staticmethod
    def _check_key_batch(key: Union[BlocksCacheKey, CacheKeyByIdAndIndex], batch: int) -> None:
        require(
            not (isinstance(key, BlocksCacheKey) and batch != 0),
            f"src_batch_index must be 0 with a BlocksCacheKey, but got {batch}",
        )

    @property
    def cache_key(self) -> Union[BlocksCacheKey, CacheKeyByIdAndIndex]:
        """Key of the destination cache on the destination cluster."""
        return self._cache_key

    @cache_key.setter
    def cache_key(self, value: Union[BlocksCacheKey, CacheKeyByIdAndIndex]) -> None:
        check_isinstance("cache_key", value, (BlocksCacheKey, CacheKeyByIdAndIndex))
        self._check_key_batch(value, self._src_batch_index)
        self._cache_key = value

    @property
    def dst_cluster_id(self) -> int:
        """Destination cluster: the cache key's cluster_id."""
        return self._cache_key.cluster_id

    @property
    def src_layer_range(self) -> range:
        """Source layers to send."""
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, value: range) -> None:
        src = check_layer_range("src_layer_range", value, allow_none=False)
        self._check_lengths(src, self._dst_layer_range)
        self._src_layer_range = src

    @property
    def dst_layer_range(self) -> range:
        """Destination layers: source layer src.start + j goes to dst_layer_range[j]."""
        return self._dst_layer_range

    @dst_layer_range.setter
    def dst_layer_range(self, value: range) -> None:
        dst = check_layer_range("dst_layer_range", value, allow_none=False)
        self._check_lengths(self._src_layer_range, dst)
        self._dst_layer_range = dst

    @property
    def src_batch_index(self) -> int:
        """Source row to send; must be 0 with a BlocksCacheKey."""
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, value: int) -> None:
        check_uint32("src_batch_index", value)
        self._check_key_batch(self._cache_key, value)
        self._src_batch_index = value

    def __repr__(self) -> str:
        return (
            f"TransferWithCacheKeyConfig(cache_key={self._cache_key!r}, "
            f"src_layer_range={self._src_layer_range}, "
            f"dst_layer_range={self._dst_layer_range}, "
            f"src_batch_index={self._src_batch_index})"
        )
