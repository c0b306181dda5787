"""The listener's side of a cluster (Admission, a part of ClusterNode): it accepts connections,
runs the listener's half of each handshake (handshake.py has the client's) and admits the peer.

Each connection holds one of the bounded handshake slots (handshake_slots.py) until its
handshake ends. A hello is refused (a "refuse" frame naming the status) when it is malformed,
meant for another cluster, refused by the rank-table rendezvous, or from a cluster already
linked or being accepted; a role switch (begin_switch) ends the handshakes in progress and
admits none of them. An admitted peer is registered before its caches arrive, so that no
announcement misses it, and counts as linked once its caches are recorded."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, List, Optional, Tuple

from . import auth
from .auth import AuthError, Channel, ProtocolError
from .data_path import PeerPath
from .frames import Ack, Caches, Challenge, Hello, Refuse
from .handshake import (
    FIRST_FRAME_S,
    HANDSHAKE_TIMEOUT_S,
    MAX_HANDSHAKES,
    Listener,
    check_hello,
    source_of,
)
from .peer import Peer
from .status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

Admit = Callable[[Hello], Optional[Tuple[int, str]]]  # a rendezvous' own check of a hello


class Admission:
    """The listener's side of ClusterNode, which holds the state it works on: cluster_id,
    host, key, caches, lock and its condition changed, peers, accepting, linking,
    in_handshake, epoch, switching, closed, handshakes, ready_hooks, listener and port; and
    the methods _hello, ensure_engine, allow_imports and link_down."""

    def open_listener(
        self,
        address: Tuple[str, int],
        admit: Optional[Admit] = None,
        key: Optional[bytes] = None,
    ) -> Listener:
        """Accept links on address (and on a Unix-socket companion) until the returned listener
        is closed. admit, when given, may refuse a handshake that passed the usual checks
        ((status, reason) or None); key, when given, is the key clients must prove they hold.
        Raises OSError when the address cannot be bound."""
        listener = Listener.bind(address)
        # the address a Mooncake engine of a peer linked over the Unix socket is told
        local_ip = address[0] if address[0] not in ("", "0.0.0.0") else "127.0.0.1"
        for s, redirect in ((listener.tcp, listener.unix_name), (listener.unix, None)):
            if s is not None:
                threading.Thread(
                    target=self._accept_loop,
                    args=(s, admit, key, redirect, local_ip),
                    name="llmdist-listen",
                    daemon=True,
                ).start()
        return listener

    def start_listening(self, listen: Tuple[str, int]) -> None:
        """Accept links on listen (llm.listenIpInfo), replacing the current listener."""
        try:
            listener = self.open_listener(listen, key=self.key)
        except OSError as exc:
            raise LLMException(
                f"cannot listen on {listen[0]}:{listen[1]}: {exc}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            ) from None
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
        with self.changed:
            while self.in_handshake:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "%d handshakes still in progress at a role switch; none of them "
                        "will be admitted",
                        len(self.in_handshake),
                    )
                    break
                self.changed.wait(left)

    def end_switch(self) -> None:
        """Admit links again, from handshakes that start from now on."""
        with self.lock:
            self.epoch += 1
            self.switching = False

    def _accept_loop(
        self,
        sock: socket.socket,
        admit=None,
        key: Optional[bytes] = None,
        redirect: Optional[str] = None,
        local_ip: Optional[str] = None,
    ) -> None:
        while True:
            try:
                conn, source = sock.accept()
            except OSError:
                return
            source = source_of(conn, source)
            if not self.handshakes.take(conn, source):
                log.info(
                    "refused a connection from %s: its %d handshake slots (option "
                    "llmdist.handshakes_per_address) or all %d are busy",
                    source,
                    self.handshakes.per_address,
                    MAX_HANDSHAKES,
                )
                conn.close()
                continue
            with self.lock:
                self.in_handshake[conn] = self.epoch
            threading.Thread(
                target=self._handshake,
                args=(conn, admit, key, redirect, local_ip),
                name="llmdist-handshake",
                daemon=True,
            ).start()

    def _handshake(
        self,
        conn: socket.socket,
        admit=None,
        key: Optional[bytes] = None,
        redirect: Optional[str] = None,
        local_ip: Optional[str] = None,
    ) -> None:
        """Run one handshake (a slot of the bounded count is held), then serve the link. Any
        failure, whatever its kind, closes the connection and leaves no peer behind."""
        peer = None
        try:
            peer = self._accept_one(conn, admit, key, redirect, local_ip)
        except Exception as exc:  # noqa: BLE001 - nothing a client sends may kill this thread
            level = (
                logging.INFO
                if isinstance(exc, (ConnectionError, OSError, ProtocolError, LLMException))
                else logging.WARNING
            )
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
                self.changed.notify_all()
            self.handshakes.release(conn)
        if peer is not None:
            peer.serve()

    def _accept_one(
        self,
        conn: socket.socket,
        admit=None,
        key: Optional[bytes] = None,
        redirect: Optional[str] = None,
        local_ip: Optional[str] = None,
    ) -> Optional[Peer]:
        """The listener's side of a handshake: the linked peer, or None when refused. admit:
        see open_listener; key: the key the client must prove it holds; redirect: the name of
        the Unix socket a client on this host continues on."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        chan = Channel(conn, local_ip)
        nl = auth.new_nonce()
        chan.send(Challenge(nl, key is not None, self.host, redirect).to_wire())
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
                nc = Hello.nonce_of(msg)
                l2c, c2l = auth.session_keys(key, nl, nc)
                chan.out.set(key, auth.welcome_context(nl, nc))
                chan.into.set(c2l)
                session = (l2c, b"")
        except AuthError:
            chan.out.set(None)
            try:
                chan.send(
                    Refuse(int(LLMStatusCode.LLM_LINK_FAILED), "authentication failed").to_wire()
                )
            except OSError:
                pass
            raise
        try:
            if msg["type"] == "refuse":
                raise AuthError(f"the client refused: {Refuse.from_wire(msg).reason[:200]}")
            if msg["type"] != "hello":
                raise ProtocolError("expected a handshake")
            hello, refusal = check_hello(msg, self.cluster_id, None, rendezvous=admit is not None)
            if refusal is None and hello.target not in (None, self.cluster_id):
                refusal = (
                    int(LLMStatusCode.LLM_LINK_FAILED),
                    f"this is cluster {self.cluster_id}, not {hello.target}",
                )
            if refusal is None and admit is not None:
                refusal = admit(hello)
            if refusal is None and self.caches is None:
                refusal = (int(LLMStatusCode.LLM_LINK_FAILED), "cluster is finalized")
            if refusal is None:
                refusal = self._begin_accept(hello.cluster_id)
            if refusal is not None:
                chan.send(Refuse(refusal[0], refusal[1], self.cluster_id).to_wire())
                conn.close()
                return None
            try:
                return self._admit(chan, hello, fds, deadline, session)
            finally:
                with self.lock:
                    self.accepting.discard(hello.cluster_id)
                    self.changed.notify_all()
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
                return (
                    int(LLMStatusCode.LLM_PROCESSING_LINK),
                    f"cluster {self.cluster_id} is linking to cluster {cid} itself",
                )
            self.accepting.add(cid)
        return None

    def _admit(
        self,
        chan: Channel,
        hello: Hello,
        fds: List[int],
        deadline: float,
        session: Optional[Tuple[bytes, bytes]],
    ) -> Peer:
        """Register an accepted peer, welcome it and take its caches (the "caches" frame that
        answers the welcome, acknowledged)."""
        conn = chan.sock
        peer = Peer(self, chan, hello, fds)
        try:
            if peer.path is PeerPath.MOONCAKE:
                self.ensure_engine(chan.local_ip)
            self.allow_imports(peer)  # before the welcome lists our caches
            with self.lock:
                if self.closed or hello.cluster_id in self.peers:
                    raise ProtocolError("closed or linked meanwhile")
                if self.switching or self.in_handshake.get(conn) != self.epoch:
                    raise ProtocolError("the cluster switched its role meanwhile")
                self.in_handshake.pop(conn, None)  # a link now, not a handshake
                self.peers[peer.cluster_id] = peer
                self.ever_linked.add(peer.cluster_id)
                self.changed.notify_all()
            out: Optional[List[int]] = [] if chan.unix else None
            welcome = self._hello(peer.cluster_id, out).to_wire(welcome=True)
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            chan.send(welcome, out or (), then=session)
            got, more = chan.recv(deadline)
            try:
                if got["type"] != "caches":
                    raise ProtocolError("expected the peer's caches")
                peer.add_caches(Caches.from_wire(got).caches, more)
            finally:
                chan.close_fds(more)
            # linked here before the linker hears it is: a member waiting for this link (a
            # rank-table comm) sees it before the linker can act on it
            peer.ready.set()
            for hook in list(self.ready_hooks):
                hook(peer.cluster_id)
            peer.send(Ack(0))
        except BaseException:
            # The client hears nothing more of this link: forget it, so that a later link of
            # the same cluster id is not refused as a duplicate.
            self.link_down(peer, LLMStatusCode.LLM_LINK_FAILED)
            raise
        return peer
