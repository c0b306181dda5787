"""Device memory shared between processes of one host (ACL and CUDA IPC).

A cluster on a device runtime that listens (or sets `llmdist.shareable_memory=1`) exports every
DEVICE cache it allocates, one export per allocation, and describes it to peers as

    {"kind": "acl_ipc", "key": <aclrtIpcMemGetExportKey key>, "base": <region start>, "size": n,
     "device": <the exporter's device id>}
    {"kind": "cuda_ipc", "handle": <hex of cudaIpcMemHandle_t>, "base": <allocation start>, ...}

where base is the exported region's address in the exporter. ACL checks importers against a
pid whitelist: the exporter adds each linked peer's pid (aclrtDeviceGetBareTgid, sent in the
handshake) to every key. A peer imports an export the first time a transfer writes into it
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
from .status import LLMException

log = logging.getLogger("llmdist")

KINDS = ("acl_ipc", "cuda_ipc")
PAGE = 4096     # ACL exports page-aligned regions only


def ident(share: dict) -> str:
    """The key (ACL) or handle (CUDA) of an export."""
    return share["key"] if share["kind"] == "acl_ipc" else share["handle"]


def export(runtime: "_core.Runtime", raw: int, base: int, size: int, pids: List[int]) -> dict:
    """Export the allocation raw that holds [base, base + size) and return its description for
    peers; on ACL, pids may import it. Raises LLMException with the runtime's reason."""
    if runtime.name == "acl":
        key = runtime.ipc_export(base, size)
        if pids:
            try:
                runtime.ipc_allow(key, pids)
            except LLMException:
                close_export(runtime, {"kind": "acl_ipc", "key": key})
                raise
        return {"kind": "acl_ipc", "key": key, "base": base, "size": size,
                "device": runtime.device_id}
    handle = runtime.ipc_export(raw, size)      # a CUDA handle covers the whole allocation
    return {"kind": "cuda_ipc", "handle": handle, "base": raw, "size": size + (base - raw),
            "device": runtime.device_id}


def close_export(runtime: "_core.Runtime", share: dict) -> None:
    runtime.ipc_close_export(ident(share))


class ImportTable:
    """This process's imports of other processes' exports, counted: two clusters of one process
    that write into the same peer cache share one import (CUDA opens a handle once per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Dict[Tuple[str, str], List[int]] = {}      # (kind, ident) -> [address, refs]

    def acquire(self, runtime: "_core.Runtime", share: dict) -> int:
        """The local address of the export's region start (imported on first use)."""
        k = (share["kind"], ident(share))
        with self._lock:
            held = self._held.get(k)
            if held is None:
                held = self._held[k] = [runtime.ipc_import(k[1]), 0]
            held[1] += 1
            return held[0]

    def release(self, runtime: "_core.Runtime", share: dict) -> None:
        """Drop one use; the last one closes the import (its copies must have landed)."""
        k = (share["kind"], ident(share))
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
