"""LLMDataDist: one cluster (a prefill or decode instance) with its runtime and cache manager."""

from __future__ import annotations

import atexit
import os
import threading
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

from . import _core, auth, limits, notifications, runtimes
from ._check import check_isinstance, check_uint64
from .cache_manager import CacheManager
from .cluster import ClusterNode
from .config import LLMClusterInfo, parse_ip_port
from .descs import LLMRole, RegisterMemStatus
from .rank_table import RankTableLinks
from .status import LLMException, LLMStatusCode
from .workers import TransferWorkers

# Option keys llmdist understands; anything else is kept and ignored with a warning.
_UPSTREAM_KEYS = {
    "ge.exec.deviceId",
    "llm.SyncKvCacheWaitTime",
    "llm.listenIpInfo",
    "llm.EnableCacheManager",
    "llm.EnableRemoteCacheAccessible",
    "llm.MemPoolConfig",
    "llm.HostMemPoolConfig",
    "llm.LinkTotalTime",
    "llm.LinkRetryCount",
    "ge.exec.rankTableFile",
    "llm.Role",
    "llm.ClusterInfo",
    "ge.socVersion",
    "ge.graphRunMode",
    "ge.session_device_id",
    "llm.LocalCommRes",
    "llm.TransferBackend",
    "llm.EnableSwitchRole",
    "llm.RdmaTrafficClass",
    "llm.RdmaServiceLevel",
    "llm.GlobalResourceConfig",
    "llm.MemoryUtilization",
    "llm.BufPoolCfg",
    "llm.OutputMaxSize",
    "llm.deployResPath",
}
_LLMDIST_KEYS = {
    "llmdist.runtime",
    "llmdist.transfer_workers",
    "llmdist.transport",
    "llmdist.shareable_memory",
    "llmdist.rendezvous_port",
    "llmdist.rendezvous_slots",
    "llmdist.max_inflight_tasks",
    "llmdist.device_copy",
    "llmdist.auth_key",
    "llmdist.auth_key_file",
    "llmdist.notify_queue_depth",
} | limits.OPTION_KEYS
MAX_INFLIGHT_TASKS = 1024  # default of llmdist.max_inflight_tasks

_live: "weakref.WeakSet[LLMDataDist]" = weakref.WeakSet()


@atexit.register
def _finalize_all() -> None:
    for dd in list(_live):
        dd.finalize()


