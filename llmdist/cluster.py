"""Links between clusters: the control connection, the memory each side exposes, and the data
path to a peer.

A cluster with `llm.listenIpInfo` accepts links; `link_clusters` connects to one. The control
connection carries only small JSON frames (auth.py: framing, and with a shared key the
challenge-response handshake and a MAC on every frame): a challenge from the listener, a
handshake (cluster ids, roles, the caches each side holds; the linker's caches follow the
welcome), cache announcements and withdrawals (acknowledged, so that a peer knows a
cache before a transfer can target it and has stopped writing into it before the owner lets it
go), the release of a CacheKey a pull used ("key_pulled"), and unlink. It never carries bulk
data. When it closes, the link is down: transfers to the
peer end with LLM_LINK_FAILED and nothing more is written.

Who a peer is on this host comes from the kernel: a client of this host continues on the
listener's Unix socket (named in the challenge), where SO_PEERCRED gives each side the other's
pid and uid; nothing a hello states about its process is read.

Data paths, per peer (`Peer.route` returns one of routes.py's routes): same host -> copies into
the peer's shared memory mapped here (host-runtime memory of a listening cluster: sealed memfds
passed over the Unix socket), or process transfers with the peer's address space (memory the
peer registered; only a kernel-named process of our uid); other host -> Mooncake
Transfer Engine (batched transfers with memory the peer registered with its engine).
`llmdist.transport` forces a path: direct or mooncake.

On a device runtime (ACL, CUDA) the same-host path is device IPC (see device_ipc.py): the
handshake carries each side's runtime; exports whitelist the peer's kernel-named pid; the side
that linked sends "ipc_ready" once it has whitelisted the listener, and the listener imports the
linker's caches only after that."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

from . import _core, auth, device_ipc, notifications
from .auth import MAGIC, MAX_FRAME, AuthError, Channel, ProtocolError
from .descs import BlocksCacheKey, Cache, CacheDesc, CacheKey, DataType, LLMRole, Placement
from .handshake_slots import HandshakeSlots
from .limits import PeerLimits
from .registry import ALLOCATED, REGISTERED, ClusterMemory, MemoryEntry, Region
from .route_rules import Access, RouteKind
from .routes import EngineRoute, ImportNeeded, MappedRoute, ProcessRoute, Route
from .status import LLMException, LLMStatusCode

if TYPE_CHECKING:
    from .cache_manager import CacheManager

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 3
HANDSHAKE_TIMEOUT_S = 10.0      # the whole handshake, however slowly its bytes arrive
FIRST_FRAME_S = 1.0             # the client's first frame, from its connection
MAX_HANDSHAKES = 32             # handshakes in progress at once (see handshake_slots.py)
MAX_TEXT = 4096                 # the longest free text a peer may send (host, reasons, ids)
ACK_TIMEOUT_S = 10.0
TRANSPORTS = ("auto", "direct", "mooncake")
_UNIX_NAME = re.compile(r"llmdist-[0-9a-f]{32}", re.ASCII)

__all__ = ["MAGIC", "MAX_FRAME", "ProtocolError", "AuthError"]


def host_identity() -> str:
    """Processes with the same identity can map each other's shared memory and write into each
    other with process writes: same boot, same hostname, same IPC and mount namespaces."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    parts = [socket.gethostname(), boot]
    for ns in ("ipc", "mnt"):
        try:
            parts.append(str(os.stat(f"/proc/self/ns/{ns}").st_ino))
        except OSError:
            parts.append("?")
    return "/".join(parts)


def close_listener(sock: socket.socket) -> None:
    """Stop a listening socket now: shut it down first, so that a thread blocked in accept()
    returns and the port stops accepting (closing alone leaves it listening until then)."""
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


def _source_of(conn: socket.socket, address) -> str:
    """Where a connection comes from, for the handshake slots: its IP address, or on the Unix
    socket the uid the kernel gives for the process at the other end."""
    if isinstance(address, tuple):
        return address[0]
    creds = Channel(conn).peer_creds()
    return f"uid {creds[1]} (Unix socket)" if creds else "Unix socket"


class Listener:
    """A TCP listening socket and its Unix-socket companion (an abstract name of random text).
    A client on this host is sent the companion's name in the challenge and continues there,
    so that each side learns the other's pid and uid from the kernel (SO_PEERCRED) and shared
    memory can pass as file descriptors."""

    def __init__(self, tcp: socket.socket, unix: Optional[socket.socket], name: Optional[str]):
        self.tcp, self.unix, self.unix_name = tcp, unix, name
        self.port: int = tcp.getsockname()[1]

    def close(self) -> None:
        close_listener(self.tcp)
        if self.unix is not None:
            close_listener(self.unix)


# ------------------------------------------------------------------------------------------
# Caches on the wire

def _int(v, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"bad integer {v!r:.40}")
    return v


def _enum(cls, v):
    """A member of an int-valued enum from its value; true and false are not integers here."""
    if type(v) is not int:
        raise ProtocolError(f"bad {cls.__name__} {v!r:.40}")
    try:
        return cls(v)
    except ValueError:
        raise ProtocolError(f"bad {cls.__name__} {v!r:.40}") from None


def _text(v, limit: int = MAX_TEXT) -> str:
    if type(v) is not str or len(v) > limit:
        raise ProtocolError(f"bad text {v!r:.40}")
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"text that is not UTF-8 {v!r:.40}") from None
    return v


def _list(v, limit: int = MAX_FRAME) -> list:
    if type(v) is not list or len(v) > limit:
        raise ProtocolError(f"bad list {v!r:.40}")
    return v


def key_from_wire(w) -> Union[CacheKey, BlocksCacheKey]:
    w = _list(w, 5)
    if len(w) == 3 and w[0] == "blocks":
        return BlocksCacheKey(_int(w[1]), _int(w[2]))
    if len(w) == 5 and w[0] == "cache":
        return CacheKey(_int(w[1]), _int(w[2]), _int(w[3]), _int(w[4]))
    raise ProtocolError(f"bad cache key {w!r:.60}")


def key_to_wire(key: Union[CacheKey, BlocksCacheKey]) -> list:
    if isinstance(key, BlocksCacheKey):
        return ["blocks", key.cluster_id, key.model_id]
    return ["cache", key.cluster_id, key.req_id, key.model_id, key.prefix_id]


def share_to_wire(share: Optional[dict], fds: Optional[List[int]]) -> dict:
    """How a peer reaches a cache, as sent. Shared memory (a memfd) and device IPC ids go only
    over a Unix socket (fds not None), to a process the kernel says is on this host; the memfd
    travels in fds, the share names its index there."""
    if share is None:
        return {"kind": "none"}
    kind = share.get("kind")
    if kind == "memfd" or kind in device_ipc.KINDS:
        if fds is None:
            return {"kind": "none", "reason": "its memory is shared with processes of this host "
                                              "over a Unix socket only"}
        if kind == "memfd":
            fds.append(share["fd"])
            return {"kind": "memfd", "fd": len(fds) - 1, "base": share["base"],
                    "size": share["size"]}
    return share


