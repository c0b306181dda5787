"""The cluster side of one LLMDataDist (ClusterNode): its listener, its links to other
clusters, and the announcements of its caches to them.

A cluster with `llm.listenIpInfo` accepts links; `link_clusters` connects to one. The
handshake (handshake.py) gives each side the other's cluster id, role, runtime and caches; a
linked cluster is a Peer (peer.py), whose path (data_path.py) says how this process reaches its
memory. Caches go over the wire as wire.py writes them, each with its share (shares.py). On a
device runtime the same-host path is device IPC (device_ipc.py): exports whitelist the peer's
kernel-named pid; the side that linked sends "ipc_ready" once it has whitelisted the listener,
and the listener imports the linker's caches only after that. The listener's side of the
handshake is admission.py; every control frame is a typed message of frames.py."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from . import _core, auth, notifications
from .admission import Admission
from .auth import MAGIC, MAX_FRAME, AuthError, ProtocolError
from .data_path import TRANSPORTS, PeerPath, choose_path
from .descs import LLMRole
from .engine_ranges import EngineRanges
from .frames import (
    PROTOCOL_VERSION,
    CacheAdd,
    CacheRemove,
    Hello,
    KeyRemove,
    LinkFrame,
    Refuse,
    Unlink,
)
from .handshake import (
    HANDSHAKE_TIMEOUT_S,
    MAX_HANDSHAKES,
    Listener,
    client_handshake,
    host_identity,
    open_channel,
)
from .handshake_slots import HandshakeSlots
from .limits import PeerLimits
from .peer import ACK_TIMEOUT_S, Peer
from .registry import MemoryEntry
from .status import LLMException, LLMStatusCode
from .wire import cache_to_wire

if TYPE_CHECKING:
    from .cache_manager import CacheManager

log = logging.getLogger(__name__)

# the names other modules and tests reach through this one
__all__ = [
    "ACK_TIMEOUT_S",
    "MAGIC",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "AuthError",
    "ClusterNode",
    "Peer",
    "ProtocolError",
    "cache_to_wire",
    "host_identity",
]


class ClusterNode(Admission):
    """The cluster side of one LLMDataDist: its listener (Admission), links and announcements.
    The cache manager it serves is attached once it exists (attach)."""

    def __init__(
        self,
        cluster_id: int,
        role: LLMRole,
        listen: Optional[Tuple[str, int]],
        transport: str,
        runtime: Optional["_core.Runtime"] = None,
        limits: Optional[PeerLimits] = None,
        key: Optional[bytes] = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise LLMException(
                f"option llmdist.transport must be one of {', '.join(TRANSPORTS)}, "
                f"got {transport!r}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        self.cluster_id = cluster_id
        self.role = role
        self.limits = limits if limits is not None else PeerLimits()
        self.key = key  # the shared key (llmdist.auth_key), or None
        self.caches: Optional["CacheManager"] = None
        self.transport = transport
        self.runtime = runtime if runtime is not None else _core.Runtime.host()
        try:
            self.tgid = self.runtime.bare_tgid()
        except LLMException as exc:
            log.warning(
                "the runtime could not tell the pid peers allow for device IPC; they "
                "allow pid %d: %s",
                os.getpid(),
                exc,
            )
            self.tgid = os.getpid()
        self.host = host_identity()
        self.lock = threading.Lock()
        self.peers: Dict[int, Peer] = {}
        self.linking: set = set()  # cluster ids link() is connecting to right now
        self.accepting: set = set()  # cluster ids whose link is being accepted
        self.ever_linked: set = set()  # every cluster id linked since start
        self.listener: Optional[Listener] = None
        self.port: Optional[int] = None
        self.closed = False
        self.engine = None  # MooncakeTransport, made on first need
        self.engine_error: Optional[str] = None  # why the last attempt to start it failed
        self.engine_lock = threading.Lock()
        self.engine_ranges = EngineRanges()  # what is registered with the engine
        self.handshakes = HandshakeSlots(MAX_HANDSHAKES, self.limits.handshakes_per_address)
        # Handshakes in progress (connection -> the admission epoch it started in). A role
        # switch moves to a new epoch and admits nothing while it runs, so that no handshake
        # begun before it completes after it.
        self.in_handshake: Dict[socket.socket, int] = {}
        self.epoch = 0
        self.switching = False
        # notified when a peer is added or removed, an accept ends or a handshake ends
        self.changed = threading.Condition(self.lock)
        self.notifications = notifications.Notifications(cluster_id)
        # called with the cluster id of each accepted link once it is complete
        self.ready_hooks: List[Callable[[int], None]] = []
        if listen is not None:
            self.start_listening(listen)

    def choose_path(self, same_host: bool, peer_wants_engine: bool = False) -> PeerPath:
        """The path to a peer (see data_path.choose_path) under this node's llmdist.transport."""
        return choose_path(self.transport, same_host, peer_wants_engine)

    def ensure_engine(self, local_ip: str) -> None:
        """Start the Mooncake engine (once) and register every cache with it. On failure keep
        the reason, which a transfer that needs the engine reports; the next link that needs
        the engine tries again."""
        with self.engine_lock:
            if self.engine is not None:
                return
            try:
                from .transport_mooncake import MooncakeTransport

                engine = MooncakeTransport(local_ip)
            except LLMException as exc:
                self.engine_error = str(exc)
                return
            with self.lock:
                self.engine, self.engine_error = engine, None
        cm = self.caches
        if cm is not None:
            for e in cm.entries():
                self._engine_register(e)

    def _engine_register(self, entry: MemoryEntry) -> None:
        """Register entry's memory with the engine, if one runs (see EngineRanges.register)."""
        engine = self.engine
        if engine is not None:
            self.engine_ranges.register(engine, entry)

    def _engine_unregister(self, entry: MemoryEntry) -> None:
        """Withdraw entry's memory from the engine once no other cache uses the range."""
        engine = self.engine
        if engine is not None:
            self.engine_ranges.unregister(engine, entry)

    def allow_imports(self, peer: Peer) -> None:
        """Let a peer on this host import the DEVICE caches this cluster exports."""
        cm = self.caches
        if peer.tgid > 0 and cm is not None:
            cm.allow_importer(peer.tgid)

    def peer(self, cluster_id: int) -> Optional[Peer]:
        """The linked peer cluster_id (its handshake complete), or None."""
        with self.lock:
            p = self.peers.get(cluster_id)
        return p if p is not None and p.ready.is_set() else None

    def attach(self, caches: Optional["CacheManager"]) -> None:
        """Serve caches (the cluster's CacheManager), or none (None) once it is finalized."""
        self.caches = caches

    def cancel_transfers_to(self, cluster_id: int, cache_id: Optional[int], code) -> None:
        """End this cluster's transfers writing to a peer's cache (any of its caches when
        cache_id is None)."""
        cm = self.caches
        if cm is not None:
            cm.cancel_transfers_to(cluster_id, cache_id, code)

    def caches_on_wire(self, fds: Optional[List[int]]) -> List[dict]:
        """This cluster's caches as sent to a peer (fds: see wire.cache_to_wire)."""
        cm = self.caches
        if cm is None:
            return []
        return [cache_to_wire(e, fds) for e in cm.entries()]

    def _hello(
        self,
        target: Optional[int],
        fds: Optional[List[int]] = None,
        caches: bool = True,
        comm: Optional[str] = None,
    ) -> Hello:
        """This side's handshake message; its caches (with their memfds added to fds, on a
        Unix socket) unless caches is False; comm: the rank-table comm of the link."""
        engine = self.engine
        return Hello(
            self.cluster_id,
            self.role,
            target,
            self.host,
            self.runtime.name,
            self.caches_on_wire(fds) if caches else [],
            self.transport == "mooncake",
            mooncake=engine.session_id if engine is not None else None,
            engine_error=self.engine_error if engine is None else None,
            comm=comm,
        )

    # -- linking
    def _claim(self, cluster_id: Optional[int]) -> Optional[LLMStatusCode]:
        """A link to cluster_id that already exists counts as made by this side's call, unless
        this side already made it; None when there is no such link."""
        with self.lock:
            peer = self.peers.get(cluster_id) if cluster_id is not None else None
        if peer is None:
            return None
        peer.ready.wait(HANDSHAKE_TIMEOUT_S)  # an accepted link finishes its handshake
        with self.lock:
            if self.peers.get(cluster_id) is not peer or not peer.ready.is_set():
                return None
            if peer.linked_here:
                return LLMStatusCode.LLM_ALREADY_LINK
            peer.linked_here = True
            return LLMStatusCode.LLM_SUCCESS

    def _await_peer_link(
        self, cluster_id: Optional[int], deadline: float
    ) -> Optional[LLMStatusCode]:
        """After the peer refused our connection because it is linking to us itself, wait for
        its link to arrive here and claim it."""
        while True:
            got = self._claim(cluster_id)
            if got is not None or time.monotonic() >= deadline:
                return got
            with self.lock:
                while self.peers.get(cluster_id) is None:  # its link has not arrived yet
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self.changed.wait(left)

    def link(
        self,
        cluster_id: Optional[int],
        address: Tuple[str, int],
        timeout_ms: int,
        comm: Optional[str] = None,
    ) -> LLMStatusCode:
        """Link to a listening cluster (cluster_id None: learn it in the handshake); returns a
        status and never raises for a failed link. A link the peer already made to us counts
        as made by this call (both sides may call link_clusters). comm names the rank-table
        comm the link belongs to (its listener checks it)."""
        deadline = time.monotonic() + timeout_ms / 1000.0
        while cluster_id is not None:
            # an accept of the same peer in progress finishes first, then decides
            got = self._claim(cluster_id)
            if got is not None:
                return got
            with self.lock:
                while cluster_id in self.accepting and cluster_id not in self.peers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return LLMStatusCode.LLM_LINK_FAILED
                    self.changed.wait(left)
                if cluster_id not in self.accepting and cluster_id not in self.peers:
                    self.linking.add(cluster_id)
                    break
            if time.monotonic() >= deadline:  # linked meanwhile: claim it (above)
                return LLMStatusCode.LLM_LINK_FAILED
        try:
            code, peer = self._connect(cluster_id, address, timeout_ms, comm)
        finally:
            if cluster_id is not None:
                with self.lock:
                    self.linking.discard(cluster_id)
        if peer is not None:
            peer.address = address
        return code

    def _connect(
        self,
        cluster_id: Optional[int],
        address: Tuple[str, int],
        timeout_ms: int,
        comm: Optional[str],
    ) -> Tuple[LLMStatusCode, Optional[Peer]]:
        deadline = time.monotonic() + timeout_ms / 1000.0
        name = "?" if cluster_id is None else cluster_id
        key = auth.comm_key(self.key, comm) if comm is not None else self.key
        try:
            chan, challenge = open_channel(address, key, self.host, deadline)
        except (OSError, ProtocolError) as exc:
            log.info(
                "link to cluster %s at %s:%d failed: %s: %s",
                name,
                *address,
                type(exc).__name__,
                exc,
            )
            return LLMStatusCode.LLM_LINK_FAILED, None
        sock = chan.sock
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if self.transport == "mooncake":
                self.ensure_engine(chan.local_ip)
            hello = self._hello(cluster_id, caches=False, comm=comm)
            peer = client_handshake(self, chan, challenge, hello, key, cluster_id, deadline)
            if isinstance(peer, Refuse):
                sock.close()
                return self._refused(peer, cluster_id, name, deadline), None
        except Exception as exc:  # noqa: BLE001 - a failed link is a status, whatever the cause
            log.info("link to cluster %s failed: %s: %s", name, type(exc).__name__, exc)
            sock.close()
            return LLMStatusCode.LLM_LINK_FAILED, None
        cid = peer.cluster_id
        with self.lock:
            if self.closed or cid in self.peers:
                peer.closed = True
                sock.close()
                return (
                    LLMStatusCode.LLM_ALREADY_LINK
                    if not self.closed
                    else LLMStatusCode.LLM_LINK_FAILED
                ), None
            peer.linked_here = True
            peer.ready.set()
            self.peers[cid] = peer
            self.ever_linked.add(cid)
            self.changed.notify_all()
        threading.Thread(target=peer.serve, name=f"llmdist-peer-{cid}", daemon=True).start()
        return LLMStatusCode.LLM_SUCCESS, peer

    def _refused(
        self, refusal: Refuse, cluster_id: Optional[int], name, deadline: float
    ) -> LLMStatusCode:
        """The status of a link the listener refused."""
        code = refusal.code
        log.info("cluster %s refused the link: %s", name, refusal.reason)
        if code not in (
            int(LLMStatusCode.LLM_ALREADY_LINK),
            int(LLMStatusCode.LLM_PROCESSING_LINK),
        ):
            return LLMStatusCode.LLM_LINK_FAILED
        # The peer holds a link to us (or is making one): if it is ours to claim, this call
        # made it.
        theirs = refusal.cluster_id
        if theirs is None or (cluster_id is not None and theirs != cluster_id):
            return LLMStatusCode.LLM_LINK_FAILED
        if code == int(LLMStatusCode.LLM_PROCESSING_LINK):
            got = self._await_peer_link(theirs, deadline)
            return LLMStatusCode.LLM_LINK_FAILED if got is None else got
        got = self._claim(theirs)
        return LLMStatusCode.LLM_ALREADY_LINK if got is None else got

    def find_linked(self, address: Tuple[str, int]) -> Optional[int]:
        """The cluster this side linked to at address (for infos without a cluster id)."""
        with self.lock:
            for cid, p in self.peers.items():
                if p.address == address:
                    return cid
        return None

    def unlink(self, cluster_id: int, timeout_ms: int, force: bool) -> LLMStatusCode:
        """End a link from this side. The peer stops writing here and acknowledges before this
        returns (within timeout_ms); transfers from here to the peer end too. Without the
        acknowledgement the result is LLM_UNLINK_FAILED, or LLM_SUCCESS with force. A link
        the peer already ended (its own unlink, or it went away) is LLM_SUCCESS too; only a
        cluster never linked is LLM_NOT_YET_LINK."""
        with self.lock:
            peer = self.peers.pop(cluster_id, None)
            known = cluster_id in self.ever_linked
            self.changed.notify_all()
        if peer is None:
            return LLMStatusCode.LLM_SUCCESS if known else LLMStatusCode.LLM_NOT_YET_LINK
        peer.stop(LLMStatusCode.LLM_LINK_FAILED)  # our imports of its memory close first
        acked = peer.request(Unlink(), timeout_ms / 1000.0)
        peer.close(LLMStatusCode.LLM_LINK_FAILED)
        ok = acked or force or peer.peer_unlinked
        return LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_UNLINK_FAILED

    def link_down(self, peer: Peer, code, ack: Optional[int] = None) -> None:
        with self.lock:
            if self.peers.get(peer.cluster_id) is peer:
                del self.peers[peer.cluster_id]
                self.changed.notify_all()
        peer.close(code, ack)

    # -- announcements (called without the cache manager's lock)
    def _each_peer(self, frame: Optional[LinkFrame], cache: Optional[MemoryEntry] = None) -> None:
        """Send frame to every peer at once and wait for their acks until one deadline
        (llmdist.ack_timeout_ms); a peer that misses it is unlinked. With cache (and no frame)
        each peer gets a CacheAdd of that cache as the peer may see it (its memfd goes along
        on a Unix socket)."""
        with self.lock:
            peers = list(self.peers.values())
        if not peers:
            return
        deadline = time.monotonic() + self.limits.ack_timeout_s
        sent = []
        for p in peers:
            f, fds = frame, None
            if cache is not None:
                fds = [] if p.chan.unix else None
                f = CacheAdd(cache_to_wire(cache, fds))
            sent.append((p, f, p.post(f, deadline, fds or ())))
        for p, f, seq in sent:
            if (seq is None or not p.await_ack(seq, deadline)) and not p.closed:
                log.warning(
                    "cluster %d did not acknowledge %s within %.0f ms (option "
                    "llmdist.ack_timeout_ms): unlinking it",
                    p.cluster_id,
                    f.TYPE,
                    self.limits.ack_timeout_s * 1000,
                )
                self.link_down(p, LLMStatusCode.LLM_LINK_FAILED)

    def announce_cache(self, entry: Optional[MemoryEntry]) -> None:
        if entry is not None:
            self._engine_register(entry)
            self._each_peer(None, entry)

    def withdraw_cache(self, entry: MemoryEntry) -> None:
        self._each_peer(CacheRemove(entry.cache.cache_id))
        self._engine_unregister(entry)

    def withdraw_key(self, key) -> None:
        self._each_peer(KeyRemove(key))

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Unlink every peer (each stops writing here before it acknowledges; bounded by
        timeout_s in all, by default llmdist.ack_timeout_ms) and stop listening."""
        with self.lock:
            self.closed = True
            peers = list(self.peers.values())
            self.peers.clear()
            self.changed.notify_all()
        for p in peers:
            p.stop(LLMStatusCode.LLM_LINK_FAILED)  # before the peers hear of it (see unlink)
        deadline = time.monotonic() + (
            self.limits.ack_timeout_s if timeout_s is None else timeout_s
        )
        sent = [(p, p.post(Unlink(), deadline)) for p in peers]
        for p, seq in sent:
            if seq is not None:
                p.await_ack(seq, deadline)
        for p in peers:
            p.close(LLMStatusCode.LLM_LINK_FAILED)
        self.stop_listening()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self.engine_ranges.clear()
