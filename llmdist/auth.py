"""Framing and authentication of the control connection.

A frame is MAGIC (4 bytes) + length (4 bytes, big endian) + JSON. With a shared key every frame
ends with a 32-byte HMAC-SHA256 tag and starts with KEYED_MAGIC instead. The handshake runs:

    listener -> challenge {nonce Nl, auth: whether it has a key}        (plain)
    client   -> hello {..., nonce Nc}      tag = HMAC(K, "hello" Nl | 0 | hello)
    listener -> welcome                    tag = HMAC(K, "welcome" Nl Nc | 0 | welcome)
    then each direction: tag = HMAC(S_dir, seq | frame), S_dir = HMAC(K, dir Nl Nc), seq 1, 2, ...

so that each side proves it holds K over the other side's fresh nonce (no replay of an old
handshake), and a later frame cannot be injected, replayed, reordered or reflected. The
receiver counts the sequence itself: it is never read from the wire.

On a Unix socket a frame may carry file descriptors (SCM_RIGHTS; the shared memory of host
caches); more than one frame can hold are sent ahead in "fds" frames."""

from __future__ import annotations

import array
import hashlib
import hmac
import json
import os
import secrets
import select
import socket
import stat
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple

from .status import LLMException, LLMStatusCode

MAGIC = b"LLMD"
KEYED_MAGIC = b"LLMA"
TAG = 32
NONCE = 16
MAX_FRAME = 4 << 20  # a hello of 8,192 caches fits; anything larger is refused unread
MAX_FDS = 250  # descriptors per frame (the kernel takes at most 253 in one message)
MAX_PENDING_FDS = 4096  # descriptors a peer may send ahead of the frame that uses them
ENV_KEY = "LLMDIST_AUTH_KEY"
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+


class ProtocolError(Exception):
    """A frame that is not ours, too large, truncated, or not the JSON we expect."""


class AuthError(ProtocolError):
    """The peer did not prove it holds the shared key (or has none while this side has one)."""


# ------------------------------------------------------------------------------------------
# The key