def cache_to_wire(entry: MemoryEntry, fds: Optional[List[int]] = None) -> dict:
    """A cache as sent to a peer (fds: see share_to_wire)."""
    c = entry.cache
    d = c.cache_desc
    keys = []
    for k in entry.keys:
        if isinstance(k, BlocksCacheKey):
            keys.append(["blocks", k.cluster_id, k.model_id])
        else:
            keys.append(["cache", k.cluster_id, k.req_id, k.model_id, k.prefix_id])
    return {"id": c.cache_id, "num_tensors": d.num_tensors, "shape": list(d.shape),
            "dtype": d.data_type.value, "placement": int(d.placement), "batch_dim": d.batch_dim,
            "seq_len_dim": d.seq_len_dim_index, "blocks": c.is_blocks_cache,
            "addrs": c.tensor_addrs, "origin": entry.origin,
            "remote_accessible": entry.remote_accessible, "keys": keys,
            "share": share_to_wire(entry.share, fds)}


def cache_from_wire(w: dict, fds: List[int] = ()) -> Tuple[MemoryEntry, list]:
    """A peer's cache as a MemoryEntry (its addresses are the peer's) and its keys; a memfd
    share's "fd" becomes the descriptor of fds it names."""
    if type(w) is not dict:
        raise ProtocolError("cache is not an object")
    try:
        num_tensors = _int(w["num_tensors"], 1, 2**32 - 1)
        desc = CacheDesc(num_tensors, [_int(x, 1, 2**63 - 1) for x in _list(w["shape"], 64)],
                         _enum(DataType, w["dtype"]), _enum(Placement, w["placement"]),
                         batch_dim_index=_int(w["batch_dim"], 0, 64),
                         seq_len_dim_index=_int(w["seq_len_dim"], -1, 64))
        if type(w["blocks"]) is not bool or type(w["remote_accessible"]) is not bool:
            raise ProtocolError("bad flags")
        if w["origin"] not in (ALLOCATED, REGISTERED):
            raise ProtocolError("bad origin")
        addrs = [_int(a, 1) for a in _list(w["addrs"], num_tensors)]
        cache = Cache(_int(w["id"], 0, 2**63 - 1), desc, addrs, w["blocks"])
        keys = [key_from_wire(k) for k in _list(w["keys"])]
        share = w["share"]
        if (type(share) is not dict
                or share.get("kind") not in ("memfd", "process", "none") + device_ipc.KINDS):
            raise ProtocolError("bad share")
        kind = share["kind"]
        if kind == "memfd":
            share = dict(share, fd=fds[_int(share.get("fd"), 0, len(fds) - 1)]) if fds else None
            if share is None:
                raise ProtocolError("shared memory without its file descriptor")
        elif kind in device_ipc.KINDS:
            export_id = share.get("id")
            if (not isinstance(export_id, str) or not 0 < len(export_id) < device_ipc.ID_MAX
                    or not export_id.isascii() or not export_id.isprintable()):
                raise ProtocolError("bad device IPC id")
        elif kind == "none":
            _text(share.get("reason", ""))
        if kind == "memfd" or kind in device_ipc.KINDS:
            base, size = _int(share.get("base"), 1), _int(share.get("size"), 1)
            # Writes land at a tensor's address moved into the mapping: every tensor must lie
            # inside the memory the share names, or they would land outside it.
            if any(a < base or a + desc.size > base + size for a in addrs):
                raise ProtocolError(f"cache {cache.cache_id} has tensors outside the "
                                    f"{size} bytes of its shared memory")
        if kind in device_ipc.KINDS:
            _int(share.get("device", 0), 0, 2**31 - 1)
        entry = MemoryEntry(cache, w["origin"], w["remote_accessible"], share=share)
        if kind == "memfd" or kind in device_ipc.KINDS:
            entry.base, entry.size = share["base"], share["size"]
        return entry, keys
    except ProtocolError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, LLMException) as exc:
        raise ProtocolError(f"bad cache description: {exc}") from None


# ------------------------------------------------------------------------------------------
# Peers

