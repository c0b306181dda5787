"""Upstream's llm_datadist.v2.cache_manager module path: CacheManager."""

from ..cache_manager import CacheManager

__all__ = ["CacheManager"]
