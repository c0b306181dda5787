"""The control frames of a cluster link as typed messages.

Each frame type is a frozen dataclass: to_wire() gives the JSON object that goes over the
connection (auth.Channel frames it), from_wire() checks every field a peer sent (wire_checks.py)
and raises ProtocolError naming the first bad one, so that readers use typed attributes only.
Caches inside a frame stay wire objects here: the Peer checks each one as it records it
(wire.cache_from_wire), with the descriptors that came along.

The handshake speaks Challenge, Hello (a client's hello, a listener's welcome), Refuse and
Caches; a linked peer speaks the LINK_FRAMES. A request's seq is the number its Ack repeats."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Type, Union

from .auth import nonce_from_wire
from .descs import BlocksCacheKey, CacheKey, LLMRole
from .wire import key_from_wire, key_to_wire
from .wire_checks import MAX_TEXT, ProtocolError, check_enum, check_int, check_list, check_text

PROTOCOL_VERSION = 3
RUNTIMES = ("host", "acl", "cuda")  # the runtimes a hello may name
MAX_CACHE_ID = 2**63 - 1
UNIX_NAME = re.compile(r"llmdist-[0-9a-f]{32}", re.ASCII)  # a listener's Unix socket

Key = Union[CacheKey, BlocksCacheKey]


class VersionMismatch(ProtocolError):
    """A handshake frame of another protocol version."""


def _version(msg: dict) -> None:
    version = msg.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version!r:.40}")


def _seq(msg: dict) -> int:
    """A frame's sequence number (0 when it carries none)."""
    return check_int(msg.get("seq", 0))


# -- the handshake
@dataclass(frozen=True)
class Challenge:
    """A listener's first frame: its protocol version, a nonce for the session keys, whether it
    holds a key, its host identity and, for a client of its host, its Unix socket's name."""

    nonce: bytes
    auth: bool
    host: Optional[str]  # None when the listener sent no text
    unix: Optional[str] = None

    def to_wire(self) -> dict:
        w = {
            "type": "challenge",
            "version": PROTOCOL_VERSION,
            "nonce": self.nonce.hex(),
            "auth": self.auth,
            "host": self.host,
        }
        if self.unix is not None:
            w["unix"] = self.unix
        return w

    @classmethod
    def from_wire(cls, msg: dict) -> "Challenge":
        """The challenge msg; VersionMismatch for another protocol version, ProtocolError for
        a bad nonce or Unix socket name."""
        try:
            _version(msg)
        except VersionMismatch as exc:
            raise VersionMismatch(f"{exc}, this side speaks {PROTOCOL_VERSION}") from None
        nonce = nonce_from_wire(msg.get("nonce"))
        host = msg.get("host")
        unix = msg.get("unix")
        if unix is not None and (type(unix) is not str or not UNIX_NAME.fullmatch(unix)):
            raise ProtocolError("bad Unix socket name")
        return cls(nonce, msg.get("auth") is True, host if type(host) is str else None, unix)