class Peer:
    """A linked cluster: its control connection, the caches it exposes, and the data path."""

    def __init__(self, node: "ClusterNode", chan: Channel, hello: dict,
                 fds: List[int] = ()) -> None:
        self.node = node
        self.chan = chan
        self.sock = chan.sock
        self.cluster_id: int = hello["cluster_id"]
        self.role = LLMRole(hello["role"])
        self.runtime: str = hello.get("runtime", "host")
        # Who the peer is comes from the kernel, never from its hello: over the Unix socket the
        # peer's pid and uid are SO_PEERCRED's; over TCP this side knows no process of it.
        creds = chan.peer_creds()
        self.same_host = creds is not None
        self.pid: int = creds[0] if creds is not None and creds[0] > 0 else 0
        self.uid: Optional[int] = creds[1] if creds is not None else None
        # Process writes and reads reach only a process of our own uid that the kernel named.
        self.no_process_route: Optional[str] = None
        if not self.same_host:
            self.no_process_route = ("it is not known to be a process of this host (linked over "
                                     "TCP, not the listener's Unix socket)")
        elif self.pid == 0:
            self.no_process_route = "its process is outside this process's pid namespace"
        elif self.uid != os.geteuid():
            self.no_process_route = (f"its process runs as uid {self.uid}, this one as uid "
                                     f"{os.geteuid()}")
        self.tgid: int = self.pid      # the pid device-IPC exports whitelist (kernel-verified)
        # cache id -> why this process cannot reach that cache of the peer
        self.unreachable: Dict[int, str] = {}
        self.path = node.choose_path(self.same_host, hello.get("want_engine") is True)
        session = hello.get("mooncake")
        self.engine_session: Optional[str] = session if isinstance(session, str) else None
        self.link = _core.LinkFlag(self.pid, chan.peer_pidfd() if self.pid > 0 else -1)
        self.mem = ClusterMemory()
        self.mappings: Dict[int, Tuple[int, int]] = {}   # cache id -> (local address, size)
        self.imports: Dict[int, Tuple[dict, int]] = {}   # cache id -> (device IPC share, delta)
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
        self.stopping = False                 # stop() began: nothing new is mapped or imported
        self.stopped = threading.Event()      # stop() finished
        self.closed = False
        # This side's link_clusters made (or claimed) the link: a second call is LLM_ALREADY_LINK.
        self.linked_here = False
        self.peer_unlinked = False            # the peer asked to unlink (its unlink_clusters)
        self.address: Optional[Tuple[str, int]] = None   # where we reached it, when we linked
        err = hello.get("engine_error")
        self.engine_error: Optional[str] = err if isinstance(err, str) else None
        try:
            self.add_caches(hello["caches"], fds)
        except BaseException:
            self._unmap_all()
            raise

    # -- memory the peer exposes
    def add_caches(self, ws, fds: List[int] = ()) -> None:
        for w in _list(ws):
            self.add_cache(w, fds)

    def add_cache(self, w: dict, fds: List[int] = ()) -> None:
        """Record a cache the peer announced; fds are the descriptors that came with the frame
        (the caller closes them: a mapping outlives its descriptor)."""
        entry, keys = cache_from_wire(w, fds)
        cid = entry.cache.cache_id
        delta = pid = 0
        why = None
        kind = entry.share.get("kind")
        if self.path == "direct":
            if kind == "memfd":
                try:
                    local = _core.memfd_map(entry.share.pop("fd"), entry.size)
                except LLMException as exc:
                    raise ProtocolError(f"peer cache {cid}: {exc}") from None
                self.mappings[cid] = (local, entry.size)
                delta = local - entry.base
            elif kind not in device_ipc.KINDS:
                # device IPC exports are imported on first use instead
                pid = self.pid
                if self.no_process_route is not None:
                    pid, why = 0, (f"process transfers with cluster {self.cluster_id} are "
                                   f"refused: {self.no_process_route}")
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
            raise ProtocolError(f"cluster {self.cluster_id} announced more than "
                                f"{limits.max_caches} caches (option llmdist.max_peer_caches)")
        keys = len(mem.cache_keys) + len(mem.blocks_keys) + nkeys
        if old is not None:
            keys -= len(old.keys)
        if keys > limits.max_keys:
            raise ProtocolError(f"cluster {self.cluster_id} announced more than "
                                f"{limits.max_keys} cache keys (option llmdist.max_peer_keys)")

    def remove_cache(self, cid: int) -> None:
        with self.lock:
            self.mem.remove(cid)
            self.unreachable.pop(cid, None)
        self.node.cancel_transfers_to(self.cluster_id, cid, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)
        self._unmap(cid)

    def remove_key(self, w: list) -> None:
        key = key_from_wire(w)
        with self.lock:
            self.mem.remove_key(key)

    def key_pulled(self, w: list) -> None:
        """The peer pulled by a CacheKey of this cluster, which releases the key (as upstream).
        Taken here; withdrawn from peers on another thread, since that waits for every peer's
        ack, this one's included, which this reader thread delivers."""
        key = key_from_wire(w)
        cm = self.node.caches
        if not isinstance(key, CacheKey) or key.cluster_id != self.node.cluster_id or cm is None:
            raise ProtocolError(f"cluster {self.cluster_id} released key {key!r:.80}, which is "
                                f"not a CacheKey of this cluster")
        # a key no cache holds (released already, or never ours) costs nothing: no thread
        taken = cm.take_key(key)
        if taken is not None:
            threading.Thread(target=cm.finish_key_release, args=(key, taken),
                             name="llmdist-key-release", daemon=True).start()

    def pulled_by_key(self, key: CacheKey) -> None:
        """After a pull by key from this peer: forget the key here and tell the peer."""
        with self.lock:
            self.mem.remove_key(key)
        try:
            self.send({"type": "key_pulled", "key": key_to_wire(key)})
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
            device_ipc.IMPORTS.release(self.node.runtime, imp[0])

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
        if self.path == "mooncake":
            return Access.ENGINE, ""
        why = self.unreachable.get(cid)
        if why is not None:
            return Access.NONE, f"{where} cannot be reached from this process: {why}"
        if cid in self.mappings:
            return Access.SHARED_MEMORY, ""
        return Access.PROCESS, ""

    def _device_access(self, entry: MemoryEntry, runtime: "_core.Runtime",
                       where: str) -> Tuple[Access, str]:
        """Access on a device runtime, which reaches other processes through device IPC only."""
        if self.path == "mooncake" or not self.same_host:
            how = ("through Mooncake Transfer Engine" if self.path == "mooncake"
                   else "on another host")
            return Access.NONE, (f"cluster {self.cluster_id} is reached {how}; on the "
                                 f"{runtime.name} runtime transfers to another process use device "
                                 f"IPC, which works between processes of one host only")
        why = runtime.ipc_unavailable
        if why is not None:
            return Access.NONE, (f"transfers to another process on the {runtime.name} runtime "
                                 f"need device IPC, which is not available: {why}")
        if entry.placement != Placement.DEVICE:
            return Access.PROCESS, ""       # HOST memory of another process: no device IPC
        if entry.origin == REGISTERED:
            return Access.NONE, (f"{where} is DEVICE memory the peer registered (not allocated by "
                                 f"llmdist): device IPC exports whole page-aligned allocations, so "
                                 f"memory registered piecewise cannot be exported safely; allocate "
                                 f"the destination with allocate_cache or allocate_blocks_cache")
        share = entry.share or {}
        kind = share.get("kind")
        if kind != runtime.ipc_kind:
            if kind == "none" and share.get("reason"):
                why = share["reason"]
            elif kind in device_ipc.KINDS:
                why = f"it is exported as {kind}, this cluster runs the {runtime.name} runtime"
            else:
                why = ("the peer did not export it (a cluster exports its DEVICE caches when it "
                       "listens or sets llmdist.shareable_memory=1)")
            return Access.NONE, f"{where} cannot be written through device IPC: {why}"
        return Access.DEVICE_IPC, ""

    def _import_delta(self, entry: MemoryEntry) -> Optional[int]:
        """What turns the peer's address of cache entry into the one its device IPC import has
        here; None when it is not imported (or was exported anew since). self.lock held."""
        got = self.imports.get(entry.cache.cache_id)
        share = entry.share
        if got is None or (device_ipc.ident(got[0]), got[0]["base"]) != \
                (device_ipc.ident(share), share["base"]):
            return None
        return got[1]

    def route_to(self, kind: RouteKind, regions: List[Region],
                 runtime: "_core.Runtime") -> Route:
        """The route of kind to the peer's memory holding regions (self.lock held); no side
        effects. Raises ImportNeeded naming the device IPC exports to import first."""
        if kind is RouteKind.ENGINE:
            return EngineRoute(self.link, self.node.engine, self.engine_session)
        if kind is RouteKind.PROCESS:
            return ProcessRoute(self.link, self.pid)
        deltas: Dict[int, int] = {}
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
                    single |= entry.share.get("device", runtime.device_id) != runtime.device_id
            if missing:
                raise ImportNeeded(self, missing)
            return MappedRoute(self.link, deltas, single)
        for r in regions:
            if r.cache is not cache:        # the regions of one cache come in a row
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
                    continue        # withdrawn or re-announced meanwhile, or imported already
                if self.stopping:
                    raise LLMException(f"the link to cluster {self.cluster_id} is down",
                                       status_code=LLMStatusCode.LLM_NOT_YET_LINK)
                stale = self.imports.pop(cid, None)
            if stale is not None:
                device_ipc.IMPORTS.release(runtime, stale[0])
            share = entry.share
            local = device_ipc.IMPORTS.acquire(runtime, share)
            with self.lock:
                keep = self.mem.entries.get(cid) is entry and not self.stopping \
                    and cid not in self.imports
                if keep:
                    self.imports[cid] = (share, local - share["base"])
            if not keep:
                device_ipc.IMPORTS.release(runtime, share)

    def await_ipc_ready(self, runtime: "_core.Runtime") -> None:
        """On a device runtime, wait (up to ACK_TIMEOUT_S) until the peer confirmed that this
        process may import its memory; call it holding no lock, before link_refusal."""
        if not runtime.is_host and self.same_host and self.path != "mooncake":
            self.ipc_ready.wait(ACK_TIMEOUT_S)

    def link_refusal(self, runtime: "_core.Runtime") -> Optional[LLMException]:
        """Why the link carries no transfer now (down, device IPC not confirmed, Mooncake
        engine missing), or None; it does not wait (see await_ipc_ready)."""
        if not self.link.is_up:
            return LLMException(f"the link to cluster {self.cluster_id} is down",
                                status_code=LLMStatusCode.LLM_NOT_YET_LINK)
        if not runtime.is_host:
            if (self.same_host and self.path != "mooncake" and runtime.ipc_unavailable is None
                    and not self.ipc_ready.is_set()):
                return LLMException(f"cluster {self.cluster_id} did not confirm within "
                                    f"{ACK_TIMEOUT_S:.0f} s that this process may import its "
                                    f"device memory", status_code=LLMStatusCode.LLM_LINK_FAILED)
            return None
        if self.path == "mooncake" and (self.node.engine is None or self.engine_session is None):
            why = self.node.engine_error or (f"cluster {self.cluster_id} has no Mooncake engine: "
                                             f"{self.engine_error or 'it did not start one'}")
            return LLMException(f"cluster {self.cluster_id} is reached through Mooncake Transfer "
                                f"Engine, which is not available: {why}",
                                status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        return None

    # -- messages
    def send(self, msg: dict, fds: List[int] = (), deadline: Optional[float] = None) -> None:
        self.chan.send(msg, fds, deadline=deadline)

    def request(self, msg: dict, timeout: float = ACK_TIMEOUT_S, fds: List[int] = ()) -> bool:
        """Send msg and wait for the peer's ack; False if none came in time or the link broke."""
        deadline = time.monotonic() + timeout
        seq = self.post(msg, deadline, fds)
        return seq is not None and self.await_ack(seq, deadline)

    def post(self, msg: dict, deadline: float, fds: List[int] = ()) -> Optional[int]:
        """Send msg as a request by deadline without waiting for its ack: its sequence number
        for await_ack, or None when it could not be sent in time."""
        with self.lock:
            self.seq += 1
            seq = self.seq
            self.acks[seq] = threading.Event()
        msg["seq"] = seq
        try:
            self.send(msg, fds, deadline)
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
                # At most llmdist.peer_frame_rate frames a second (as a burst too): a faster
                # peer waits, its frames in the socket's bounded buffers. Acks of our own
                # requests are bounded by those and do not count.
                seq = msg.get("seq")
                if msg["type"] != "ack" or type(seq) is not int or seq not in self.acks:
                    now = time.monotonic()
                    tokens = min(float(rate), tokens + (now - last) * rate)
                    last = now
                    if tokens < 1.0:
                        time.sleep((1.0 - tokens) / rate)
                        tokens = 1.0
                        last = time.monotonic()
                    tokens -= 1.0
                try:
                    if self._handle(msg, fds):
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

    def _handle(self, msg: dict, fds: List[int]) -> bool:
        """Act on one message of the peer; True when the link ended."""
        kind = msg["type"]
        seq = _int(msg.get("seq", 0))
        if kind == "ack":
            with self.lock:
                ev = self.acks.get(seq)
                if ev is not None:
                    self.acked.add(seq)
            if ev is not None:
                ev.set()
            return False
        if kind == "ipc_ready":
            self.ipc_ready.set()
            return False
        if kind == "unlink":
            # Stop writing to the peer before it hears back, then hang up.
            self.peer_unlinked = True
            self.node.link_down(self, LLMStatusCode.LLM_LINK_FAILED, ack=seq)
            return True
        if kind in notifications.MESSAGES:
            self.node.notifications.handle(self, msg, ProtocolError)
            return False
        if kind == "cache_add":
            self.add_cache(msg.get("cache"), fds)
        elif kind == "cache_remove":
            self.remove_cache(_int(msg.get("cache_id"), 0, 2**63 - 1))
        elif kind == "key_remove":
            self.remove_key(msg.get("key"))
        elif kind == "key_pulled":
            self.key_pulled(msg.get("key"))
        else:
            raise ProtocolError(f"unknown message {kind!r:.40}")
        self.send({"type": "ack", "seq": seq})
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
            self.ipc_ready.set()        # wake a transfer waiting for it: it sees the link down
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
                self.send({"type": "ack", "seq": ack})
            except OSError:
                pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ------------------------------------------------------------------------------------------
# The node: listener, links, announcements

class ClusterNode:
    """The cluster side of one LLMDataDist: its listener, links and announcements. The cache
    manager it serves is attached once it exists (attach)."""

    def __init__(self, cluster_id: int, role: LLMRole, listen: Optional[Tuple[str, int]],
                 transport: str, runtime: Optional["_core.Runtime"] = None,
                 limits: Optional[PeerLimits] = None, key: Optional[bytes] = None) -> None:
        if transport not in TRANSPORTS:
            raise LLMException(f"option llmdist.transport must be one of {', '.join(TRANSPORTS)}, "
                               f"got {transport!r}", status_code=LLMStatusCode.LLM_PARAM_INVALID)
        self.cluster_id = cluster_id
        self.role = role
        self.limits = limits if limits is not None else PeerLimits()
        self.key = key                          # the shared key (llmdist.auth_key), or None
        self.caches: Optional["CacheManager"] = None
        self.transport = transport
        self.runtime = runtime if runtime is not None else _core.Runtime.host()
        try:
            self.tgid = self.runtime.bare_tgid()
        except LLMException as exc:
            log.warning("the runtime could not tell the pid peers allow for device IPC; they "
                        "allow pid %d: %s",
                        os.getpid(), exc)
            self.tgid = os.getpid()
        self.host = host_identity()
        self.lock = threading.Lock()
        self.peers: Dict[int, Peer] = {}
        self.linking: set = set()               # cluster ids link() is connecting to right now
        self.accepting: set = set()             # cluster ids whose link is being accepted
        self.ever_linked: set = set()           # every cluster id linked since start
        self.listener: Optional[Listener] = None
        self.port: Optional[int] = None
        self.closed = False
        self.engine = None                      # MooncakeTransport, made on first need
        self.engine_error: Optional[str] = None   # why the last attempt to start it failed
        self.engine_lock = threading.Lock()
        # What is registered with the engine, which refuses overlapping regions: each range
        # registered there -> how many cache tensors use it; each cache tensor's range ->
        # [the registered range holding it, how many tensors have that range].
        self.engine_held: Dict[Tuple[int, int], int] = {}
        self.engine_users: Dict[Tuple[int, int], list] = {}
        self.engine_ranges_lock = threading.Lock()
        self.handshakes = HandshakeSlots(MAX_HANDSHAKES, self.limits.handshakes_per_address)
        # Handshakes in progress (connection -> the admission epoch it started in). A role
        # switch moves to a new epoch and admits nothing while it runs, so that no handshake
        # begun before it completes after it.
        self.in_handshake: Dict[socket.socket, int] = {}
        self.epoch = 0
        self.switching = False
        self.handshakes_ended = threading.Condition(self.lock)
        self.notifications = notifications.Notifications(cluster_id)
        # called with the cluster id of each accepted link once it is complete
        self.ready_hooks: List[Callable[[int], None]] = []
        if listen is not None:
            self.start_listening(listen)

    def open_listener(self, address: Tuple[str, int],
                      admit: Optional[Callable[[dict], Optional[Tuple[int, str]]]] = None,
                      key: Optional[bytes] = None) -> Listener:
        """Accept links on address (and on a Unix-socket companion) until the returned listener
        is closed. admit, when given, may refuse a handshake that passed the usual checks
        ((status, reason) or None); key, when given, is the key clients must prove they hold.
        Raises OSError when the address cannot be bound."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        name = "llmdist-" + secrets.token_hex(16)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(b"\0" + name.encode())
            unix.listen(64)
        except OSError as exc:
            log.warning("no Unix socket beside %s:%d (%s): peers on this host link over TCP and "
                        "get no shared memory or process route", address[0], address[1], exc)
            unix.close()
            unix = name = None
        # the address a Mooncake engine of a peer linked over the Unix socket is told
        local_ip = address[0] if address[0] not in ("", "0.0.0.0") else "127.0.0.1"
        for s, redirect in ((sock, name), (unix, None)):
            if s is not None:
                threading.Thread(target=self._accept_loop,
                                 args=(s, admit, key, redirect, local_ip),
                                 name="llmdist-listen", daemon=True).start()
        return Listener(sock, unix, name)

    def start_listening(self, listen: Tuple[str, int]) -> None:
        """Accept links on listen (llm.listenIpInfo), replacing the current listener."""
        try:
            listener = self.open_listener(listen, key=self.key)
        except OSError as exc:
            raise LLMException(f"cannot listen on {listen[0]}:{listen[1]}: {exc}",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID) from None
        self.stop_listening()
        self.listener = listener
        self.port = listener.port

    def stop_listening(self) -> None:
        """Stop accepting links (links already made stay up)."""
        listener, self.listener, self.port = self.listener, None, None
        if listener is not None:
            listener.close()

    def begin_switch(self, timeout_s: float = HANDSHAKE_TIMEOUT_S + 1.0) -> None:
        """Stop admitting links (until end_switch) and end the handshakes in progress: their
        connections are shut down and none of them is admitted; waits until they are gone
        (timeout_s at most: one that outlives it is refused all the same)."""
        with self.lock:
            self.switching = True
            self.epoch += 1
            conns = list(self.in_handshake)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        with self.handshakes_ended:
            while self.in_handshake:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d handshakes still in progress at a role switch; none of them "
                                "will be admitted", len(self.in_handshake))
                    break
                self.handshakes_ended.wait(left)

    def end_switch(self) -> None:
        """Admit links again, from handshakes that start from now on."""
        with self.lock:
            self.epoch += 1
            self.switching = False

    def choose_path(self, same_host: bool, peer_wants_engine: bool = False) -> str:
        if self.transport == "mooncake" or peer_wants_engine or (self.transport == "auto" and not same_host):
            return "mooncake"
        return "direct"

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

    @staticmethod
    def _engine_ranges(entry: MemoryEntry) -> List[Tuple[int, int]]:
        """(start, length) of what peers reach of entry through the engine."""
        if entry.origin == ALLOCATED and entry.size:
            return [(entry.base, entry.size)]
        return [(a, entry.cache.cache_desc.size) for a in entry.cache.tensor_addrs]

    def _engine_register(self, entry: MemoryEntry) -> None:
        """Register entry's memory with the engine. A range inside one registered already
        (overlapping registrations: a further cache over tensors already registered) is
        counted against it instead; a range the engine refuses (one that overlaps a registered
        range only in part) is logged: the cache stays reachable on the other routes."""
        engine = self.engine
        if engine is None:
            return
        with self.engine_ranges_lock:
            for rng in self._engine_ranges(entry):
                user = self.engine_users.get(rng)
                if user is not None:
                    user[1] += 1
                    self.engine_held[user[0]] += 1
                    continue
                start, length = rng
                holder = next((h for h in self.engine_held
                               if h[0] <= start and start + length <= h[0] + h[1]), None)
                if holder is None:
                    try:
                        engine.register(start, length)
                    except LLMException as exc:
                        log.warning("cache %d: [%#x, +%d) is not reachable through Mooncake: %s",
                                    entry.cache.cache_id, start, length, exc)
                        continue
                    holder = rng
                    self.engine_held[holder] = 0
                self.engine_held[holder] += 1
                self.engine_users[rng] = [holder, 1]

    def _engine_unregister(self, entry: MemoryEntry) -> None:
        """Withdraw entry's memory from the engine once no other cache uses the range."""
        engine = self.engine
        if engine is None:
            return
        with self.engine_ranges_lock:
            for rng in self._engine_ranges(entry):
                user = self.engine_users.get(rng)
                if user is None:
                    continue
                user[1] -= 1
                if user[1] == 0:
                    del self.engine_users[rng]
                holder = user[0]
                self.engine_held[holder] -= 1
                if self.engine_held[holder]:
                    continue
                del self.engine_held[holder]
                try:
                    engine.unregister(holder[0])
                except LLMException as exc:
                    log.warning("engine unregister failed: %s", exc)

    def _allow_imports(self, peer: Peer) -> None:
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

    def _my_caches(self, fds: Optional[List[int]]) -> List[dict]:
        cm = self.caches
        if cm is None:
            return []
        return [cache_to_wire(e, fds) for e in cm.entries()]

    def _hello(self, target: Optional[int], fds: Optional[List[int]] = None,
               caches: bool = True) -> dict:
        """This side's handshake message; its caches (with their memfds added to fds, on a
        Unix socket) unless caches is False."""
        msg = {"type": "hello", "version": PROTOCOL_VERSION, "cluster_id": self.cluster_id,
               "role": int(self.role), "target": target, "host": self.host,
               "runtime": self.runtime.name,
               "caches": self._my_caches(fds) if caches else [],
               "want_engine": self.transport == "mooncake"}
        if self.engine is not None:
            msg["mooncake"] = self.engine.session_id
        elif self.engine_error is not None:
            msg["engine_error"] = self.engine_error
        return msg

    def _check_hello(self, msg: dict, expect: Optional[int],
                     rendezvous: bool = False) -> Optional[Tuple[int, str]]:
        """(status, reason) when a handshake must be refused, else None. Roles do not restrict
        links (as upstream: PROMPT-PROMPT and DECODER-DECODER links serve migration and prefix
        sharing); the role is checked for form only. A hello naming a rank-table comm is
        accepted on that comm's rendezvous listener only (rendezvous; it checks the comm)."""
        version = msg.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            return int(LLMStatusCode.LLM_LINK_FAILED), f"protocol version {version!r:.40}"
        try:
            cid = _int(msg.get("cluster_id"))
            if msg.get("target") is not None:     # None: the linker did not know our id
                _int(msg.get("target"))
            if msg.get("runtime", "host") not in ("host", "acl", "cuda"):
                raise ProtocolError("bad runtime")
            _enum(LLMRole, msg.get("role"))
            _text(msg.get("host"))
            _list(msg.get("caches"))
            if type(msg.get("want_engine", False)) is not bool:
                raise ProtocolError("bad want_engine")
            for k in ("mooncake", "engine_error", "comm"):
                if k in msg:
                    _text(msg[k])
        except ProtocolError as exc:
            return int(LLMStatusCode.LLM_LINK_FAILED), f"malformed handshake: {exc}"
        if expect is not None and cid != expect:
            return int(LLMStatusCode.LLM_LINK_FAILED), f"expected cluster {expect}, reached {cid}"
        if cid == self.cluster_id:
            return int(LLMStatusCode.LLM_LINK_FAILED), f"cluster {cid} cannot link to itself"
        if "comm" in msg and not rendezvous:
            return (int(LLMStatusCode.LLM_LINK_FAILED),
                    "a hello naming a rank-table comm is accepted on that comm's rendezvous "
                    "port only")
        return None

    # -- accepting
    def _accept_loop(self, sock: socket.socket, admit=None, key: Optional[bytes] = None,
                     redirect: Optional[str] = None, local_ip: Optional[str] = None) -> None:
        while True:
            try:
                conn, source = sock.accept()
            except OSError:
                return
            source = _source_of(conn, source)
            if not self.handshakes.take(conn, source):
                log.info("refused a connection from %s: its %d handshake slots (option "
                         "llmdist.handshakes_per_address) or all %d are busy", source,
                         self.handshakes.per_address, MAX_HANDSHAKES)
                conn.close()
                continue
            with self.lock:
                self.in_handshake[conn] = self.epoch
            threading.Thread(target=self._handshake, args=(conn, admit, key, redirect, local_ip),
                             name="llmdist-handshake", daemon=True).start()

    def _handshake(self, conn: socket.socket, admit=None, key: Optional[bytes] = None,
                   redirect: Optional[str] = None, local_ip: Optional[str] = None) -> None:
        """Run one handshake (a slot of the bounded count is held), then serve the link. Any
        failure, whatever its kind, closes the connection and leaves no peer behind."""
        peer = None
        try:
            peer = self._accept_one(conn, admit, key, redirect, local_ip)
        except Exception as exc:  # noqa: BLE001 - nothing a client sends may kill this thread
            level = logging.INFO if isinstance(exc, (ConnectionError, OSError, ProtocolError,
                                                     LLMException)) else logging.WARNING
            if isinstance(exc, AuthError):
                level = logging.WARNING
            log.log(level, "refused a connection: %s: %s", type(exc).__name__, exc)
            try:
                conn.close()
            except OSError:
                pass
        finally:
            with self.lock:
                self.in_handshake.pop(conn, None)
                self.handshakes_ended.notify_all()
            self.handshakes.release(conn)
        if peer is not None:
            peer.serve()

    def _accept_one(self, conn: socket.socket, admit=None, key: Optional[bytes] = None,
                    redirect: Optional[str] = None, local_ip: Optional[str] = None
                    ) -> Optional[Peer]:
        """The listener's side of a handshake: the linked peer, or None when refused. admit:
        see open_listener; key: the key the client must prove it holds; redirect: the name of
        the Unix socket a client on this host continues on."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        chan = Channel(conn, local_ip)
        nl = auth.new_nonce()
        challenge = {"type": "challenge", "version": PROTOCOL_VERSION, "nonce": nl.hex(),
                     "auth": key is not None, "host": self.host}
        if redirect is not None:
            challenge["unix"] = redirect
        chan.send(challenge)
        if key is not None:
            chan.into.set(key, auth.hello_context(nl))
        fds: List[int] = []
        try:
            try:
                msg, fds = chan.recv(min(deadline, time.monotonic() + FIRST_FRAME_S))
                self.handshakes.heard(conn)
            except ConnectionError:
                if redirect is None:
                    raise
                # a client of this host continued on the Unix socket (or went away)
                log.debug("a client closed its TCP connection after the challenge")
                conn.close()
                return None
            session = None
            if key is not None:
                nc = auth.nonce_from_wire(msg.get("nonce"))
                l2c, c2l = auth.session_keys(key, nl, nc)
                chan.out.set(key, auth.welcome_context(nl, nc))
                chan.into.set(c2l)
                session = (l2c, b"")
        except AuthError:
            chan.out.set(None)
            try:
                chan.send({"type": "refuse", "code": int(LLMStatusCode.LLM_LINK_FAILED),
                           "reason": "authentication failed"})
            except OSError:
                pass
            raise
        try:
            if msg["type"] == "refuse":
                raise AuthError(f"the client refused: {str(msg.get('reason'))[:200]}")
            if msg["type"] != "hello":
                raise ProtocolError("expected a handshake")
            if msg.get("target") not in (None, self.cluster_id):
                refusal = (int(LLMStatusCode.LLM_LINK_FAILED),
                           f"this is cluster {self.cluster_id}, not {msg.get('target')!r:.40}")
            else:
                refusal = self._check_hello(msg, None, rendezvous=admit is not None)
            if refusal is None and admit is not None:
                refusal = admit(msg)
            if refusal is None and self.caches is None:
                refusal = (int(LLMStatusCode.LLM_LINK_FAILED), "cluster is finalized")
            if refusal is None:
                refusal = self._begin_accept(msg["cluster_id"])
            if refusal is not None:
                chan.send({"type": "refuse", "code": refusal[0], "reason": refusal[1],
                           "cluster_id": self.cluster_id})
                conn.close()
                return None
            try:
                return self._admit(chan, msg, fds, deadline, session)
            finally:
                with self.lock:
                    self.accepting.discard(msg["cluster_id"])
        finally:
            chan.close_fds(fds)

    def _begin_accept(self, cid: int) -> Optional[Tuple[int, str]]:
        """Claim the right to accept a link from cid, or say why not: it is linked already, or
        being accepted, or this side is linking to it at the same moment and its own link wins
        (the link from the smaller cluster id is kept; the peer's link_clusters waits for it)."""
        with self.lock:
            if cid in self.peers or cid in self.accepting:
                return int(LLMStatusCode.LLM_ALREADY_LINK), f"cluster {cid} is already linked"
            if cid in self.linking and self.cluster_id < cid:
                return (int(LLMStatusCode.LLM_PROCESSING_LINK),
                        f"cluster {self.cluster_id} is linking to cluster {cid} itself")
            self.accepting.add(cid)
        return None

    def _admit(self, chan: Channel, msg: dict, fds: List[int], deadline: float,
               session: Optional[Tuple[bytes, bytes]]) -> Peer:
        """Register an accepted peer, welcome it and take its caches (the "caches" frame that
        answers the welcome, acknowledged)."""
        conn = chan.sock
        peer = Peer(self, chan, msg, fds)
        try:
            if peer.path == "mooncake":
                self.ensure_engine(chan.local_ip)
            self._allow_imports(peer)           # before the welcome lists our caches
            with self.lock:
                if self.closed or msg["cluster_id"] in self.peers:
                    raise ProtocolError("closed or linked meanwhile")
                if self.switching or self.in_handshake.get(conn) != self.epoch:
                    raise ProtocolError("the cluster switched its role meanwhile")
                self.in_handshake.pop(conn, None)      # a link now, not a handshake
                self.peers[peer.cluster_id] = peer
                self.ever_linked.add(peer.cluster_id)
            out: Optional[List[int]] = [] if chan.unix else None
            reply = self._hello(peer.cluster_id, out)
            reply["type"] = "welcome"
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            chan.send(reply, out or (), then=session)
            got, more = chan.recv(deadline)
            try:
                if got["type"] != "caches":
                    raise ProtocolError("expected the peer's caches")
                peer.add_caches(got.get("caches"), more)
            finally:
                chan.close_fds(more)
            # linked here before the linker hears it is: a member waiting for this link (a
            # rank-table comm) sees it before the linker can act on it
            peer.ready.set()
            for hook in list(self.ready_hooks):
                hook(peer.cluster_id)
            peer.send({"type": "ack", "seq": 0})
        except BaseException:
            # The client hears nothing more of this link: forget it, so that a later link of
            # the same cluster id is not refused as a duplicate.
            self.link_down(peer, LLMStatusCode.LLM_LINK_FAILED)
            raise
        return peer

    # -- linking
    def _claim(self, cluster_id: Optional[int]) -> Optional[LLMStatusCode]:
        """A link to cluster_id that already exists counts as made by this side's call, unless
        this side already made it; None when there is no such link."""
        with self.lock:
            peer = self.peers.get(cluster_id) if cluster_id is not None else None
        if peer is None:
            return None
        peer.ready.wait(HANDSHAKE_TIMEOUT_S)     # an accepted link finishes its handshake
        with self.lock:
            if self.peers.get(cluster_id) is not peer or not peer.ready.is_set():
                return None
            if peer.linked_here:
                return LLMStatusCode.LLM_ALREADY_LINK
            peer.linked_here = True
            return LLMStatusCode.LLM_SUCCESS

    def _await_peer_link(self, cluster_id: Optional[int], deadline: float) -> Optional[LLMStatusCode]:
        """After the peer refused our connection because it is linking to us itself, wait for
        its link to arrive here and claim it."""
        while True:
            got = self._claim(cluster_id)
            if got is not None or time.monotonic() >= deadline:
                return got
            time.sleep(0.005)

    def link(self, cluster_id: Optional[int], address: Tuple[str, int], timeout_ms: int,
             comm: Optional[str] = None) -> LLMStatusCode:
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
                if cluster_id not in self.accepting and cluster_id not in self.peers:
                    self.linking.add(cluster_id)
                    break
            if time.monotonic() >= deadline:
                return LLMStatusCode.LLM_LINK_FAILED
            time.sleep(0.002)
        try:
            code, peer = self._connect(cluster_id, address, timeout_ms, comm)
        finally:
            if cluster_id is not None:
                with self.lock:
                    self.linking.discard(cluster_id)
        if peer is not None:
            peer.address = address
        return code

    def _open(self, address: Tuple[str, int], key: Optional[bytes], deadline: float
              ) -> Tuple[Channel, dict]:
        """Connect to a listener and read its challenge; a listener on this host is reached on
        its Unix socket instead (named in the challenge), where the kernel tells each side who
        the other is. Raises AuthError when one side has a key and the other has none."""
        sock = socket.create_connection(address, timeout=max(0.001, deadline - time.monotonic()))
        chan = Channel(sock)
        local_ip = chan.local_ip
        try:
            challenge = self._challenge(chan, key, deadline)
            name = challenge.get("unix")
            if name is None or challenge.get("host") != self.host:
                return chan, challenge
            if type(name) is not str or not _UNIX_NAME.fullmatch(name):
                raise ProtocolError("bad Unix socket name")
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                unix.settimeout(max(0.001, deadline - time.monotonic()))
                unix.connect(b"\0" + name.encode())
            except OSError as exc:
                unix.close()
                log.info("the Unix socket of the cluster at %s:%d is out of reach (%s): linking "
                         "over TCP", address[0], address[1], exc)
                return chan, challenge
        except BaseException:
            sock.close()
            raise
        sock.close()
        chan = Channel(unix, local_ip)
        try:
            return chan, self._challenge(chan, key, deadline)
        except BaseException:
            unix.close()
            raise

    @staticmethod
    def _challenge(chan: Channel, key: Optional[bytes], deadline: float) -> dict:
        """Read and check the listener's challenge; on a key mismatch tell the listener why
        (so that its log names authentication) and raise AuthError."""
        try:
            return ClusterNode._read_challenge(chan, key, deadline)
        except AuthError as exc:
            try:
                chan.send({"type": "refuse", "code": int(LLMStatusCode.LLM_LINK_FAILED),
                           "reason": str(exc)})
            except OSError:
                pass
            raise

    @staticmethod
    def _read_challenge(chan: Channel, key: Optional[bytes], deadline: float) -> dict:
        msg, fds = chan.recv(deadline)
        chan.close_fds(fds)
        if msg["type"] == "refuse":
            raise ProtocolError(f"refused: {str(msg.get('reason'))[:200]}")
        if msg["type"] != "challenge":
            raise ProtocolError("expected a challenge")
        version = msg.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version!r:.40}, this side speaks "
                                f"{PROTOCOL_VERSION}")
        auth.nonce_from_wire(msg.get("nonce"))
        if msg.get("auth") is True and key is None:
            raise AuthError("authentication required: the listener has a key and this side "
                            "has none (llmdist.auth_key)")
        if msg.get("auth") is not True and key is not None:
            raise AuthError("authentication failed: the listener has no key "
                            "(llmdist.auth_key) and this side requires one")
        return msg

    def _connect(self, cluster_id: Optional[int], address: Tuple[str, int], timeout_ms: int,
                 comm: Optional[str]) -> Tuple[LLMStatusCode, Optional[Peer]]:
        deadline = time.monotonic() + timeout_ms / 1000.0
        name = "?" if cluster_id is None else cluster_id
        key = auth.comm_key(self.key, comm) if comm is not None else self.key
        try:
            chan, challenge = self._open(address, key, deadline)
        except (OSError, ProtocolError) as exc:
            log.info("link to cluster %s at %s:%d failed: %s: %s", name, *address,
                     type(exc).__name__, exc)
            return LLMStatusCode.LLM_LINK_FAILED, None
        sock = chan.sock
        peer = None
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if self.transport == "mooncake":
                self.ensure_engine(chan.local_ip)
            hello = self._hello(cluster_id, caches=False)
            if comm is not None:
                hello["comm"] = comm
            session = None
            if key is not None:
                nl = bytes.fromhex(challenge["nonce"])
                nc = auth.new_nonce()
                hello["nonce"] = nc.hex()
                l2c, c2l = auth.session_keys(key, nl, nc)
                chan.out.set(key, auth.hello_context(nl))
                chan.into.set(key, auth.welcome_context(nl, nc))
                session = (c2l, b"")
            chan.send(hello, then=session)
            msg, fds = chan.recv(deadline)
            if key is not None:
                chan.into.set(l2c)
            try:
                if msg["type"] == "refuse":
                    sock.close()
                    return self._refused(msg, cluster_id, name, deadline), None
                if msg["type"] != "welcome":
                    raise ProtocolError("expected a welcome")
                refusal = self._check_hello(msg, cluster_id)
                if refusal is not None:
                    raise ProtocolError(refusal[1])
                peer = Peer(self, chan, msg, fds)
            finally:
                chan.close_fds(fds)
            if peer.path == "mooncake":
                self.ensure_engine(chan.local_ip)
            # The listener knows us now: our caches (with their memfds, on a Unix socket) go
            # only after its welcome proved who it is. It whitelisted us before its welcome;
            # now whitelist it, and say so.
            out: Optional[List[int]] = [] if chan.unix else None
            self._allow_imports(peer)
            peer.send({"type": "caches", "caches": self._my_caches(out)}, out or ())
            while True:       # the listener may announce caches before it acknowledges ours
                got, more = chan.recv(deadline)
                try:
                    if got["type"] == "ack" and got.get("seq") == 0:
                        break
                    if peer._handle(got, more):
                        raise ProtocolError("the cluster unlinked during the handshake")
                finally:
                    chan.close_fds(more)
            peer.ipc_ready.set()
            peer.send({"type": "ipc_ready"})
        except Exception as exc:  # noqa: BLE001 - a failed link is a status, whatever the cause
            log.info("link to cluster %s failed: %s: %s", name, type(exc).__name__, exc)
            if peer is not None:
                peer.close(LLMStatusCode.LLM_LINK_FAILED)
            sock.close()
            return LLMStatusCode.LLM_LINK_FAILED, None
        cid = peer.cluster_id
        with self.lock:
            if self.closed or cid in self.peers:
                peer.closed = True
                sock.close()
                return (LLMStatusCode.LLM_ALREADY_LINK if not self.closed
                        else LLMStatusCode.LLM_LINK_FAILED), None
            peer.linked_here = True
            peer.ready.set()
            self.peers[cid] = peer
            self.ever_linked.add(cid)
        threading.Thread(target=peer.serve, name=f"llmdist-peer-{cid}", daemon=True).start()
        return LLMStatusCode.LLM_SUCCESS, peer

    def _refused(self, msg: dict, cluster_id: Optional[int], name, deadline: float
                 ) -> LLMStatusCode:
        """The status of a link the listener refused."""
        code = msg.get("code")
        log.info("cluster %s refused the link: %s", name, msg.get("reason"))
        if code not in (int(LLMStatusCode.LLM_ALREADY_LINK),
                        int(LLMStatusCode.LLM_PROCESSING_LINK)):
            return LLMStatusCode.LLM_LINK_FAILED
        # The peer holds a link to us (or is making one): if it is ours to claim, this call
        # made it.
        theirs = _int(msg.get("cluster_id"))
        if cluster_id is not None and theirs != cluster_id:
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
        if peer is None:
            return LLMStatusCode.LLM_SUCCESS if known else LLMStatusCode.LLM_NOT_YET_LINK
        peer.stop(LLMStatusCode.LLM_LINK_FAILED)     # our imports of its memory close first
        acked = peer.request({"type": "unlink"}, timeout_ms / 1000.0)
        peer.close(LLMStatusCode.LLM_LINK_FAILED)
        ok = acked or force or peer.peer_unlinked
        return LLMStatusCode.LLM_SUCCESS if ok else LLMStatusCode.LLM_UNLINK_FAILED

    def link_down(self, peer: Peer, code, ack: Optional[int] = None) -> None:
        with self.lock:
            if self.peers.get(peer.cluster_id) is peer:
                del self.peers[peer.cluster_id]
        peer.close(code, ack)

    # -- announcements (called without the cache manager's lock)
    def _each_peer(self, msg: dict, cache: Optional[MemoryEntry] = None) -> None:
        """Send msg to every peer at once and wait for their acks until one deadline
        (llmdist.ack_timeout_ms); a peer that misses it is unlinked. With cache, msg["cache"]
        is that cache as each peer may see it (its memfd goes along on a Unix socket)."""
        with self.lock:
            peers = list(self.peers.values())
        if not peers:
            return
        deadline = time.monotonic() + self.limits.ack_timeout_s
        sent = []
        for p in peers:
            m, fds = dict(msg), None
            if cache is not None:
                fds = [] if p.chan.unix else None
                m["cache"] = cache_to_wire(cache, fds)
            sent.append((p, p.post(m, deadline, fds or ())))
        for p, seq in sent:
            if (seq is None or not p.await_ack(seq, deadline)) and not p.closed:
                log.warning("cluster %d did not acknowledge %s within %.0f ms (option "
                            "llmdist.ack_timeout_ms): unlinking it", p.cluster_id, msg["type"],
                            self.limits.ack_timeout_s * 1000)
                self.link_down(p, LLMStatusCode.LLM_LINK_FAILED)

    def announce_cache(self, entry: Optional[MemoryEntry]) -> None:
        if entry is not None:
            self._engine_register(entry)
            self._each_peer({"type": "cache_add"}, entry)

    def withdraw_cache(self, entry: MemoryEntry) -> None:
        self._each_peer({"type": "cache_remove", "cache_id": entry.cache.cache_id})
        self._engine_unregister(entry)

    def withdraw_key(self, key) -> None:
        self._each_peer({"type": "key_remove", "key": key_to_wire(key)})

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Unlink every peer (each stops writing here before it acknowledges; bounded by
        timeout_s in all, by default llmdist.ack_timeout_ms) and stop listening."""
        with self.lock:
            self.closed = True
            peers = list(self.peers.values())
            self.peers.clear()
        for p in peers:
            p.stop(LLMStatusCode.LLM_LINK_FAILED)    # before the peers hear of it (see unlink)
        deadline = time.monotonic() + (self.limits.ack_timeout_s if timeout_s is None
                                       else timeout_s)
        sent = [(p, p.post({"type": "unlink"}, deadline)) for p in peers]
        for p, seq in sent:
            if seq is not None:
                p.await_ack(seq, deadline)
        for p in peers:
            p.close(LLMStatusCode.LLM_LINK_FAILED)
        self.stop_listening()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            with self.engine_ranges_lock:
                self.engine_held.clear()
                self.engine_users.clear()
