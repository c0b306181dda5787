"""The handshake of a cluster link, and the listening sockets it starts on.

A listener sends a challenge (protocol version, a nonce, whether it holds a key, its host
identity and, for a client of this host, the name of its Unix socket). The client answers with
a hello (cluster ids, role, runtime, Mooncake session, rendezvous comm); the listener welcomes
it with its own hello and its caches, the client sends its caches, and the listener
acknowledges them. With a shared key (auth.py) both sides prove they hold it and every frame
carries a MAC. A client of this host continues on the listener's Unix socket, where the kernel
names each side's process (SO_PEERCRED) and file descriptors can pass."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from typing import List, Optional, Tuple, Union

from . import auth
from .auth import AuthError, Channel, ProtocolError
from .data_path import PeerPath
from .frames import (
    Ack,
    Caches,
    Challenge,
    Hello,
    IpcReady,
    Refuse,
    VersionMismatch,
    link_frame,
)
from .peer import Peer
from .status import LLMStatusCode

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # the whole handshake, however slowly its bytes arrive
FIRST_FRAME_S = 1.0  # the client's first frame, from its connection
MAX_HANDSHAKES = 32  # handshakes in progress at once (see handshake_slots.py)


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


def source_of(conn: socket.socket, address) -> str:
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

    @classmethod
    def bind(cls, address: Tuple[str, int]) -> "Listener":
        """Listen on address and on a new Unix-socket companion (without one, peers on this
        host link over TCP). Raises OSError when the address cannot be bound."""
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
            log.warning(
                "no Unix socket beside %s:%d (%s): peers on this host link over TCP and "
                "get no shared memory or process route",
                address[0],
                address[1],
                exc,
            )
            unix.close()
            unix = name = None
        return cls(sock, unix, name)

    def close(self) -> None:
        close_listener(self.tcp)
        if self.unix is not None:
            close_listener(self.unix)


def open_channel(
    address: Tuple[str, int], key: Optional[bytes], host: str, deadline: float
) -> Tuple[Channel, Challenge]:
    """Connect to a listener and read its challenge; a listener on this host (the same host
    identity) is reached on its Unix socket instead (named in the challenge), where the kernel
    tells each side who the other is. Raises AuthError when one side has a key and the other
    has none."""
    sock = socket.create_connection(address, timeout=max(0.001, deadline - time.monotonic()))
    chan = Channel(sock)
    local_ip = chan.local_ip
    try:
        challenge = read_challenge(chan, key, deadline)
        name = challenge.unix
        if name is None or challenge.host != host:
            return chan, challenge
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.settimeout(max(0.001, deadline - time.monotonic()))
            unix.connect(b"\0" + name.encode())
        except OSError as exc:
            unix.close()
            log.info(
                "the Unix socket of the cluster at %s:%d is out of reach (%s): linking over TCP",
                address[0],
                address[1],
                exc,
            )
            return chan, challenge
    except BaseException:
        sock.close()
        raise
    sock.close()
    chan = Channel(unix, local_ip)
    try:
        return chan, read_challenge(chan, key, deadline)
    except BaseException:
        unix.close()
        raise


def read_challenge(chan: Channel, key: Optional[bytes], deadline: float) -> Challenge:
    """Read and check the listener's challenge; on a key mismatch tell the listener why
    (so that its log names authentication) and raise AuthError."""
    try:
        return _checked_challenge(chan, key, deadline)
    except AuthError as exc:
        try:
            chan.send(Refuse(int(LLMStatusCode.LLM_LINK_FAILED), str(exc)).to_wire())
        except OSError:
            pass
        raise


def _checked_challenge(chan: Channel, key: Optional[bytes], deadline: float) -> Challenge:
    msg, fds = chan.recv(deadline)
    chan.close_fds(fds)
    if msg["type"] == "refuse":
        raise ProtocolError(f"refused: {Refuse.from_wire(msg).reason[:200]}")
    if msg["type"] != "challenge":
        raise ProtocolError("expected a challenge")
    challenge = Challenge.from_wire(msg)
    if challenge.auth and key is None:
        raise AuthError(
            "authentication required: the listener has a key and this side "
            "has none (llmdist.auth_key)"
        )
    if not challenge.auth and key is not None:
        raise AuthError(
            "authentication failed: the listener has no key "
            "(llmdist.auth_key) and this side requires one"
        )
    return challenge


def client_handshake(
    node,
    chan: Channel,
    challenge: Challenge,
    hello: Hello,
    key: Optional[bytes],
    expect: Optional[int],
    deadline: float,
) -> Union[Peer, Refuse]:
    """The client's side after the challenge: send hello (with a key, proving it and moving
    to the session's MAC keys), check the welcome, make the Peer, send this side's caches,
    take the listener's announcements until it acknowledges them, then send ipc_ready. Returns
    the Peer, or the listener's refusal; raises otherwise (the Peer closed)."""
    session = None
    if key is not None:
        nl = challenge.nonce
        nc = auth.new_nonce()
        hello = replace(hello, nonce=nc)
        l2c, c2l = auth.session_keys(key, nl, nc)
        chan.out.set(key, auth.hello_context(nl))
        chan.into.set(key, auth.welcome_context(nl, nc))
        session = (c2l, b"")
    chan.send(hello.to_wire(), then=session)
    msg, fds = chan.recv(deadline)
    if key is not None:
        chan.into.set(l2c)
    try:
        if msg["type"] == "refuse":
            return Refuse.from_wire(msg)
        if msg["type"] != "welcome":
            raise ProtocolError("expected a welcome")
        welcome, refusal = check_hello(msg, node.cluster_id, expect)
        if refusal is not None:
            raise ProtocolError(refusal[1])
        peer = Peer(node, chan, welcome, fds)
    finally:
        chan.close_fds(fds)
    try:
        if peer.path is PeerPath.MOONCAKE:
            node.ensure_engine(chan.local_ip)
        # The listener knows us now: our caches (with their memfds, on a Unix socket) go only
        # after its welcome proved who it is. It allowed our imports before its welcome; now
        # allow its imports, and say so.
        out: Optional[List[int]] = [] if chan.unix else None
        node.allow_imports(peer)
        chan.send(Caches(node.caches_on_wire(out)).to_wire(), out or ())
        while True:  # the listener may announce caches before it acknowledges ours
            got, more = chan.recv(deadline)
            try:
                frame = link_frame(got)
                if isinstance(frame, Ack) and frame.seq == 0:
                    break
                if peer.handle(frame, more):
                    raise ProtocolError("the cluster unlinked during the handshake")
            finally:
                chan.close_fds(more)
        peer.ipc_ready.set()
        peer.send(IpcReady())
    except BaseException:
        peer.close(LLMStatusCode.LLM_LINK_FAILED)
        raise
    return peer


def check_hello(
    msg: dict, own_id: int, expect: Optional[int], rendezvous: bool = False
) -> Tuple[Optional[Hello], Optional[Tuple[int, str]]]:
    """(the hello, None) when cluster own_id accepts the hello msg, else (None, (status,
    reason)). Roles do not restrict links (as upstream: PROMPT-PROMPT and DECODER-DECODER links
    serve migration and prefix sharing); the role is checked for form only. A hello naming a
    rank-table comm is accepted on that comm's rendezvous listener only (rendezvous; it checks
    the comm)."""
    failed = int(LLMStatusCode.LLM_LINK_FAILED)
    try:
        hello = Hello.from_wire(msg)
    except VersionMismatch as exc:
        return None, (failed, str(exc))
    except ProtocolError as exc:
        return None, (failed, f"malformed handshake: {exc}")
    cid = hello.cluster_id
    if expect is not None and cid != expect:
        return None, (failed, f"expected cluster {expect}, reached {cid}")
    if cid == own_id:
        return None, (failed, f"cluster {cid} cannot link to itself")
    if hello.comm is not None and not rendezvous:
        return None, (
            failed,
            "a hello naming a rank-table comm is accepted on that comm's rendezvous port only",
        )
    return hello, None