def _int_option(
    options: Dict[str, str], key: str, default: Optional[int], lo: int
) -> Optional[int]:
    text = options.get(key)
    if text is None:
        return default
    try:
        value = int(str(text), 10)
    except ValueError:
        value = None
    if value is None or value < lo:
        raise LLMException(
            f"option {key} must be an integer >= {lo}, got {text!r}",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    return value


def _flag_option(options: Dict[str, str], key: str) -> bool:
    text = str(options.get(key, "0"))
    if text not in ("0", "1"):
        raise LLMException(
            f'option {key} must be "0" or "1", got {text!r}',
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    return text == "1"


def _listen_option(options: Dict[str, str], what: str) -> Optional[Tuple[str, int]]:
    """llm.listenIpInfo of options (init's "option", switch_role's "switch_options") as
    (ip, port); None when it is not set."""
    text = options.get("llm.listenIpInfo")
    if not text:
        return None
    try:
        return parse_ip_port("llm.listenIpInfo", text)
    except (LLMException, ValueError, TypeError) as exc:
        raise LLMException(
            f'{what} llm.listenIpInfo must be "ip:port", got {text!r}',
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        ) from exc


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
        self._node: Optional[ClusterNode] = None
        self._comms: Optional[RankTableLinks] = None
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
        return self.cache_manager.runtime

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
            # Upstream derives the mode: communication resources or a transfer backend switch
            # on remote-accessible mode unless the option says otherwise.
            derived = "llm.LocalCommRes" in options or "llm.TransferBackend" in options
            remote = (
                _flag_option(options, "llm.EnableRemoteCacheAccessible")
                if "llm.EnableRemoteCacheAccessible" in options
                else derived
            )
            max_inflight = _int_option(options, "llmdist.max_inflight_tasks", MAX_INFLIGHT_TASKS, 1)
            _flag_option(options, "llm.EnableSwitchRole")  # read, not needed: see switch_role
            peer_limits = limits.PeerLimits.from_options(options)
            _flag_option(options, "llm.EnableCacheManager")
            if "llm.TransferBackend" in options and not options.get("llm.listenIpInfo"):
                raise LLMException(
                    "option llm.TransferBackend needs llm.listenIpInfo (with a "
                    "transfer backend every cluster listens)",
                    status_code=LLMStatusCode.LLM_PARAM_INVALID,
                )
            listen = _listen_option(options, "option")
            key = auth.load_key(options)
            shareable = listen is not None or _flag_option(options, "llmdist.shareable_memory")
            runtime = runtimes.load(options.get("llmdist.runtime"), device_id)
            runtime.bind_device()
            runtime.select_device_copy(
                options.get("llmdist.device_copy") or os.environ.get("LLMDIST_DEVICE_COPY", "auto")
            )
            notify_depth = _int_option(
                options, "llmdist.notify_queue_depth", notifications.DEFAULT_QUEUE_DEPTH, 1
            )
            node = ClusterNode(
                self._cluster_id,
                self._role,
                listen,
                options.get("llmdist.transport", "auto"),
                runtime,
                peer_limits,
                key,
            )
            node.notifications.queue_depth = notify_depth
            try:
                comms = RankTableLinks(node, self._cluster_id, options)
            except LLMException:
                node.close()
                raise
            workers = TransferWorkers(runtime, nworkers)
            workers.start()
            self._node = node
            self._comms = comms
            self._cache_manager = CacheManager(
                self._cluster_id,
                runtime,
                workers,
                options,
                remote,
                sync_timeout,
                shareable,
                node,
                max_inflight,
            )
            node.attach(self._cache_manager)
            self._workers = workers
            self._options = dict(options)
            _live.add(self)

    def finalize(self) -> None:
        """End every transfer with LLM_ENGINE_FINALIZED, free llmdist-owned memory and stop
        the workers; safe to call twice. init() may be called again afterwards."""
        with self._lock:
            cm, workers, node, comms = (self._cache_manager, self._workers, self._node, self._comms)
            _live.discard(self)
        if comms is not None:
            comms.close()
        if node is not None:
            node.close()
            node.attach(None)
        with self._lock:
            self._cache_manager = None
            self._workers = None
            self._node = None
            self._comms = None
        if cm is not None:
            cm.close()
        if workers is not None:
            workers.shutdown(timeout=2.0)

    @property
    def listen_port(self) -> Optional[int]:
        """The port the control listener is bound to (useful with port 0), or None."""
        node = self._node
        return node.port if node is not None else None

    def peer_info(self, cluster_id: int) -> Optional[Dict[str, object]]:
        """How a linked cluster is reached (an llmdist extension): {"path": "direct" or
        "mooncake", "same_host": bool, "pid": int, "role": the LLMRole its handshake gave};
        None when it is not linked."""
        check_uint64("cluster_id", cluster_id)
        node = self._node
        peer = node.peer(cluster_id) if node is not None else None
        if peer is None:
            return None
        return {
            "path": peer.path.value,
            "same_host": peer.same_host,
            "pid": peer.pid,
            "role": peer.role,
        }

    @staticmethod
    def _check_clusters(clusters, timeout: int) -> None:
        check_isinstance("clusters", clusters, (list, tuple))
        for i, c in enumerate(clusters):
            check_isinstance(f"clusters[{i}]", c, LLMClusterInfo)
        check_isinstance("timeout", timeout, int)
        if timeout <= 0:
            raise LLMException(
                f"timeout must be > 0 ms, got {timeout}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )

    @staticmethod
    def _overall(codes: List[LLMStatusCode]) -> LLMStatusCode:
        return next((c for c in codes if c != LLMStatusCode.LLM_SUCCESS), LLMStatusCode.LLM_SUCCESS)

    def link_clusters(
        self, clusters, timeout: int = 3000
    ) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """Link to each cluster's listener (first remote ip info) within timeout ms; returns
        (overall status, status per cluster) and never raises for a failed link. Without a
        remote_cluster_id the id is learned from the peer. Either side of a pair may call it,
        both at once too: a link the peer made to us counts as made by this call."""
        self._check_clusters(clusters, timeout)
        self.cache_manager
        codes = []
        for c in clusters:
            remote = c.remote_addresses()
            if not remote:
                codes.append(LLMStatusCode.LLM_PARAM_INVALID)
                continue
            codes.append(self._node.link(c.remote_cluster_id, remote[0], timeout))
        return self._overall(codes), codes

    def unlink_clusters(
        self, clusters, timeout: int = 3000, force: bool = False
    ) -> Tuple[LLMStatusCode, List[LLMStatusCode]]:
        """End links (either side may, both too): transfers to the peer end with
        LLM_LINK_FAILED and nothing is written to it after this returns; a cluster never linked
        is LLM_NOT_YET_LINK. An info without remote_cluster_id names the cluster this side
        linked to at its first remote ip info."""
        self._check_clusters(clusters, timeout)
        check_isinstance("force", force, bool)
        self.cache_manager
        codes = []
        for c in clusters:
            cid = c.remote_cluster_id
            if cid is None:
                remote = c.remote_addresses()
                if not remote:
                    codes.append(LLMStatusCode.LLM_PARAM_INVALID)
                    continue
                cid = self._node.find_linked(remote[0])
                if cid is None:
                    codes.append(LLMStatusCode.LLM_NOT_YET_LINK)
                    continue
            codes.append(self._node.unlink(cid, timeout, force))
        return self._overall(codes), codes

    # -- notifications (an llmdist extension; see notifications.py)
    def send_notification(self, cluster_id: int, payload: bytes) -> None:
        """Send payload (at most notifications.MAX_PAYLOAD bytes) to a linked cluster (or this
        one) on the control connection; returns once it is in the receiver's queue. Raises
        LLMException: LLM_NOT_YET_LINK when not linked, LLM_LINK_BUSY when the receiver's
        queue for this cluster is full (llmdist.notify_queue_depth), LLM_LINK_FAILED when the
        link went down first."""
        check_uint64("cluster_id", cluster_id)
        data = notifications.check_payload("payload", payload)
        cm = self.cache_manager
        peer, _ = cm.transfers.notify_target(cluster_id)
        self._node.notifications.send(peer, cluster_id, data).wait()

    def get_notifications(self) -> Dict[int, List[bytes]]:
        """Every notification received since the last call, per sending cluster id, in the
        order they were sent; drains them."""
        self.cache_manager
        return self._node.notifications.drain()

    def wait_notifications(self, timeout_ms: int) -> Dict[int, List[bytes]]:
        """get_notifications after waiting up to timeout_ms for at least one (an empty dict
        when none came)."""
        check_isinstance("timeout_ms", timeout_ms, int)
        if timeout_ms < 0:
            raise LLMException(
                f"timeout_ms must be >= 0, got {timeout_ms}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        self.cache_manager
        return self._node.notifications.wait(timeout_ms / 1000.0)

    # -- rank-table links (see rank_table.py for how members find each other)
    def link(self, comm_name: str, cluster_rank_info: Dict[int, int], rank_table: str) -> int:
        """Start linking every pair of the comm's members (each member makes the same call);
        returns the comm id at once: poll query_register_mem_status until OK. Returns
        LLMStatusCode.LLM_ALREADY_LINK (and starts nothing) when this cluster is already
        linked to one of the members."""
        self.cache_manager
        return self._comms.link(comm_name, cluster_rank_info, rank_table)

    def query_register_mem_status(self, comm_id: int) -> RegisterMemStatus:
        """PREPARING while the comm forms, OK once this cluster is linked to every member (their
        caches known here), FAILED when a member did not arrive in time (reason logged)."""
        check_isinstance("comm_id", comm_id, int)
        check_uint64("comm_id", comm_id)
        self.cache_manager
        return self._comms.status(comm_id)

    def unlink(self, comm_id: int) -> None:
        """End a comm made by link: its members are unlinked (either member may call it first)."""
        check_isinstance("comm_id", comm_id, int)
        check_uint64("comm_id", comm_id)
        self.cache_manager
        self._comms.unlink(comm_id)

    # -- roles
    def _check_no_link(self) -> None:
        """LLM_EXIST_LINK while a link, a link_clusters call or a rank-table comm remains."""
        node = self._node
        with node.lock:
            linked = sorted(node.peers)
            linking = bool(node.linking)
        why = (
            f"still linked to clusters {linked}"
            if linked
            else "a link_clusters call is in progress"
            if linking
            else "a rank-table comm is still forming or linked"
            if self._comms.active
            else None
        )
        if why is not None:
            raise LLMException(
                f"switch_role needs every link ended first; {why}",
                status_code=LLMStatusCode.LLM_EXIST_LINK,
            )

    def switch_role(self, role: LLMRole, switch_options: Optional[Dict[str, str]] = None) -> None:
        """Change this cluster's role, as upstream's current API: no option needed, the same
        role accepted, LLM_EXIST_LINK while any link remains. switch_options
        {"llm.listenIpInfo": "ip:port"} starts or moves the listener; without it the listener
        stops. Handshakes in progress end unadmitted before the links are checked."""
        check_isinstance("role", role, LLMRole)
        check_isinstance("switch_options", switch_options, dict, allow_none=True)
        options = dict(switch_options or {})
        for k, v in options.items():
            check_isinstance("switch_options key", k, str)
            check_isinstance(f"switch_options[{k!r}]", v, str)
        self.cache_manager
        listen = _listen_option(options, "switch_options")
        for key in options:
            if key != "llm.listenIpInfo":
                warnings.warn(f"switch_role ignores the option {key!r}", stacklevel=2)
        node = self._node
        self._check_no_link()  # refused before anything stops
        node.begin_switch()
        try:
            self._check_no_link()  # handshakes that were in progress are gone now
            if listen is not None:
                node.start_listening(listen)
            else:
                node.stop_listening()
            node.role = role
            self._role = role
        finally:
            node.end_switch()
