"""Upstream's llm_datadist.v2 package path (llm_types, llm_datadist, cache_manager), for code
that imports from its modules."""
