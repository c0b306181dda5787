"""Other libraries a benchmark compares against when they are installed (NIXL, Mooncake Transfer
Engine, upstream llm_datadist, torch), found without importing them."""

from __future__ import annotations

from importlib import metadata
from typing import Dict, Optional

from .workload import importable

# distribution names to report, by what they are
DISTRIBUTIONS = {
    "torch": ("torch",),
    "torch_npu": ("torch-npu", "torch_npu"),
    "mooncake": (
        "mooncake-transfer-engine-non-cuda",
        "mooncake-transfer-engine",
        "mooncake-transfer-engine-npu",
    ),
    "nixl": ("nixl",),
    "llm_datadist": ("llm-datadist", "llm_datadist"),
    "matplotlib": ("matplotlib",),
}


def version_of(what: str) -> Optional[str]:
    for dist in DISTRIBUTIONS[what]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def peer_versions() -> Dict[str, Optional[str]]:
    """Installed version of each peer library (None: not installed)."""
    return {k: version_of(k) for k in DISTRIBUTIONS}


def mooncake_available() -> Optional[str]:
    """None when Mooncake's engine can be imported, else why not."""
    if not importable("mooncake"):
        return "mooncake is not installed (pip install 'llmdist[mooncake]', or 'llmdist[mooncake-npu]' on Ascend)"
    try:
        import mooncake.engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. libibverbs missing
        return f"mooncake.engine does not load: {type(exc).__name__}: {exc}"
    return None


def nixl_available() -> Optional[str]:
    return None if importable("nixl") else "nixl is not installed"


def llm_datadist_available() -> Optional[str]:
    return None if importable("llm_datadist") else "llm_datadist (CANN) is not installed"
