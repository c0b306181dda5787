"""The control protocol spoken by hand, for tests of what a listener does with what a peer
sends: frames, a hello, and RawPeer, a control connection made without llmdist's client code.
Frames are unkeyed."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import Optional, Sequence

from llmdist import LLMRole, cluster

HOST = "127.0.0.1"


def frame(obj, magic: bytes = cluster.MAGIC) -> bytes:
    """One frame: magic, big-endian length, JSON (or the given bytes)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return magic + struct.pack(">I", len(data)) + data


def hello(cid: int, target: Optional[int], role: object = LLMRole.PROMPT, **over) -> dict:
    """A handshake as a cluster of role (PROMPT by default; sent as given, so that an ill-typed
    role can be tried) on this host (so no Mooncake engine is involved), announcing no caches;
    ``over`` replaces fields."""
    msg = {
        "type": "hello",
        "version": cluster.PROTOCOL_VERSION,
        "cluster_id": cid,
        "role": role,
        "target": target,
        "host": cluster.host_identity(),
        "pid": os.getpid(),
        "caches": [],
    }
    msg.update(over)
    return msg


def read_frame(sock: socket.socket) -> dict:
    """One frame (ConnectionError when the connection ends first)."""

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    head = exact(8)
    (n,) = struct.unpack(">I", head[4:])
    return json.loads(exact(n))


def recv_msg(sock: socket.socket, timeout: float = 5.0) -> Optional[dict]:
    """One frame from the listener, or None when it closed the connection."""
    sock.settimeout(timeout)
    try:
        return read_frame(sock)
    except (ConnectionError, OSError):
        return None


class RawPeer:
    """A control connection made by hand: the listener's challenge is read (and, with unix, the
    connection moved to the listener's Unix socket, where the listener learns our pid and uid
    from the kernel)."""

    def __init__(
        self, port: int, unix: bool = False, host: str = HOST, timeout: float = 5.0
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(1.0)
        try:
            self.challenge: Optional[dict] = self.recv()
        except socket.timeout:
            self.challenge = None  # a listener that sends no challenge (older protocol)
        self.sock.settimeout(timeout)
        if self.challenge is not None:
            assert self.challenge["type"] == "challenge", self.challenge
        if unix and self.challenge is not None:
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.settimeout(timeout)
            u.connect(b"\0" + self.challenge["unix"].encode())
            self.sock.close()
            self.sock = u
            self.challenge = self.recv()

    def send(self, msg, fds: Sequence[int] = ()) -> None:
        buf = frame(msg)
        if fds:
            self.sock.sendmsg(
                [buf], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
        else:
            self.sock.sendall(buf)

    def recv(self) -> dict:
        return read_frame(self.sock)

    def link(self, hello: dict, caches: Sequence[dict] = (), fds: Sequence[int] = ()) -> dict:
        """Send hello; on a welcome send our caches (with fds) and read up to the listener's
        acknowledgement. Returns the listener's answer to the hello."""
        self.send(hello)
        reply = self.recv()
        if reply["type"] == "welcome" and self.challenge is not None:
            self.send({"type": "caches", "caches": list(caches)}, fds)
            while True:
                got = self.recv()
                if got["type"] == "ack" and got.get("seq") == 0:
                    break
        return reply

    def close(self) -> None:
        self.sock.close()
