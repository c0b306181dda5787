"""Device memory shared between processes of one host (ACL and CUDA IPC).

A cluster on a device runtime that listens (or sets `llmdist.shareable_memory=1`) exports every
DEVICE cache it allocates, one export per allocation, and describes it to peers with a
shares.DeviceIpcShare: the kind (the runtime's ipc_kind: "acl_ipc", "cuda_ipc"), the export's
id, the exported region [base, base + size) in the exporter, and the exporter's device id. The
id is the runtime's own (ACL: the aclrtIpcMemGetExportKey key; CUDA: the hex of the cudaIpcMemHandle_t, which covers
the whole allocation). A runtime may check importers against a pid whitelist (ACL does): the
exporter allows each linked peer's pid (as SO_PEERCRED gives it for the peer's Unix socket,
never a pid the peer states) on every export. A peer imports an export the first time a transfer writes into it
(once per process: imports are counted here), copies into it device to device on its runtime
stream (one merged run at a time into another device's memory: a batch call names a single
destination device), and closes its import when the cache is withdrawn or the link ends, after
its queued copies have landed. Only then does the owner close the export and free the memory
(the withdrawal and unlink messages are acknowledged after the importer closed).

DEVICE memory a cluster registered (a framework's tensors) is exported tensor by tensor
(shares.DeviceIpcTensors) where the runtime can tell an exportable region holding each tensor
(Runtime.ipc_range): on CUDA the cudaMalloc allocation holding it (one handle per allocation,
each tensor at its offset in it; the importer checks that offset + size lies inside the
allocation it mapped), on ACL the tensor itself when it starts on a page. Memory that cannot be
exported that way (host memory, cuMem VMM allocations, an unaligned ACL tensor) gets no device
share, and peers refuse device IPC transfers into it with the reason. The exports are closed
when the cache is unregistered, after the peers closed their imports."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Dict, List, Sequence, Tuple, Union

from . import _core
from .shares import DeviceIpcShare, DeviceIpcTensors, ShareKind, Unshared
from .status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)


def export(runtime: "_core.Runtime", base: int, size: int, pids: List[int]) -> DeviceIpcShare:
    """Export [base, base + size) (base a multiple of runtime.ipc_align; where that is 1, the
    start of an allocation) and return its description for peers; the processes pids may
    import it. Raises LLMException with the runtime's reason."""
    export_id = runtime.ipc_export(base, size)
    if pids:
        try:
            runtime.ipc_allow(export_id, pids)
        except LLMException:
            runtime.ipc_close_export(export_id)
            raise
    return DeviceIpcShare(ShareKind(runtime.ipc_kind), export_id, base, size, runtime.device_id)


def close_export(runtime: "_core.Runtime", share: DeviceIpcShare) -> None:
    runtime.ipc_close_export(share.id)


def export_tensors(
    runtime: "_core.Runtime", addrs: Sequence[int], size: int, pids: List[int]
) -> Union[DeviceIpcTensors, Unshared]:
    """Export registered DEVICE tensors [addrs[i], + size): each allocation holding one once;
    Unshared with the reason when one of them cannot be exported (nothing stays exported)."""
    why = runtime.ipc_unavailable
    if why is not None:
        return Unshared(f"device IPC is not available: {why}")
    exports: Dict[int, DeviceIpcShare] = {}  # allocation base -> its export
    parts = []
    try:
        for a in addrs:
            base, length = runtime.ipc_range(a, size)
            whole = exports.get(base)
            if whole is None:
                whole = exports[base] = export(runtime, base, length, pids)
            parts.append(replace(whole, base=a, size=size, offset=a - base))
    except LLMException as exc:
        for whole in exports.values():
            try:
                close_export(runtime, whole)
            except LLMException as close_exc:
                log.warning("closing a device IPC export failed: %s", close_exc)
        return Unshared(f"it could not be exported: {exc}")
    return DeviceIpcTensors(tuple(parts))