@dataclass(frozen=True)
class Hello:
    """A handshake message (a client's hello, a listener's welcome), every field checked; its
    caches are checked one by one when the Peer records them (wire.cache_from_wire)."""

    cluster_id: int
    role: LLMRole
    target: Optional[int]  # the cluster the client meant to reach (None: any)
    host: str
    runtime: str  # one of RUNTIMES
    caches: list
    want_engine: bool  # the sender forces Mooncake (llmdist.transport=mooncake)
    mooncake: Optional[str] = None  # the sender's Mooncake session, when its engine runs
    engine_error: Optional[str] = None  # why the sender's engine did not start
    comm: Optional[str] = None  # the rank-table comm the link belongs to
    nonce: Optional[bytes] = None  # a keyed client's nonce for the session keys

    def to_wire(self, welcome: bool = False) -> dict:
        """The hello frame, or with welcome the listener's welcome."""
        w = {
            "type": "welcome" if welcome else "hello",
            "version": PROTOCOL_VERSION,
            "cluster_id": self.cluster_id,
            "role": int(self.role),
            "target": self.target,
            "host": self.host,
            "runtime": self.runtime,
            "caches": self.caches,
            "want_engine": self.want_engine,
        }
        for name in ("mooncake", "engine_error", "comm"):
            value = getattr(self, name)
            if value is not None:
                w[name] = value
        if self.nonce is not None:
            w["nonce"] = self.nonce.hex()
        return w

    @classmethod
    def from_wire(cls, msg: dict) -> "Hello":
        """The hello msg; VersionMismatch for another protocol version, ProtocolError naming
        its first bad field."""
        _version(msg)
        cluster_id = check_int(msg.get("cluster_id"))
        target = msg.get("target")
        if target is not None:
            check_int(target)
        runtime = msg.get("runtime", "host")
        if runtime not in RUNTIMES:
            raise ProtocolError("bad runtime")
        role = check_enum(LLMRole, msg.get("role"))
        host = check_text(msg.get("host"))
        caches = check_list(msg.get("caches"))
        want_engine = msg.get("want_engine", False)
        if type(want_engine) is not bool:
            raise ProtocolError("bad want_engine")
        texts = {
            k: check_text(msg[k]) if k in msg else None
            for k in ("mooncake", "engine_error", "comm")
        }
        nonce = nonce_from_wire(msg["nonce"]) if "nonce" in msg else None
        return cls(
            cluster_id, role, target, host, runtime, caches, want_engine, **texts, nonce=nonce
        )

    @staticmethod
    def nonce_of(msg: dict) -> bytes:
        """A keyed client's nonce, read before the rest of its hello is checked (the
        listener refuses a malformed hello under the session's keys)."""
        return nonce_from_wire(msg.get("nonce"))


@dataclass(frozen=True)
class Refuse:
    """Why one side ends a handshake. A refusal is read leniently: a field of the wrong type
    reads as None (code, cluster_id) or as its text (reason), since the link ends either way."""

    code: Optional[int]  # an LLMStatusCode value
    reason: str
    cluster_id: Optional[int] = None  # the refusing listener's cluster id

    def to_wire(self) -> dict:
        w = {"type": "refuse", "code": self.code, "reason": self.reason}
        if self.cluster_id is not None:
            w["cluster_id"] = self.cluster_id
        return w

    @classmethod
    def from_wire(cls, msg: dict) -> "Refuse":
        code, cid = msg.get("code"), msg.get("cluster_id")
        return cls(
            code if type(code) is int else None,
            str(msg.get("reason"))[:MAX_TEXT],
            cid if type(cid) is int and 0 <= cid <= 2**64 - 1 else None,
        )


@dataclass(frozen=True)
class Caches:
    """The client's caches, sent once the listener's welcome proved who it is."""

    caches: list

    def to_wire(self) -> dict:
        return {"type": "caches", "caches": self.caches}

    @classmethod
    def from_wire(cls, msg: dict) -> "Caches":
        return cls(check_list(msg.get("caches")))


# -- a linked peer's frames
@dataclass(frozen=True)
class Ack:
    """The answer to the request seq (seq 0: the listener took the client's caches)."""

    seq: int
    TYPE: ClassVar[str] = "ack"

    def to_wire(self) -> dict:
        return {"type": "ack", "seq": self.seq}

    @classmethod
    def from_wire(cls, msg: dict) -> "Ack":
        return cls(_seq(msg))


@dataclass(frozen=True)
class IpcReady:
    """The linking side whitelisted the listener for device IPC: it may import now."""

    seq: int = 0
    TYPE: ClassVar[str] = "ipc_ready"

    def to_wire(self) -> dict:
        return {"type": "ipc_ready"}

    @classmethod
    def from_wire(cls, msg: dict) -> "IpcReady":
        return cls(_seq(msg))


@dataclass(frozen=True)
class Unlink:
    """A request to end the link; acknowledged once the peer stopped writing here."""

    seq: int = 0
    TYPE: ClassVar[str] = "unlink"

    def to_wire(self) -> dict:
        return {"type": "unlink", "seq": self.seq}

    @classmethod
    def from_wire(cls, msg: dict) -> "Unlink":
        return cls(_seq(msg))


