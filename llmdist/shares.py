"""How a cache can be reached by another process of this host (its share), as typed values.

A cluster describes each of its caches to peers with one share: shared host memory (a sealed
memfd), memory a peer may move bytes with through process transfers, a device IPC export (of
an allocated cache), device IPC exports tensor by tensor (of registered DEVICE memory), or none
(with the reason). The share goes over the control connection as a small dict
(to_wire / share_from_wire); descriptors and device IPC ids go over a Unix socket only, to a
process the kernel says is on this host."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple, Union

from .wire_checks import ProtocolError, check_int, check_text

ID_MAX = 160  # longest device IPC export id, its NUL included (LLMD_IPC_ID_MAX)
ONLY_OVER_UNIX = "its memory is shared with processes of this host over a Unix socket only"


class ShareKind(str, enum.Enum):
    """The kinds of share, by the name the wire gives them."""

    MEMFD = "memfd"
    PROCESS = "process"
    NONE = "none"
    ACL_IPC = "acl_ipc"
    CUDA_IPC = "cuda_ipc"


DEVICE_KINDS = (ShareKind.ACL_IPC, ShareKind.CUDA_IPC)


@dataclass(frozen=True)
class Unshared:
    """Other processes cannot reach the cache; reason says why when it is known."""

    reason: str = ""
    kind: ClassVar[ShareKind] = ShareKind.NONE

    @property
    def region(self) -> Optional[Tuple[int, int]]:
        return None

    def to_wire(self, fds: Optional[List[int]]) -> dict:
        return {"kind": "none", "reason": self.reason} if self.reason else {"kind": "none"}

    @classmethod
    def from_wire(cls, w: dict, fds: List[int]) -> "Unshared":
        return cls(check_text(w.get("reason", "")))


@dataclass(frozen=True)
class ProcessShare:
    """A peer of this host running as our uid may move bytes with the cache's tensors by
    process transfers (process_vm_writev / process_vm_readv)."""

    kind: ClassVar[ShareKind] = ShareKind.PROCESS

    @property
    def region(self) -> Optional[Tuple[int, int]]:
        return None

    def to_wire(self, fds: Optional[List[int]]) -> dict:
        return {"kind": "process"}

    @classmethod
    def from_wire(cls, w: dict, fds: List[int]) -> "ProcessShare":
        return cls()


@dataclass(frozen=True)
class MemfdShare:
    """Shared host memory: a sealed memfd holding the owner's [base, base + size). fd is this
    process's descriptor of it: the owner's own, or one a peer sent (-1 once mapped, since the
    descriptors of a frame are closed after it)."""

    fd: int
    base: int
    size: int
    kind: ClassVar[ShareKind] = ShareKind.MEMFD

    @property
    def region(self) -> Optional[Tuple[int, int]]:
        return self.base, self.size

    def to_wire(self, fds: Optional[List[int]]) -> dict:
        """The share as sent; the descriptor goes in fds (a Unix socket's), the share names its
        index there. Over TCP (fds None) the peer learns only that it cannot map it."""
        if fds is None:
            return Unshared(ONLY_OVER_UNIX).to_wire(None)
        fds.append(self.fd)
        return {"kind": "memfd", "fd": len(fds) - 1, "base": self.base, "size": self.size}

    @classmethod
    def from_wire(cls, w: dict, fds: List[int]) -> "MemfdShare":
        if not fds:
            raise ProtocolError("shared memory without its file descriptor")
        fd = fds[check_int(w.get("fd"), 0, len(fds) - 1)]
        return cls(fd, check_int(w.get("base"), 1), check_int(w.get("size"), 1))


@dataclass(frozen=True)
class DeviceIpcShare:
    """A device IPC export (see device_ipc.py): the exporter's [base, base + size) on its
    device, which a process of this host imports by the runtime's export id. The export may
    name a larger allocation that holds the region offset bytes from its start (CUDA: a
    handle names a whole cudaMalloc allocation); the importer finds base at its imported
    address + offset."""

    kind: ShareKind  # ACL_IPC or CUDA_IPC: the exporter's runtime
    id: str
    base: int
    size: int
    device: int = 0
    offset: int = 0

    @property
    def region(self) -> Optional[Tuple[int, int]]:
        return self.base, self.size

    def to_wire(self, fds: Optional[List[int]]) -> dict:
        """The share as sent; only over a Unix socket (fds not None)."""
        if fds is None:
            return Unshared(ONLY_OVER_UNIX).to_wire(None)
        return {
            "kind": self.kind.value,
            "id": self.id,
            "base": self.base,
            "size": self.size,
            "device": self.device,
            "offset": self.offset,
        }

    @classmethod
    def from_wire(cls, w: dict, fds: List[int]) -> "DeviceIpcShare":
        export_id = w.get("id")
        if (
            not isinstance(export_id, str)
            or not 0 < len(export_id) < ID_MAX
            or not export_id.isascii()
            or not export_id.isprintable()
        ):
            raise ProtocolError("bad device IPC id")
        kind = ShareKind(w["kind"])
        if kind not in DEVICE_KINDS:
            raise ProtocolError("bad device IPC kind")
        offset = check_int(w.get("offset", 0), 0, 2**63 - 1)
        if offset and kind is ShareKind.ACL_IPC:
            raise ProtocolError("an ACL export key names its region itself: its offset is 0")
        return cls(
            kind,
            export_id,
            check_int(w.get("base"), 1),
            check_int(w.get("size"), 1),
            check_int(w.get("device", 0), 0, 2**31 - 1),
            offset,
        )


TENSOR_PARTS_MAX = 1 << 16  # most tensors one registered cache's share describes


@dataclass(frozen=True)
class DeviceIpcTensors:
    """DEVICE memory a cluster registered (a framework's tensors), exported tensor by tensor:
    parts[i] is tensor i, [base, base + size) exactly, in the export of the allocation holding
    it (tensors of one allocation share its export id). Every part has the same kind and
    device."""

    parts: Tuple[DeviceIpcShare, ...]
    wire_kind: ClassVar[str] = "device_tensors"

    @property
    def kind(self) -> ShareKind:
        return self.parts[0].kind

    @property
    def device(self) -> int:
        return self.parts[0].device

    @property
    def region(self) -> Optional[Tuple[int, int]]:
        return None

    def to_wire(self, fds: Optional[List[int]]) -> dict:
        """The share as sent; only over a Unix socket (fds not None)."""
        if fds is None:
            return Unshared(ONLY_OVER_UNIX).to_wire(None)
        return {"kind": self.wire_kind, "tensors": [p.to_wire(fds) for p in self.parts]}

    @classmethod
    def from_wire(cls, w: dict, fds: List[int]) -> "DeviceIpcTensors":
        tensors = w.get("tensors")
        if type(tensors) is not list or not 0 < len(tensors) <= TENSOR_PARTS_MAX:
            raise ProtocolError("bad device tensor exports")
        parts = []
        for t in tensors:
            if type(t) is not dict or t.get("kind") not in ("acl_ipc", "cuda_ipc"):
                raise ProtocolError("bad device tensor export")
            parts.append(DeviceIpcShare.from_wire(t, fds))
        if any((p.kind, p.device) != (parts[0].kind, parts[0].device) for p in parts):
            raise ProtocolError("device tensor exports of different runtimes or devices")
        return cls(tuple(parts))

    def check_tensors(self, addrs: List[int], size: int) -> None:
        """Raise ProtocolError unless part i is exactly tensor i ([addrs[i], + size))."""
        if len(addrs) != len(self.parts) or any(
            p.base != a or p.size != size for p, a in zip(self.parts, addrs)
        ):
            raise ProtocolError("device tensor exports that are not the cache's tensors")


Share = Union[Unshared, ProcessShare, MemfdShare, DeviceIpcShare, DeviceIpcTensors]

_TYPES = {
    "none": Unshared,
    "process": ProcessShare,
    "memfd": MemfdShare,
    "acl_ipc": DeviceIpcShare,
    "cuda_ipc": DeviceIpcShare,
    "device_tensors": DeviceIpcTensors,
}  # by the kind the wire names


def share_to_wire(share: Optional[Share], fds: Optional[List[int]]) -> dict:
    """How a peer reaches a cache, as sent (None: the cache is not shared). fds: the
    descriptors going with the frame on a Unix socket, or None over TCP."""
    return (share if share is not None else Unshared()).to_wire(fds)


def share_from_wire(w: object, fds: List[int] = ()) -> Share:
    """A share a peer sent; a memfd share's "fd" becomes the descriptor of fds it names."""
    kind = w.get("kind") if type(w) is dict else None
    if type(kind) is not str or kind not in _TYPES:
        raise ProtocolError("bad share")
    return _TYPES[kind].from_wire(w, fds)
