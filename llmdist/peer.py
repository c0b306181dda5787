"""A linked cluster as this side sees it (Peer): its control connection, the caches it exposes
and how this process reaches them.

The connection carries small JSON frames only (auth.py), each a typed message of frames.py:
cache announcements and withdrawals (acknowledged, so that a peer knows a cache before a
transfer can target it and has stopped writing into it before the owner lets it go), the
release of a CacheKey a pull used (KeyPulled), notifications, IpcReady and Unlink. When it
closes, the link is down: transfers to the peer end with LLM_LINK_FAILED and nothing more is
written.

Who the peer is on this host comes from the kernel (SO_PEERCRED on the listener's Unix
socket), never from its hello. Its path (data_path.py) is chosen at the handshake; each cache's
share (shares.py) says how this process reaches it on that path: a memfd mapped here, process
transfers, or a device IPC export imported on first use (once the peer sent "ipc_ready" when it
linked to us: it whitelisted our pid first)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace
from typing import Dict, List, Optional, Tuple, Union

from . import _core, device_ipc
from .auth import Channel, ProtocolError
from .data_path import PeerPath
from .descs import CacheKey, LLMRole, Placement
from .frames import (
    Ack,
    CacheAdd,
    CacheRemove,
    Hello,
    IpcReady,
    Key,
    KeyPulled,
    KeyRemove,
    LinkFrame,
    Notify,
    NotifyReply,
    Unlink,
    link_frame,
)
from .registry import REGISTERED, ClusterMemory, MemoryEntry, Region
from .route_rules import Access, RouteKind
from .routes import EngineRoute, ImportNeeded, MappedRoute, ProcessRoute, Route
from .shares import DeviceIpcShare, DeviceIpcTensors, MemfdShare, Unshared
from .status import LLMException, LLMStatusCode
from .wire import cache_from_wire

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0  # default wait for a peer's ack of a request

DeviceShare = Union[DeviceIpcShare, DeviceIpcTensors]
Delta = Union[int, Tuple[int, ...]]  # one per cache, or one per tensor (registered tensors)


class Peer:
    """A linked cluster: its control connection, the caches it exposes, and the data path."""

    def __init__(self, node, chan: Channel, hello: Hello, fds: List[int] = ()) -> None:
        self.node = node
        self.chan = chan
        self.sock = chan.sock
        self.cluster_id: int = hello.cluster_id
        self.role: LLMRole = hello.role
        self.runtime: str = hello.runtime
        # Who the peer is comes from the kernel, never from its hello: over the Unix socket the
        # peer's pid and uid are SO_PEERCRED's; over TCP this side knows no process of it.
        creds = chan.peer_creds()
        self.same_host = creds is not None
        self.pid: int = creds[0] if creds is not None and creds[0] > 0 else 0
        self.uid: Optional[int] = creds[1] if creds is not None else None
        # Process writes and reads reach only a process of our own uid that the kernel named.
        self.no_process_route: Optional[str] = None
        if not self.same_host:
            self.no_process_route = (
                "it is not known to be a process of this host (linked over "
                "TCP, not the listener's Unix socket)"
            )
        elif self.pid == 0:
            self.no_process_route = "its process is outside this process's pid namespace"
        elif self.uid != os.geteuid():
            self.no_process_route = (
                f"its process runs as uid {self.uid}, this one as uid {os.geteuid()}"
            )
        self.tgid: int = self.pid  # the pid device-IPC exports whitelist (kernel-verified)
        # cache id -> why this process cannot reach that cache of the peer
        self.unreachable: Dict[int, str] = {}
        self.path: PeerPath = node.choose_path(self.same_host, hello.want_engine)
        self.engine_session: Optional[str] = hello.mooncake
        self.link = _core.LinkFlag(self.pid, chan.peer_pidfd() if self.pid > 0 else -1)
        self.mem = ClusterMemory()
        self.mappings: Dict[int, Tuple[int, int]] = {}  # cache id -> (local address, size)
        # cache id -> (share, delta or one delta per tensor)
        self.imports: Dict[int, Tuple[DeviceShare, Delta]] = {}
        # Set once the peer may be imported from: at once when we linked to it (it whitelisted
        # us before its welcome), on its "ipc_ready" when it linked to us.
        self.ipc_ready = threading.Event()
        # Set once the handshake is complete, each side knowing the other's caches: an accepted
        # peer is registered before its caches arrive (so that no announcement misses it) and
        # counts as linked only from then on.
        self.ready = threading.Event()
        self.send_lock = chan.send_lock
        self.lock = threading.Lock()
        self.acks: Dict[int, threading.Event] = {}
        self.acked: set = set()
        self.seq = 0
        self.stopping = False  # stop() began: nothing new is mapped or imported
        self.stopped = threading.Event()  # stop() finished
        self.closed = False
        # This side's link_clusters made (or claimed) the link: a second call is LLM_ALREADY_LINK.
        self.linked_here = False
        self.peer_unlinked = False  # the peer asked to unlink (its unlink_clusters)
        self.address: Optional[Tuple[str, int]] = None  # where we reached it, when we linked
        self.engine_error: Optional[str] = hello.engine_error
        try:
            self.add_caches(hello.caches, fds)
        except BaseException:
            self._unmap_all()
            raise

    # -- memory the peer exposes
    def add_caches(self, ws: list, fds: List[int] = ()) -> None:
        """Record the caches of a hello or of a Caches frame (a checked list of wire objects)."""
        for w in ws:
            self.add_cache(w, fds)

    def add_cache(self, w: object, fds: List[int] = ()) -> None:
        """Record a cache the peer announced; fds are the descriptors that came with the frame
        (the caller closes them: a mapping outlives its descriptor)."""
        entry, keys = cache_from_wire(w, fds)
        cid = entry.cache.cache_id
        delta = pid = 0
        why = None
        share = entry.share
        if self.path is PeerPath.DIRECT:
            if isinstance(share, MemfdShare):
                # the descriptor is the frame's, closed after it: the mapping outlives it
                entry.share = replace(share, fd=-1)
                try:
                    local = _core.memfd_map(share.fd, entry.size)
                except LLMException as exc:
                    raise ProtocolError(f"peer cache {cid}: {exc}") from None
                self.mappings[cid] = (local, entry.size)
                delta = local - entry.base
            elif not isinstance(share, (DeviceIpcShare, DeviceIpcTensors)):
                # device IPC exports are imported on first use instead
                pid = self.pid
                if self.no_process_route is not None:
                    pid, why = (
                        0,
                        (
                            f"process transfers with cluster {self.cluster_id} are "
                            f"refused: {self.no_process_route}"
                        ),
                    )
        refused = None
        with self.lock:
            self._check_caps(cid, len(keys))
            old = self.mem.remove(cid)
            try:
                self.mem.add(entry, keys, delta, pid)
            except LLMException as exc:
                refused = exc
            else:
                if why is None:
                    self.unreachable.pop(cid, None)
                else:
                    self.unreachable[cid] = why
        if refused is not None:
            self._unmap(cid)
            raise ProtocolError(f"peer cache {cid}: {refused}") from None
        if old is not None:
            log.warning("cluster %d announced cache %d twice", self.cluster_id, cid)

    def _check_caps(self, cid: int, nkeys: int) -> None:
        """Refuse a cache over the caps of llmdist.max_peer_caches / llmdist.max_peer_keys
        (self.lock held; an announcement again of cache cid replaces it)."""
        limits = self.node.limits
        mem = self.mem
        old = mem.entries.get(cid)
        if old is None and len(mem.entries) >= limits.max_caches:
            raise ProtocolError(
                f"cluster {self.cluster_id} announced more than "
                f"{limits.max_caches} caches (option llmdist.max_peer_caches)"
            )
        keys = len(mem.cache_keys) + len(mem.blocks_keys) + nkeys
        if old is not None:
            keys -= len(old.keys)
        if keys > limits.max_keys:
            raise ProtocolError(
                f"cluster {self.cluster_id} announced more than "
                f"{limits.max_keys} cache keys (option llmdist.max_peer_keys)"
            )

    def remove_cache(self, cid: int) -> None:
        with self.lock:
            self.mem.remove(cid)
            self.unreachable.pop(cid, None)
        self.node.cancel_transfers_to(self.cluster_id, cid, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)
        self._unmap(cid)

    def remove_key(self, key: Key) -> None:
        with self.lock:
            self.mem.remove_key(key)

    def key_pulled(self, key: Key) -> None:
        """The peer pulled by a CacheKey of this cluster, which releases the key (as upstream).
        Taken here; withdrawn from peers on another thread, since that waits for every peer's
        ack, this one's included, which this reader thread delivers."""
        cm = self.node.caches
        if not isinstance(key, CacheKey) or key.cluster_id != self.node.cluster_id or cm is None:
            raise ProtocolError(
                f"cluster {self.cluster_id} released key {key!r:.80}, which is "
                f"not a CacheKey of this cluster"
            )
        # a key no cache holds (released already, or never ours) costs nothing: no thread
        taken = cm.take_key(key)
        if taken is not None:
            threading.Thread(
                target=cm.finish_key_release,
                args=(key, taken),
                name="llmdist-key-release",
                daemon=True,
            ).start()

    def pulled_by_key(self, key: CacheKey) -> None:
        """After a pull by key from this peer: forget the key here and tell the peer."""
        with self.lock:
            self.mem.remove_key(key)
        try:
            self.send(KeyPulled(key))
        except OSError as exc:
            log.info("cluster %d: could not report a pulled key: %s", self.cluster_id, exc)

    def _unmap(self, cid: int) -> None:
        """Forget how this process reaches the peer's cache cid: unmap its shared memory, close
        its device IPC import. The caller has ended the transfers writing into it."""
        with self.lock:
            m = self.mappings.pop(cid, None)
            imp = self.imports.pop(cid, None)
        if m is not None:
            _core.shm_unmap(*m)
        if imp is not None:
            device_ipc.release_share(self.node.runtime, imp[0])

    def _unmap_all(self) -> None:
        with self.lock:
            cids = set(self.mappings) | set(self.imports)
        for cid in cids:
            self._unmap(cid)

    def access(self, entry: MemoryEntry, runtime: "_core.Runtime") -> Tuple[Access, str]:
        """How this process can reach the peer's cache entry, and why not when it cannot
        (route_rules.choose_route decides what that allows)."""
        cid = entry.cache.cache_id
        where = f"cache {cid} of cluster {self.cluster_id}"
        if not runtime.is_host:
            return self._device_access(entry, runtime, where)
        if self.path is PeerPath.MOONCAKE:
            return Access.ENGINE, ""
        why = self.unreachable.get(cid)
        if why is not None:
            return Access.NONE, f"{where} cannot be reached from this process: {why}"
        if cid in self.mappings:
            return Access.SHARED_MEMORY, ""
        return Access.PROCESS, ""

    def _device_access(
        self, entry: MemoryEntry, runtime: "_core.Runtime", where: str
    ) -> Tuple[Access, str]:
        """Access on a device runtime, which reaches other processes through device IPC only."""
        if self.path is PeerPath.MOONCAKE or not self.same_host:
            how = (
                "through Mooncake Transfer Engine"
                if self.path is PeerPath.MOONCAKE
                else "on another host"
            )
            return Access.NONE, (
                f"cluster {self.cluster_id} is reached {how}; on the "
                f"{runtime.name} runtime transfers to another process use device "
                f"IPC, which works between processes of one host only"
            )
        why = runtime.ipc_unavailable
        if why is not None:
            return Access.NONE, (
                f"transfers to another process on the {runtime.name} runtime "
                f"need device IPC, which is not available: {why}"
            )
        if entry.placement != Placement.DEVICE:
            return Access.PROCESS, ""  # HOST memory of another process: no device IPC
        share = entry.share
        if entry.origin == REGISTERED and not isinstance(share, DeviceIpcTensors):
            reason = "the peer did not export it"
            if isinstance(share, Unshared) and share.reason:
                reason = share.reason
            return Access.NONE, (
                f"{where} is DEVICE memory the peer registered (not allocated by "
                f"llmdist) that cannot be exported for device IPC: {reason}; register memory from "
                f"the runtime's own allocator (cudaMalloc, not expandable segments; on "
                f"ACL page-aligned tensors), or allocate the destination with "
                f"allocate_cache or allocate_blocks_cache"
            )
        kind = share.kind if share is not None else None
        if kind != runtime.ipc_kind:
            if isinstance(share, Unshared) and share.reason:
                why = share.reason
            elif isinstance(share, (DeviceIpcShare, DeviceIpcTensors)):
                why = (
                    f"it is exported as {share.kind.value}, this cluster runs the "
                    f"{runtime.name} runtime"
                )
            else:
                why = (
                    "the peer did not export it (a cluster exports its DEVICE caches when it "
                    "listens or sets llmdist.shareable_memory=1)"
                )
            return Access.NONE, f"{where} cannot be written through device IPC: {why}"
        return Access.DEVICE_IPC, ""

    def _import_delta(self, entry: MemoryEntry) -> Optional[int]:
        """What turns the peer's address of cache entry into the one its device IPC import has
        here; None when it is not imported (or was exported anew since). self.lock held."""
        got = self.imports.get(entry.cache.cache_id)
        if got is None or got[0] != entry.share:
            return None
        return got[1]

    def route_to(self, kind: RouteKind, regions: List[Region], runtime: "_core.Runtime") -> Route:
        """The route of kind to the peer's memory holding regions (self.lock held); no side
        effects. Raises ImportNeeded naming the device IPC exports to import first."""
        if kind is RouteKind.ENGINE:
            return EngineRoute(self.link, self.node.engine, self.engine_session)
        if kind is RouteKind.PROCESS:
            return ProcessRoute(self.link, self.pid)
        deltas: Dict[int, Delta] = {}
        cache = None
        if not runtime.is_host:
            missing = []
            single = False
            for r in regions:
                cid = r.cache.cache_id
                if cid not in deltas:
                    entry = self.mem.entries[cid]
                    delta = self._import_delta(entry)
                    if delta is None:
                        missing.append(entry)
                        delta = 0
                    deltas[cid] = delta
                    single |= entry.share.device != runtime.device_id
            if missing:
                raise ImportNeeded(self, missing)
            return MappedRoute(self.link, deltas, single)
        for r in regions:
            if r.cache is not cache:  # the regions of one cache come in a row
                cache = r.cache
                deltas[cache.cache_id] = r.delta
        return MappedRoute(self.link, deltas)

    def import_device(self, entries: List[MemoryEntry], runtime: "_core.Runtime") -> None:
        """Open this process's device IPC imports of the peer's caches entries (what route_to
        asked for); call it holding no cache manager lock. A cache announced again since is
        imported anew."""
        for entry in entries:
            cid = entry.cache.cache_id
            with self.lock:
                if self.mem.entries.get(cid) is not entry or self._import_delta(entry) is not None:
                    continue  # withdrawn or re-announced meanwhile, or imported already
                if self.stopping:
                    raise LLMException(
                        f"the link to cluster {self.cluster_id} is down",
                        status_code=LLMStatusCode.LLM_NOT_YET_LINK,
                    )
                stale = self.imports.pop(cid, None)
            if stale is not None:
                device_ipc.release_share(runtime, stale[0])
            share = entry.share
            delta = device_ipc.acquire_share(runtime, share)
            with self.lock:
                keep = (
                    self.mem.entries.get(cid) is entry
                    and not self.stopping
                    and cid not in self.imports
                )
                if keep:
                    self.imports[cid] = (share, delta)
            if not keep:
                device_ipc.release_share(runtime, share)

    def await_ipc_ready(self, runtime: "_core.Runtime") -> None:
        """On a device runtime, wait (up to ACK_TIMEOUT_S) until the peer confirmed that this
        process may import its memory; call it holding no lock, before link_refusal."""
        if not runtime.is_host and self.same_host and self.path is not PeerPath.MOONCAKE:
            self.ipc_ready.wait(ACK_TIMEOUT_S)

    def link_refusal(self, runtime: "_core.Runtime") -> Optional[LLMException]:
        """Why the link carries no transfer now (down, device IPC not confirmed, Mooncake
        engine missing), or None; it does not wait (see await_ipc_ready)."""
        if not self.link.is_up:
            return LLMException(
                f"the link to cluster {self.cluster_id} is down",
                status_code=LLMStatusCode.LLM_NOT_YET_LINK,
            )
        if not runtime.is_host:
            if (
                self.same_host
                and self.path is not PeerPath.MOONCAKE
                and runtime.ipc_unavailable is None
                and not self.ipc_ready.is_set()
            ):
                return LLMException(
                    f"cluster {self.cluster_id} did not confirm within "
                    f"{ACK_TIMEOUT_S:.0f} s that this process may import its "
                    f"device memory",
                    status_code=LLMStatusCode.LLM_LINK_FAILED,
                )
            return None
        if self.path is PeerPath.MOONCAKE and (
            self.node.engine is None or self.engine_session is None
        ):
            why = self.node.engine_error or (
                f"cluster {self.cluster_id} has no Mooncake engine: "
                f"{self.engine_error or 'it did not start one'}"
            )
            return LLMException(
                f"cluster {self.cluster_id} is reached through Mooncake Transfer "
                f"Engine, which is not available: {why}",
                status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            )
        return None

    # -- messages
    def send(self, frame: LinkFrame, fds: List[int] = (), deadline: Optional[float] = None) -> None:
        self.chan.send(frame.to_wire(), fds, deadline=deadline)

    def request(
        self, frame: LinkFrame, timeout: float = ACK_TIMEOUT_S, fds: List[int] = ()
    ) -> bool:
        """Send frame and wait for the peer's ack; False if none came in time or the link
        broke."""
        deadline = time.monotonic() + timeout
        seq = self.post(frame, deadline, fds)
        return seq is not None and self.await_ack(seq, deadline)

    def post(self, frame: LinkFrame, deadline: float, fds: List[int] = ()) -> Optional[int]:
        """Send frame as a request (numbered anew) by deadline without waiting for its ack: its
        sequence number for await_ack, or None when it could not be sent in time."""
        with self.lock:
            self.seq += 1
            seq = self.seq
            self.acks[seq] = threading.Event()
        try:
            self.send(replace(frame, seq=seq), fds, deadline)
        except OSError:
            with self.lock:
                self.acks.pop(seq, None)
            return None
        return seq

    def await_ack(self, seq: int, deadline: float) -> bool:
        """Wait until deadline for the ack of the request seq; False if none came or the link
        broke."""
        with self.lock:
            ev = self.acks.get(seq)
        if ev is not None:
            ev.wait(max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.acks.pop(seq, None)
            got = seq in self.acked
            self.acked.discard(seq)
        return got

    def serve(self) -> None:
        """Read the peer's messages until the connection ends, then take the link down."""
        rate = self.node.limits.frame_rate
        tokens, last = float(rate), time.monotonic()
        try:
            self.sock.settimeout(None)
            while True:
                msg, fds = self.chan.recv()
                try:
                    frame = link_frame(msg)
                    # At most llmdist.peer_frame_rate frames a second (as a burst too): a
                    # faster peer waits, its frames in the socket's bounded buffers. Acks of
                    # our own requests are bounded by those and do not count.
                    if not isinstance(frame, Ack) or frame.seq not in self.acks:
                        now = time.monotonic()
                        tokens = min(float(rate), tokens + (now - last) * rate)
                        last = now
                        if tokens < 1.0:
                            time.sleep((1.0 - tokens) / rate)
                            tokens = 1.0
                            last = time.monotonic()
                        tokens -= 1.0
                    if self.handle(frame, fds):
                        return
                finally:
                    self.chan.close_fds(fds)
        except (ConnectionError, OSError, ProtocolError) as exc:
            if not self.closed:
                log.info("link to cluster %d ended: %s", self.cluster_id, exc)
        except Exception:  # a bug must still take the link down cleanly
            log.exception("link to cluster %d failed", self.cluster_id)
        finally:
            self.node.link_down(self, LLMStatusCode.LLM_LINK_FAILED)
            self.chan.close_fds()

    def handle(self, frame: LinkFrame, fds: List[int]) -> bool:
        """Act on one frame of the peer; True when the link ended."""
        seq = frame.seq
        if isinstance(frame, Ack):
            with self.lock:
                ev = self.acks.get(seq)
                if ev is not None:
                    self.acked.add(seq)
            if ev is not None:
                ev.set()
            return False
        if isinstance(frame, IpcReady):
            self.ipc_ready.set()
            return False
        if isinstance(frame, Unlink):
            # Stop writing to the peer before it hears back, then hang up.
            self.peer_unlinked = True
            self.node.link_down(self, LLMStatusCode.LLM_LINK_FAILED, ack=seq)
            return True
        if isinstance(frame, (Notify, NotifyReply)):
            self.node.notifications.handle(self, frame)
            return False
        if isinstance(frame, CacheAdd):
            self.add_cache(frame.cache, fds)
        elif isinstance(frame, CacheRemove):
            self.remove_cache(frame.cache_id)
        elif isinstance(frame, KeyRemove):
            self.remove_key(frame.key)
        else:  # KeyPulled, acknowledged as seq 0 when it carries none
            self.key_pulled(frame.key)
        self.send(Ack(seq))
        return False

    def stop(self, code) -> None:
        """Stop writing to the peer: take the link flag down, end transfers to it (waiting for
        their queued copies), unmap its memory and close device IPC imports of it. The
        connection stays up (close() ends it), so an unlink request can still be acknowledged
        and the peer frees its memory only after this. Idempotent; a second caller waits until
        the first is done."""
        with self.lock:
            first = not self.stopping
            self.stopping = True
        if not first:
            self.stopped.wait()
            return
        try:
            self.link.down()
            self.ipc_ready.set()  # wake a transfer waiting for it: it sees the link down
            self.node.cancel_transfers_to(self.cluster_id, None, code)
            self._unmap_all()
        finally:
            self.stopped.set()

    def close(self, code, ack: Optional[int] = None) -> None:
        """Take the link down: stop() writing to the peer, acknowledge the peer's unlink
        request ack if given, and close the connection. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            acks = list(self.acks.values())
        for ev in acks:
            ev.set()
        self.stop(code)
        if ack is not None:
            try:
                self.send(Ack(ack))
            except OSError:
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