def load_key(options: Dict[str, str]) -> Optional[bytes]:
    """The shared key from llmdist.auth_key, llmdist.auth_key_file or LLMDIST_AUTH_KEY (first
    set wins), or None. A key file must not be readable by group or others."""
    text = options.get("llmdist.auth_key")
    if text:
        return text.encode()
    path = options.get("llmdist.auth_key_file")
    if path:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise LLMException(
                        f"option llmdist.auth_key_file: {path} must not be accessible by group "
                        f"or others (mode {stat.S_IMODE(st.st_mode):o}; chmod 600 it)",
                        status_code=LLMStatusCode.LLM_PARAM_INVALID,
                    )
                key = f.read().strip()
        except OSError as exc:
            raise LLMException(
                f"option llmdist.auth_key_file: cannot read {path}: {exc}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            ) from None
        if not key:
            raise LLMException(
                f"option llmdist.auth_key_file: {path} is empty",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        return key
    env = os.environ.get(ENV_KEY)
    return env.encode() if env else None


def comm_key(key: Optional[bytes], comm: str) -> Optional[bytes]:
    """The key of the links of rank-table comm `comm`."""
    if key is None:
        return None
    return hmac.new(key, b"llmdist comm\0" + comm.encode(), hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE)


def nonce_from_wire(v) -> bytes:
    if type(v) is not str or len(v) != 2 * NONCE:
        raise ProtocolError("bad nonce")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ProtocolError("bad nonce") from None


def hello_context(nl: bytes) -> bytes:
    return b"hello" + nl


def welcome_context(nl: bytes, nc: bytes) -> bytes:
    return b"welcome" + nl + nc


def session_keys(key: bytes, nl: bytes, nc: bytes) -> Tuple[bytes, bytes]:
    """(listener-to-client key, client-to-listener key) of one connection."""
    return (
        hmac.new(key, b"l2c" + nl + nc, hashlib.sha256).digest(),
        hmac.new(key, b"c2l" + nl + nc, hashlib.sha256).digest(),
    )


# ------------------------------------------------------------------------------------------
# Frames


class _Direction:
    """The key, context and sequence number of one direction of a channel."""

    def __init__(self) -> None:
        self.key: Optional[bytes] = None
        self.context = b""
        self.seq = 0

    def set(self, key: Optional[bytes], context: bytes = b"") -> None:
        self.key, self.context, self.seq = key, context, 0

    def tag(self, data: bytes) -> bytes:
        mac = hmac.new(
            self.key, self.context + struct.pack(">Q", self.seq) + data, hashlib.sha256
        ).digest()
        self.seq += 1
        return mac


Creds = Tuple[int, int, int]  # (pid, uid, gid) of the process at the other end


def _wait_writable(sock: socket.socket, deadline: float) -> None:
    """Wait until sock can take more bytes; socket.timeout once deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("the peer did not read in time")
    poll = select.poll()
    poll.register(sock, select.POLLOUT)
    poll.poll(left * 1000.0)


class Channel:
    """One control connection: frames out and in, authenticated once keys are set, with file
    descriptors on a Unix socket."""

    def __init__(self, sock: socket.socket, local_ip: Optional[str] = None) -> None:
        self.sock = sock
        self.unix = sock.family == socket.AF_UNIX
        # this side's IP address on the network the peer was reached through
        self.local_ip = local_ip if self.unix else sock.getsockname()[0]
        self.send_lock = threading.Lock()
        self.out = _Direction()
        self.into = _Direction()
        self.pending_fds: List[int] = []

    @property
    def keyed(self) -> bool:
        return self.into.key is not None

    def peer_creds(self) -> Optional[Creds]:
        """The kernel's word on the process at the other end (SO_PEERCRED), on a Unix socket."""
        if not self.unix:
            return None
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)

    def peer_pidfd(self) -> int:
        """A pidfd of the process at the other end of the Unix socket (SO_PEERPIDFD: the very
        process that connected; on older kernels pidfd_open of its pid), or -1. The caller
        owns it."""
        if not self.unix:
            return -1
        try:
            return self.sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            pass
        creds = self.peer_creds()
        if creds is None or creds[0] <= 0:
            return -1
        try:
            return os.pidfd_open(creds[0])
        except (OSError, AttributeError):
            return -1

    # -- out
    def send(
        self,
        msg: dict,
        fds: List[int] = (),
        then: Optional[Tuple[bytes, bytes]] = None,
        deadline: Optional[float] = None,
    ) -> None:
        """Send msg (with fds on a Unix socket); then, when given, switches the outgoing
        direction to that (key, context) right after this frame. By time.monotonic() deadline
        when given: socket.timeout after it, when the frame may be cut short and the
        connection is then unusable."""
        data = json.dumps(msg, separators=(",", ":")).encode()
        if deadline is None:
            self.send_lock.acquire()
        elif not self.send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise socket.timeout("another send to the peer did not finish in time")
        try:
            fds = list(fds)
            while len(fds) > MAX_FDS:
                self._send_one(b'{"type":"fds"}', fds[:MAX_FDS], deadline)
                fds = fds[MAX_FDS:]
            self._send_one(data, fds, deadline)
            if then is not None:
                self.out.set(*then)
        finally:
            self.send_lock.release()

    def _send_one(self, data: bytes, fds: List[int], deadline: Optional[float]) -> None:
        if self.out.key is None:
            buf = MAGIC + struct.pack(">I", len(data)) + data
        else:
            buf = KEYED_MAGIC + struct.pack(">I", len(data)) + data + self.out.tag(data)
        view = memoryview(buf)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            flags = 0 if deadline is None else socket.MSG_DONTWAIT
            while True:
                try:
                    view = view[self.sock.sendmsg([view], anc, flags) :]
                    break
                except (BlockingIOError, socket.timeout):
                    if deadline is None:
                        raise
                    _wait_writable(self.sock, deadline)
        if deadline is None:
            self.sock.sendall(view)
            return
        while view:
            try:
                view = view[self.sock.send(view, socket.MSG_DONTWAIT) :]
            except (BlockingIOError, socket.timeout):
                pass
            if view:
                _wait_writable(self.sock, deadline)

    # -- in
    def _recv_exact(self, n: int, deadline: Optional[float]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("the handshake took too long")
                self.sock.settimeout(left)
            want = min(n - len(buf), 1 << 20)
            if self.unix:
                chunk, anc, flags, _ = self.sock.recvmsg(want, socket.CMSG_SPACE(MAX_FDS * 4))
                self._take_fds(anc, flags)
            else:
                chunk = self.sock.recv(want)
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        return bytes(buf)

    def _take_fds(self, anc, flags: int) -> None:
        got: List[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - len(data) % a.itemsize])
                got.extend(a)
        self.pending_fds.extend(got)
        if flags & socket.MSG_CTRUNC or len(self.pending_fds) > MAX_PENDING_FDS:
            self.close_fds()
            raise ProtocolError("too many file descriptors")

    def close_fds(self, fds: Optional[List[int]] = None) -> None:
        """Close fds (default: every descriptor received and not taken yet)."""
        if fds is None:
            fds, self.pending_fds = self.pending_fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def recv(self, deadline: Optional[float] = None) -> Tuple[dict, List[int]]:
        """One message and the descriptors that came with it (the caller closes them); by
        time.monotonic() deadline when given, whatever the pace of the bytes."""
        while True:
            data = self._recv_data(deadline)
            try:
                msg = json.loads(data)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise ProtocolError(
                    f"frame is not JSON of a sane depth: {type(exc).__name__}"
                ) from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ProtocolError("frame is not a message")
            if msg["type"] != "fds":
                fds, self.pending_fds = self.pending_fds, []
                return msg, fds

    def _recv_data(self, deadline: Optional[float]) -> bytes:
        head = self._recv_exact(8, deadline)
        magic = head[:4]
        (n,) = struct.unpack(">I", head[4:])
        if magic not in (MAGIC, KEYED_MAGIC):
            raise ProtocolError("bad magic")
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes is over the {MAX_FRAME}-byte limit")
        keyed = self.into.key is not None
        if magic == MAGIC and keyed:
            raise AuthError(
                "authentication failed: the peer sent a frame without a MAC "
                f"({self._reason(self._recv_exact(n, deadline))})"
            )
        if magic == KEYED_MAGIC and not keyed:
            raise AuthError(
                "authentication failed: the peer authenticates with a key "
                "(llmdist.auth_key) and this side has none"
            )
        data = self._recv_exact(n, deadline)
        if keyed:
            tag = self._recv_exact(TAG, deadline)
            if not hmac.compare_digest(tag, self.into.tag(data)):
                raise AuthError(
                    "authentication failed: bad MAC (another key, or a forged, "
                    "replayed or reordered frame)"
                )
        return data

    @staticmethod
    def _reason(data: bytes) -> str:
        """What an unauthenticated frame says, for the log only."""
        try:
            msg = json.loads(data)
            if isinstance(msg, dict) and msg.get("type") == "refuse":
                return f"it refused: {str(msg.get('reason'))[:200]}"
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
        return "it has no key, or not ours"
