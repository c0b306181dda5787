"""Upstream's llm_datadist.v2.llm_types module path: the cache, key and transfer types."""

from ..descs import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    KvCache,
    MemInfo,
    Memtype,
    Placement,
    RegisterMemStatus,
)
from ..task import CacheTask
from ..transfer_types import LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig

__all__ = [
    "BlocksCacheKey",
    "Cache",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "KvCache",
    "MemInfo",
    "Memtype",
    "Placement",
    "RegisterMemStatus",
    "CacheTask",
    "LayerSynchronizer",
    "TransferConfig",
    "TransferWithCacheKeyConfig",
]
