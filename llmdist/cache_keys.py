"""The cache keys: immutable names of a cache (CacheKey, CacheKeyByIdAndIndex, BlocksCacheKey),
with upstream's argument errors."""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

from ._check import check_int64, check_uint32, check_uint64, require
from .status import LLMException, LLMStatusCode

__all__ = ["CacheKey", "CacheKeyByIdAndIndex", "BlocksCacheKey", "KeyArgumentError"]

_INVALID_ID = 2**64 - 1


def _pick_cluster_id(cluster_id: Optional[int], prompt_cluster_id: Optional[int], cls: str) -> int:
    """Resolve the cluster_id / prompt_cluster_id alias pair into one value."""
    if cluster_id is None and prompt_cluster_id is None:
        raise TypeError(f"{cls}() missing required argument: 'cluster_id' (or 'prompt_cluster_id')")
    require(
        cluster_id is None or prompt_cluster_id is None,
        f"{cls}() takes cluster_id or prompt_cluster_id, not both",
    )
    return cluster_id if cluster_id is not None else prompt_cluster_id


class KeyArgumentError(LLMException, TypeError, ValueError):
    """A bad argument of a cache key: LLMException(LLM_PARAM_INVALID), as upstream raises, and
    still the TypeError or ValueError that Python code expects of a constructor."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=LLMStatusCode.LLM_PARAM_INVALID)


def _key_arguments(init):
    """Turn a key constructor's TypeError/ValueError (bad or missing arguments, a value out
    of range) into KeyArgumentError."""

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except LLMException:
            raise
        except (TypeError, ValueError) as exc:
            raise KeyArgumentError(str(exc)) from None

    return checked


class _Key:
    """Base of the immutable cache keys: equality and hash by type and fields."""

    __slots__ = ()
    _fields: Tuple[str, ...] = ()

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, "_" + f) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={v}" for f, v in zip(self._fields, self._values()))
        return f"{type(self).__name__}({fields})"

    @property
    def cluster_id(self) -> int:
        """Cluster that holds the cache this key names."""
        return self._cluster_id

    prompt_cluster_id = cluster_id


class CacheKey(_Key):
    """Names a cache by (cluster, request, model, prefix)."""

    __slots__ = ("_cluster_id", "_req_id", "_model_id", "_prefix_id")
    _fields = ("cluster_id", "req_id", "model_id", "prefix_id")

    @_key_arguments
    def __init__(
        self,
        cluster_id: Optional[int] = None,
        req_id: Optional[int] = None,
        model_id: int = 0,
        prefix_id: int = _INVALID_ID,
        *,
        prompt_cluster_id: Optional[int] = None,
    ) -> None:
        cid = _pick_cluster_id(cluster_id, prompt_cluster_id, "CacheKey")
        if req_id is None:
            raise TypeError("CacheKey() missing required argument: 'req_id'")
        self._cluster_id = check_uint64("cluster_id", cid)
        self._req_id = check_uint64("req_id", req_id)
        self._model_id = check_uint64("model_id", model_id)
        self._prefix_id = check_uint64("prefix_id", prefix_id)

    @property
    def req_id(self) -> int:
        """Request id."""
        return self._req_id

    @property
    def model_id(self) -> int:
        """Model id (0 unless several models are loaded)."""
        return self._model_id

    @property
    def prefix_id(self) -> int:
        """Prefix id; 2**64-1 means none."""
        return self._prefix_id


class CacheKeyByIdAndIndex(_Key):
    """Names one batch row of a cache by (cluster, cache id, batch index)."""

    __slots__ = ("_cluster_id", "_cache_id", "_batch_index")
    _fields = ("cluster_id", "cache_id", "batch_index")

    @_key_arguments
    def __init__(
        self,
        cluster_id: Optional[int] = None,
        cache_id: Optional[int] = None,
        batch_index: int = 0,
        *,
        prompt_cluster_id: Optional[int] = None,
    ) -> None:
        cid = _pick_cluster_id(cluster_id, prompt_cluster_id, "CacheKeyByIdAndIndex")
        if cache_id is None:
            raise TypeError("CacheKeyByIdAndIndex() missing required argument: 'cache_id'")
        self._cluster_id = check_uint64("cluster_id", cid)
        self._cache_id = check_int64("cache_id", cache_id)
        self._batch_index = check_uint32("batch_index", batch_index)

    @property
    def cache_id(self) -> int:
        """Id of the cache on its cluster."""
        return self._cache_id

    @property
    def batch_index(self) -> int:
        """Row of the cache this key points at."""
        return self._batch_index


class BlocksCacheKey(_Key):
    """Names a blocks (paged-attention) cache by (cluster, model)."""

    __slots__ = ("_cluster_id", "_model_id")
    _fields = ("cluster_id", "model_id")

    @_key_arguments
    def __init__(
        self,
        cluster_id: Optional[int] = None,
        model_id: int = 0,
        *,
        prompt_cluster_id: Optional[int] = None,
    ) -> None:
        cid = _pick_cluster_id(cluster_id, prompt_cluster_id, "BlocksCacheKey")
        self._cluster_id = check_uint64("cluster_id", cid)
        self._model_id = check_uint64("model_id", model_id)

    @property
    def model_id(self) -> int:
        """Model id (0 unless several models are loaded)."""
        return self._model_id
