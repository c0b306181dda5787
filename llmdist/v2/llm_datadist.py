"""Upstream's llm_datadist.v2.llm_datadist module path: LLMDataDist."""

from ..llm_datadist import LLMDataDist

__all__ = ["LLMDataDist"]
