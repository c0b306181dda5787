"""Upstream's llm_datadist.data_type module path: DataType, for code that imports it from
there."""

from .descs import DataType

__all__ = ["DataType"]