@dataclass(frozen=True)
class CacheAdd:
    """A cache the sender made reachable (a wire object, see the module docstring)."""

    cache: object
    seq: int = 0
    TYPE: ClassVar[str] = "cache_add"

    def to_wire(self) -> dict:
        return {"type": "cache_add", "cache": self.cache, "seq": self.seq}

    @classmethod
    def from_wire(cls, msg: dict) -> "CacheAdd":
        return cls(msg.get("cache"), _seq(msg))


@dataclass(frozen=True)
class CacheRemove:
    """A cache the sender withdraws; acknowledged once nothing writes into it any more."""

    cache_id: int
    seq: int = 0
    TYPE: ClassVar[str] = "cache_remove"

    def to_wire(self) -> dict:
        return {"type": "cache_remove", "cache_id": self.cache_id, "seq": self.seq}

    @classmethod
    def from_wire(cls, msg: dict) -> "CacheRemove":
        seq = _seq(msg)
        return cls(check_int(msg.get("cache_id"), 0, MAX_CACHE_ID), seq)


@dataclass(frozen=True)
class KeyRemove:
    """A cache key the sender withdraws."""

    key: Key
    seq: int = 0
    TYPE: ClassVar[str] = "key_remove"

    def to_wire(self) -> dict:
        return {"type": "key_remove", "key": key_to_wire(self.key), "seq": self.seq}

    @classmethod
    def from_wire(cls, msg: dict) -> "KeyRemove":
        seq = _seq(msg)
        return cls(key_from_wire(msg.get("key")), seq)


@dataclass(frozen=True)
class KeyPulled:
    """The sender pulled by this cache key of the receiver's, which releases it."""

    key: Key
    seq: int = 0
    TYPE: ClassVar[str] = "key_pulled"

    def to_wire(self) -> dict:
        return {"type": "key_pulled", "key": key_to_wire(self.key)}

    @classmethod
    def from_wire(cls, msg: dict) -> "KeyPulled":
        seq = _seq(msg)
        return cls(key_from_wire(msg.get("key")), seq)


@dataclass(frozen=True)
class Notify:
    """A notification: its payload in base64. data is None when the peer sent no text; the
    receiver refuses it then, as it refuses one over the size limit (notifications.py)."""

    seq: int
    data: Optional[str]
    TYPE: ClassVar[str] = "notify"

    def to_wire(self) -> dict:
        return {"type": "notify", "seq": self.seq, "data": self.data}

    @classmethod
    def from_wire(cls, msg: dict) -> "Notify":
        data = msg.get("data")
        return cls(_seq(msg), data if type(data) is str else None)


@dataclass(frozen=True)
class NotifyReply:
    """The receiver's answer to the notification seq: an LLMStatusCode value and why."""

    seq: int
    code: int
    reason: str
    TYPE: ClassVar[str] = "notify_reply"

    def to_wire(self) -> dict:
        return {"type": "notify_reply", "seq": self.seq, "code": self.code, "reason": self.reason}

    @classmethod
    def from_wire(cls, msg: dict) -> "NotifyReply":
        seq = _seq(msg)
        code, reason = msg.get("code"), msg.get("reason")
        if type(code) is not int or type(reason) is not str:
            raise ProtocolError("bad notification reply")
        return cls(seq, code, reason[:MAX_TEXT])


LinkFrame = Union[
    Ack, IpcReady, Unlink, CacheAdd, CacheRemove, KeyRemove, KeyPulled, Notify, NotifyReply
]
LINK_FRAMES: Dict[str, Type] = {
    cls.TYPE: cls
    for cls in (
        Ack,
        IpcReady,
        Unlink,
        CacheAdd,
        CacheRemove,
        KeyRemove,
        KeyPulled,
        Notify,
        NotifyReply,
    )
}


def link_frame(msg: dict) -> LinkFrame:
    """A linked peer's frame, typed; ProtocolError for a frame type a link does not carry or a
    bad field."""
    cls = LINK_FRAMES.get(msg["type"])
    if cls is None:
        _seq(msg)
        raise ProtocolError(f"unknown message {msg['type']!r:.40}")
    return cls.from_wire(msg)
