"""The cluster the stand-alone scripts in bench/ measure the host copy engine on."""

from __future__ import annotations

import sys
from typing import Tuple

from llmdist import LLMConfig, LLMDataDist, LLMRole, _core


def open_host_cluster(script: str) -> Tuple[LLMDataDist, _core.Stream]:
    """An initialized LLMDataDist with a cache manager, and a stream of its runtime; exits with
    a message naming script when the runtime is not the host one."""
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.enable_cache_manager = True
    dd.init(cfg.generate_options())
    if not dd.runtime.is_host:
        sys.exit(f"{script} measures the host runtime (LLMDIST_RUNTIME=host)")
    return dd, _core.Stream(dd.runtime)
