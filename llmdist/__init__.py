"""llmdist: layer-wise KV cache transfer between LLM inference instances.

The public API is that of CANN LLM-DataDist's CacheManager: replace
``from llm_datadist import ...`` with ``from llmdist import ...``."""

from . import logs
from ._core import Event, Stream, host_tuning, set_host_tuning
from .cache_manager import CacheManager
from .config import LLMClusterInfo, LLMConfig, LlmConfig
from .descs import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    DataType,
    KvCache,
    LLMRole,
    MemInfo,
    Memtype,
    Placement,
    RegisterMemStatus,
)
from .events import EventSynchronizer
from .llm_datadist import LLMDataDist
from .runtimes import runtime_info
from .status import LLMException, LLMStatusCode, Status
from .task import CacheTask
from .transfer_types import LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig

__version__ = "0.1.0"

logs.level_from_environment()

# The names of the v2 (CacheManager) API, as upstream lists them for programs that check.
# The names upstream's llm_datadist lists as its v2 API, in its order.
v2_list = [
    "LLMClusterInfo",
    "LLMStatusCode",
    "LLMException",
    "LLMRole",
    "LlmConfig",
    "LLMConfig",
    "DataType",
    "Status",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "KvCache",
    "Cache",
    "BlocksCacheKey",
    "LLMDataDist",
    "Placement",
    "RegisterMemStatus",
    "LayerSynchronizer",
    "TransferConfig",
    "CacheTask",
    "TransferWithCacheKeyConfig",
    "Memtype",
    "MemInfo",
]

__all__ = [
    "Status",
    "Memtype",
    "MemInfo",
    "v2_list",
    "LLMException",
    "LLMStatusCode",
    "BlocksCacheKey",
    "Cache",
    "CacheDesc",
    "CacheKey",
    "KvCache",
    "CacheKeyByIdAndIndex",
    "DataType",
    "LLMRole",
    "Placement",
    "RegisterMemStatus",
    "LLMClusterInfo",
    "LLMConfig",
    "LlmConfig",
    "LayerSynchronizer",
    "TransferConfig",
    "TransferWithCacheKeyConfig",
    "CacheTask",
    "CacheManager",
    "LLMDataDist",
    "EventSynchronizer",
    "Event",
    "Stream",
    "runtime_info",
    "host_tuning",
    "set_host_tuning",
]
