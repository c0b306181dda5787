"""Choosing and loading a runtime: host (built in), ACL (libascendcl.so) or CUDA (libcudart).

Nothing is linked at build time; a device runtime is opened with dlopen the first time it is
asked for. `auto` takes ACL if it loads and sees a device, else CUDA likewise, else host."""

from __future__ import annotations

import os
import sys
import threading
from typing import Dict, List, Optional

from . import _core
from .status import LLMException, LLMStatusCode

CHOICES = ("auto", "host", "acl", "cuda")

_lock = threading.Lock()
_reasons: Dict[str, str] = {}  # why a device runtime could not be used, by name
_loaded: Dict[str, "_core.Runtime"] = {}
_active: Optional["_core.Runtime"] = None


def acl_library_paths() -> List[str]:
    """Where libascendcl.so is looked for, in order (LLMDIST_ACL_LIBRARY alone when set)."""
    override = os.environ.get("LLMDIST_ACL_LIBRARY")
    if override:
        return [override]
    paths = []
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        root = os.environ.get(var)
        if root:
            paths.append(os.path.join(root, "lib64", "libascendcl.so"))
    paths += [
        "/usr/local/Ascend/cann/lib64/libascendcl.so",
        "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so",
        "libascendcl.so",
    ]
    return paths


def cuda_library_paths() -> List[str]:
    """Where libcudart is looked for: the nvidia-cuda-runtime wheels, then the system
    (LLMDIST_CUDA_LIBRARY alone when set)."""
    override = os.environ.get("LLMDIST_CUDA_LIBRARY")
    if override:
        return [override]
    paths = []
    for entry in sys.path:
        for sub, name in (
            ("nvidia/cu13/lib", "libcudart.so.13"),
            ("nvidia/cuda_runtime/lib", "libcudart.so.12"),
        ):
            candidate = os.path.join(entry or ".", sub, name)
            if os.path.exists(candidate) and candidate not in paths:
                paths.append(candidate)
    return paths + ["libcudart.so.13", "libcudart.so.12"]


# The device runtimes' loaders, by the name users choose them with.
_LOADERS = {
    "acl": lambda device_id: _core.Runtime.acl(device_id, acl_library_paths(), True),
    "cuda": lambda device_id: _core.Runtime.cuda(device_id, cuda_library_paths()),
}


def _try(name: str, device_id: int) -> Optional["_core.Runtime"]:
    """Load a device runtime, remembering why it failed."""
    try:
        rt = _LOADERS[name](device_id)
    except RuntimeError as exc:
        _reasons[name] = str(exc)
        return None
    _reasons.pop(name, None)
    return rt


def load(choice: Optional[str], device_id: int) -> "_core.Runtime":
    """The runtime for choice (None: env LLMDIST_RUNTIME, else auto) on device_id.

    An explicit acl/cuda that cannot be used raises LLMException(LLM_FEATURE_NOT_ENABLED) with
    the loader's or runtime's own message; auto falls back to host."""
    global _active
    if choice is None:
        choice = os.environ.get("LLMDIST_RUNTIME", "auto") or "auto"
    if choice not in CHOICES:
        raise LLMException(
            f"runtime must be one of {', '.join(CHOICES)}, got {choice!r}",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    with _lock:
        rt: Optional[_core.Runtime] = None
        if choice in ("acl", "cuda"):
            rt = _try(choice, device_id)
            if rt is None:
                raise LLMException(
                    f"the {choice} runtime is not available: {_reasons[choice]}",
                    status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                )
        elif choice == "auto":
            rt = _try("acl", device_id) or _try("cuda", device_id)
        if rt is None:
            rt = _core.Runtime.host(device_id)
        if _active is not None and _active.name != rt.name and not _active.is_host:
            raise LLMException(
                f"this process already drives the {_active.name} runtime; "
                f"one process uses one runtime and one device",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        if (
            _active is not None
            and _active.name == rt.name
            and _active.device_id != device_id
            and not rt.is_host
        ):
            raise LLMException(
                f"this process already drives {rt.name} device "
                f"{_active.device_id}; it cannot also drive device {device_id}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        _loaded[rt.name] = rt
        _active = rt
        return rt


def runtime_info() -> Dict[str, object]:
    """Which runtime is active, its version and library, and why each other one is not."""
    info: Dict[str, object] = {"active": _active.name if _active is not None else None}
    runtimes = {"host": {"available": True, "version": "1", "library": "(built in)"}}
    for name in ("acl", "cuda"):
        rt = _loaded.get(name)
        if rt is None and name not in _reasons:
            with _lock:
                rt = _try(name, 0)
            if rt is not None:
                _loaded[name] = rt
        runtimes[name] = (
            {"available": True, "version": rt.version, "library": rt.library}
            if rt is not None
            else {"available": False, "reason": _reasons[name]}
        )
        if rt is not None and rt.device_copy is not None:
            # a runtime with a copy kernel: how device-to-device copies run, and why DMA
            runtimes[name]["device_copy"] = rt.device_copy
            runtimes[name]["device_copy_reason"] = rt.device_copy_reason
    info["runtimes"] = runtimes
    return info
