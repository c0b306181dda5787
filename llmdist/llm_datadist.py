"""LLMDataDist: one cluster (a prefill or decode instance) with its runtime and cache manager."""

from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

from . import _core, runtimes
from ._check import check_isinstance, check_uint64
from .cache_manager import CacheManager
from .descs import LLMRole
from .status import LLMException, LLMStatusCode
from .workers import TransferWorkers

# Option keys llmdist understands; anything else is kept and ignored with a warning.
_UPSTREAM_KEYS = {
    "ge.exec.deviceId", "llm.SyncKvCacheWaitTime", "llm.listenIpInfo", "llm.EnableCacheManager",
    "llm.EnableRemoteCacheAccessible", "llm.MemPoolConfig", "llm.HostMemPoolConfig",
    "llm.LinkTotalTime", "llm.LinkRetryCount", "ge.exec.rankTableFile", "llm.Role",
    "llm.ClusterInfo", "ge.socVersion", "ge.graphRunMode",
}
_LLMDIST_KEYS = {"llmdist.runtime", "llmdist.transfer_workers"}

_live: "weakref.WeakSet[LLMDataDist]" = weakref.WeakSet()


@atexit.register
def _finalize_all() -> None:
    for dd in list(_live):
        dd.finalize()


def _int_option(options: Dict[str, str], key: str, default: Optional[int], lo: int) -> Optional[int]:
    text = options.get(key)
    if text is None:
        return default
    try:
        value = int(str(text), 10)
    except ValueError:
        value = None
    if value is None or value < lo:
        raise LLMException(f"option {key} must be an integer >= {lo}, got {text!r}",
                           status_code=LLMStatusCode.LLM_PARAM_INVALID)
    return value


def _flag_option(options: Dict[str, str], key: str) -> bool:
    text = str(options.get(key, "0"))
    if text not in ("0", "1"):
        raise LLMException(f"option {key} must be \"0\" or \"1\", got {text!r}",
                           status_code=LLMStatusCode.LLM_PARAM_INVALID)
    return text == "1"


class LLMDataDist:
    """A cluster: init() picks the runtime and starts the transfer workers; finalize() ends
    every transfer and frees llmdist-owned memory."""

    def __init__(self, role: LLMRole, cluster_id: int) -> None:
        check_isinstance("role", role, LLMRole)
        check_uint64("cluster_id", cluster_id)
        self._role = role
        self._cluster_id = cluster_id
        self._lock = threading.Lock()
        self._cache_manager: Optional[CacheManager] = None
        self._workers: Optional[TransferWorkers] = None
        self._options: Dict[str, str] = {}

    @property
    def cluster_id(self) -> int:
        """This cluster's id."""
        return self._cluster_id

    @property
    def role(self) -> LLMRole:
        """This cluster's role."""
        return self._role

    @property
    def runtime(self) -> "_core.Runtime":
        """The runtime this cluster copies with (for Stream and Event objects)."""
        return self.cache_manager._runtime

    @property
    def cache_manager(self) -> CacheManager:
        """The cache manager (after init)."""
        if self._cache_manager is None:
            raise RuntimeError("llm datadist is not initialized")
        return self._cache_manager

    def init(self, options: Dict[str, str]) -> None:
        """Start the cluster with upstream option keys (plus llmdist.* keys); a second call
        does nothing."""
        check_isinstance("options", options, dict)
        for k, v in options.items():
            check_isinstance("options key", k, str)
            check_isinstance(f"options[{k!r}]", v, str)
        with self._lock:
            if self._cache_manager is not None:
                return
            for key in options:
                if key not in _UPSTREAM_KEYS and key not in _LLMDIST_KEYS:
                    warnings.warn(f"llmdist ignores the option {key!r}", stacklevel=2)
            device_id = _int_option(options, "ge.exec.deviceId", 0, 0)
            sync_timeout = _int_option(options, "llm.SyncKvCacheWaitTime", None, 1)
            nworkers = _int_option(options, "llmdist.transfer_workers", 4, 1)
            remote = _flag_option(options, "llm.EnableRemoteCacheAccessible")
            _flag_option(options, "llm.EnableCacheManager")
            runtime = runtimes.load(options.get("llmdist.runtime"), device_id)
            runtime.bind_device()
            workers = TransferWorkers(runtime, nworkers)
            self._cache_manager = CacheManager(self, runtime, workers, options, remote, sync_timeout)
            self._workers = workers
            self._options = dict(options)
            _live.add(self)

    def finalize(self) -> None:
        """End every transfer with LLM_ENGINE_FINALIZED, free llmdist-owned memory and stop
        the workers; safe to call twice. init() may be called again afterwards."""
        with self._lock:
            cm, workers = self._cache_manager, self._workers
            self._cache_manager = None
            self._workers = None
            _live.discard(self)
        if cm is not None:
            cm._close()
        if workers is not None:
            workers.shutdown(timeout=2.0)

    def link_clusters(self, clusters, timeout: int = 3000) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Link to remote clusters (not in this build: every cluster gets LLM_FEATURE_NOT_ENABLED)."""
        self.cache_manager
        codes = [LLMStatusCode.LLM_FEATURE_NOT_ENABLED for _ in clusters]
        return (LLMStatusCode.LLM_FEATURE_NOT_ENABLED if codes else LLMStatusCode.LLM_SUCCESS), codes

    def unlink_clusters(self, clusters, timeout: int = 3000,
                        force: bool = False) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Unlink remote clusters; none can be linked in this build, so each is LLM_NOT_YET_LINK."""
        self.cache_manager
        codes = [LLMStatusCode.LLM_NOT_YET_LINK for _ in clusters]
        return (LLMStatusCode.LLM_NOT_YET_LINK if codes else LLMStatusCode.LLM_SUCCESS), codes
