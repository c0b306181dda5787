"""The clusters of the two-process scenario (.cluster): the decodes in child processes, the
prefills of this process on each transport, keyed and unkeyed, and the calls that move blocks
through a prefill."""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from ..config import LLMClusterInfo
from ..descs import BlocksCacheKey, Cache, LLMRole
from ..transfer_types import TransferWithCacheKeyConfig
from . import keyed, procs
from .local import layer_kwargs
from .nixl_baseline import NixlPrefill
from .peers import mooncake_available
from .workload import OK, Bench, Go, check

DECODE_IDS = {False: 61, True: 71}  # unkeyed, keyed
PREFILL_IDS = {
    ("direct", False): 62,
    ("mooncake", False): 63,
    ("direct", True): 72,
    ("mooncake", True): 73,
}
LINK_MS = 5000
TASK_MS = 120_000
SRC_MODEL, LOCAL_MODEL = 0, 1  # the prefill's caches: source, pull destination
OPS = ("transfer_cache_async", "push_blocks", "pull_blocks")
ROUTES = {
    # route: (prefill transport, how the decode makes its cache)
    "mapped": ("direct", "alloc"),
    "process": ("direct", "register"),
    "engine": ("mooncake", "alloc"),
}


class Prefill:
    """A prefill cluster on one transport, remote-accessible, linked to a decode (keyed when
    auth_key is given, as that decode is); it registers this run's source and pull-destination
    memory under its own keys."""

    def __init__(self, transport: str, port: int, auth_key: Optional[str] = None) -> None:
        self.transport = transport
        self.keyed = auth_key is not None
        self.cid = PREFILL_IDS[(transport, self.keyed)]
        self.decode_id = DECODE_IDS[self.keyed]
        self.linked = False
        self.src: Optional[Cache] = None
        self.local: Optional[Cache] = None
        self.dd = procs.start_cluster(
            LLMRole.PROMPT, self.cid, transport, sync_timeout=TASK_MS, auth_key=auth_key
        )
        self.cm = self.dd.cache_manager
        self.info = LLMClusterInfo()
        self.info.remote_cluster_id = self.decode_id
        self.info.append_remote_ip_info("127.0.0.1", port)
        try:
            self.link()
        except RuntimeError:
            self.dd.finalize()
            raise

    def link(self) -> float:
        """link_clusters to the decode; its seconds. RuntimeError when it fails."""
        t0 = time.perf_counter()
        status, _ = self.dd.link_clusters([self.info], LINK_MS)
        seconds = time.perf_counter() - t0
        if status != OK:
            raise RuntimeError(
                f"prefill {self.cid} ({self.transport}) could not link: {status.name}"
            )
        self.linked = True
        return seconds

    def relink(self) -> float:
        """Unlink, then link again: the seconds of the link."""
        status, _ = self.dd.unlink_clusters([self.info], LINK_MS)
        if status != OK:
            raise RuntimeError(
                f"prefill {self.cid} ({self.transport}) could not unlink: {status.name}"
            )
        self.linked = False
        return self.link()

    def register(self, src: Cache, local: Cache) -> None:
        """This run's source and local caches (allocated by the bench's own cluster) under keys
        of this cluster."""
        self.src = self.cm.register_blocks_cache(
            src.cache_desc, list(src.tensor_addrs), BlocksCacheKey(self.cid, SRC_MODEL)
        )
        self.local = self.cm.register_blocks_cache(
            local.cache_desc, list(local.tensor_addrs), BlocksCacheKey(self.cid, LOCAL_MODEL)
        )

    def unregister(self) -> None:
        for c in (self.src, self.local):
            if c is not None and c.tensor_addrs:
                self.cm.unregister_cache(c.cache_id)
        self.src = self.local = None

    def path(self) -> str:
        info = self.dd.peer_info(self.decode_id)
        return str(info.get("path", "?")) if info else "?"

    def close(self) -> None:
        try:
            self.unregister()
            if self.linked:
                self.dd.unlink_clusters([self.info], LINK_MS, force=True)
        finally:
            self.dd.finalize()


def prefill_calls(bench: Bench, p: Prefill, model: int, si: List[int], di: List[int]):
    """The three calls through prefill p to decode cache `model`: name -> callable, or the
    reason it is not there."""
    L = bench.settings.layers
    kw = layer_kwargs(bench)
    key = BlocksCacheKey(p.decode_id, model)
    out: Dict[str, object] = {}
    cfg = [TransferWithCacheKeyConfig(key, range(L), range(L))]

    def transfer():
        check(
            p.cm.transfer_cache_async(p.src, Go(), cfg, si, di, **kw).synchronize(TASK_MS),
            "transfer_cache_async",
        )

    out["transfer_cache_async"] = transfer
    if hasattr(p.cm, "push_blocks"):
        out["push_blocks"] = lambda: p.cm.push_blocks(key, p.src, si, di, **kw)
    else:
        out["push_blocks"] = "not available in this build"
    if hasattr(p.cm, "pull_blocks"):
        out["pull_blocks"] = lambda: p.cm.pull_blocks(key, p.local, di, si, **kw)
    else:
        out["pull_blocks"] = "not available in this build"
    return out


class Clusters:
    """The decodes (child processes; the keyed one holds the run's key), the prefills of this
    process per (transport, keyed), the NIXL prefill, and why any of them is missing."""

    def __init__(self) -> None:
        self.key = keyed.new_key()
        self.decodes: Dict[bool, procs.Child] = {}
        self.ports: Dict[bool, int] = {}
        self.prefills: Dict[Tuple[str, bool], Prefill] = {}
        self.unavailable: Dict[Tuple[str, bool], str] = {}
        self.nixl = NixlPrefill()

    def start(self) -> None:
        for k in (False, True):
            cid = DECODE_IDS[k]
            args = (cid, procs.IDLE_S, self.key) if k else (cid,)
            name = f"decode-{cid}" + (" (keyed)" if k else "")
            self.decodes[k] = procs.Child(procs.decode_main, *args, name=name)
            self.ports[k] = self.decodes[k].recv(60)[1]
        for k in (False, True):
            for transport in ("direct", "mooncake"):
                why = mooncake_available() if transport == "mooncake" else None
                if why:
                    self.unavailable[(transport, k)] = why
                    continue
                try:
                    self.prefills[(transport, k)] = Prefill(
                        transport, self.ports[k], self.key if k else None
                    )
                except Exception as exc:  # noqa: BLE001 - reported as the route's reason
                    self.unavailable[(transport, k)] = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        try:
            for p in self.prefills.values():
                p.close()
            self.nixl.close()
        finally:
            for d in self.decodes.values():
                d.close()
