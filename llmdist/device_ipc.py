"""Device memory shared between processes of one host (ACL and CUDA IPC).

A cluster on a device runtime that listens (or sets `llmdist.shareable_memory=1`) exports every
DEVICE cache it allocates, one export per allocation, and describes it to peers with a
shares.DeviceIpcShare: the kind (the runtime's ipc_kind: "acl_ipc", "cuda_ipc"), the export's
id, the exported region [base, base + size) in the exporter, and the exporter's device id. The
id is the runtime's own (ACL: the aclrtIpcMemGetExportKey key; CUDA: the hex of the cudaIpcMemHandle_t, which covers
the whole allocation). A runtime may check importers against a pid whitelist (ACL does): the
exporter allows each linked peer's pid (bare_tgid, sent in the handshake) on every export. A peer imports an export the first time a transfer writes into it
(once per process: imports are counted here), copies into it device to device on its runtime
stream (one merged run at a time into another device's memory: a batch call names a single
destination device), and closes its import when the cache is withdrawn or the link ends, after
its queued copies have landed. Only then does the owner close the export and free the memory
(the withdrawal and unlink messages are acknowledged after the importer closed).

Memory a cluster registered (framework tensors) is not exported: an export covers a whole
page-aligned allocation, which llmdist does not know for registered memory."""

from __future__ import annotations

import logging
import threading
from typing import Dict, List, Tuple

from . import _core
from .shares import DeviceIpcShare, ShareKind
from .status import LLMException

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


class ImportTable:
    """This process's imports of other processes' exports, counted: two clusters of one process
    that write into the same peer cache share one import (CUDA opens a handle once per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Dict[Tuple[str, str], List[int]] = {}  # (kind, ident) -> [address, refs]

    def acquire(self, runtime: "_core.Runtime", share: DeviceIpcShare) -> int:
        """The local address of the export's region start (imported on first use)."""
        k = (share.kind.value, share.id)
        with self._lock:
            held = self._held.get(k)
            if held is None:
                held = self._held[k] = [runtime.ipc_import(k[1]), 0]
            held[1] += 1
            return held[0]

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