def export_ids(share: object) -> List[str]:
    """The export ids a device share holds, each once (none for other shares)."""
    if isinstance(share, DeviceIpcShare):
        return [share.id]
    if isinstance(share, DeviceIpcTensors):
        return list(dict.fromkeys(p.id for p in share.parts))
    return []


def close_tensors(runtime: "_core.Runtime", share: DeviceIpcTensors) -> None:
    """Withdraw the exports of registered tensors (after the importers closed theirs)."""
    for ident in export_ids(share):
        try:
            runtime.ipc_close_export(ident)
        except LLMException as exc:
            log.warning("closing a device IPC export failed: %s", exc)


class ImportTable:
    """This process's imports of other processes' exports, counted: two clusters of one process
    that write into the same peer cache share one import (CUDA opens a handle once per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Dict[Tuple[str, str], List[int]] = {}  # (kind, ident) -> [address, refs]

    def acquire(self, runtime: "_core.Runtime", share: DeviceIpcShare) -> int:
        """The local address of the share's region start (the export imported on first use).
        A CUDA handle maps a whole allocation: the region [offset, offset + size) must lie
        inside it as the driver measures the mapping, or LLMException(LLM_PARAM_INVALID), also
        when the driver library that measures it is missing. (An ACL key maps its region
        itself; its offset is always 0.)"""
        k = (share.kind.value, share.id)
        with self._lock:
            held = self._held.get(k)
            if held is None:
                held = self._held[k] = [runtime.ipc_import(k[1]), 0]
            held[1] += 1
            address = held[0]
        if share.kind is ShareKind.CUDA_IPC:
            why = None
            try:
                base, length = runtime.ipc_range(address, 1)
            except LLMException as exc:
                # without the measure, the size the peer announces cannot be checked: copies
                # could run past the allocation into whatever this process maps after it
                why = f"the mapping it names cannot be measured here ({exc})"
            else:
                if base != address or share.offset + share.size > length:
                    why = (
                        f"[{share.offset}, {share.offset + share.size}) is outside the "
                        f"{length} bytes of the allocation it names"
                    )
            if why is not None:
                self.release(runtime, share)
                raise LLMException(
                    f"a peer's device IPC export was refused: {why}",
                    status_code=LLMStatusCode.LLM_PARAM_INVALID,
                )
        return address + share.offset

    def release(self, runtime: "_core.Runtime", share: DeviceIpcShare) -> None:
        """Drop one use; the last one closes the import (its copies must have landed)."""
        k = (share.kind.value, share.id)
        with self._lock:
            held = self._held.get(k)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del self._held[k]
            try:
                runtime.ipc_close_import(k[1], held[0])
            except LLMException as exc:
                log.warning("closing an imported peer allocation failed: %s", exc)

    def count(self) -> int:
        with self._lock:
            return len(self._held)


IMPORTS = ImportTable()


def acquire_share(
    runtime: "_core.Runtime", share: Union[DeviceIpcShare, DeviceIpcTensors]
) -> Union[int, Tuple[int, ...]]:
    """Import a peer's device share here; what turns the peer's addresses into local ones:
    one delta (an allocated cache), or one per tensor (registered tensors)."""
    if isinstance(share, DeviceIpcShare):
        return IMPORTS.acquire(runtime, share) - share.base
    deltas: List[int] = []
    try:
        for part in share.parts:
            deltas.append(IMPORTS.acquire(runtime, part) - part.base)
    except BaseException:
        for part in share.parts[: len(deltas)]:
            IMPORTS.release(runtime, part)
        raise
    return tuple(deltas)


def release_share(runtime: "_core.Runtime", share: Union[DeviceIpcShare, DeviceIpcTensors]) -> None:
    """Drop what acquire_share took."""
    for part in share.parts if isinstance(share, DeviceIpcTensors) else (share,):
        IMPORTS.release(runtime, part)
