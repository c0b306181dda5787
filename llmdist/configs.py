"""Upstream's llm_datadist.configs module path: the cluster and configuration types, for code
that imports them from there."""

from .config import LLMClusterInfo, LLMConfig, LlmConfig
from .descs import LLMRole

__all__ = ["LLMClusterInfo", "LLMConfig", "LlmConfig", "LLMRole"]
