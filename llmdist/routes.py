"""Routes: how this process reaches one cluster's memory, one type per data path.

A route serves both directions: WRITE (push, transfer_cache_async) and READ (pull). It turns
the other cluster's tensor addresses into the ones the layer loop uses, names the lane the
bytes travel on, and, for a transfer engine, opens the channel that queues its batches.

| route        | when                                         | write               | read               |
|--------------|----------------------------------------------|---------------------|--------------------|
| LocalRoute   | this cluster                                 | runtime copies      | runtime copies     |
| MappedRoute  | a peer on this host whose memory is mapped   | copies into the     | copies from the    |
|              | here (shm, ACL/CUDA IPC imports)             | mapping             | mapping            |
| ProcessRoute | a peer on this host, memory it registered    | process_vm_writev   | process_vm_readv   |
| EngineRoute  | another host, or forced                      | Mooncake writes     | Mooncake reads     |

`route_rules.choose_route` says which kind of route moves a transfer (or why none does);
`peer.Peer.route_to` builds it for a peer's memory, the transfer planner uses LocalRoute for
this cluster's own caches; neither the planner nor the layer loop knows which transport is
behind a route."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from . import _core
from ._core import CopyKind, Lane

if TYPE_CHECKING:
    from .registry import Region
    from .transport_mooncake import EngineChannel, MooncakeTransport

# How long an engine channel waits for one batch when the cluster sets no
# llm.SyncKvCacheWaitTime, and the least it waits when it does (ms).
ENGINE_WAIT_DEFAULT_MS = 30_000
ENGINE_WAIT_MIN_MS = 1_000

_REGION_END = operator.attrgetter("end")


class ImportNeeded(Exception):
    """Raised while building a route to device memory a peer exports that this process has not
    imported yet: the planner leaves its lock, imports (Peer.import_device) and plans again."""

    def __init__(self, peer, entries) -> None:
        super().__init__(f"{len(entries)} device IPC imports are needed")
        self.peer = peer
        self.entries = entries


class Route:
    """The data path to one cluster's memory (both directions)."""

    name = "route"
    pid = 0  # the peer process (ProcessRoute)
    single = False  # device copies go run by run (memory of another device)

    def __init__(self, link: Optional["_core.LinkFlag"] = None) -> None:
        self.link = link  # the peer's LinkFlag; None for this cluster

    def lane(self, kind: CopyKind) -> Lane:
        """The lane the layer loop moves this route's runs on."""
        raise NotImplementedError

    def reach(
        self, addrs: Sequence[int], regions: Sequence["Region"]
    ) -> Tuple[List[int], List[int]]:
        """The other cluster's tensor bases as the layer loop uses them, and the end of the
        region holding each (regions[i] holds addrs[i])."""
        return list(addrs), list(map(_REGION_END, regions))

    def channel(self, sync_timeout: Optional[int]) -> Optional["EngineChannel"]:
        """The engine channel for one transfer (EngineRoute only)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LocalRoute(Route):
    """This cluster's own memory: runtime copies on the worker's stream; host-to-host copies of
    a device runtime go to the host copy engine, so that pageable host memory never meets an
    asynchronous device copy."""

    name = "local"

    def __init__(self, runtime: "_core.Runtime") -> None:
        super().__init__(None)
        self._device_runtime = not runtime.is_host

    def lane(self, kind: CopyKind) -> Lane:
        if kind == CopyKind.COPY_H2H and self._device_runtime:
            return Lane.LANE_HOST
        return Lane.LANE_RUNTIME


class MappedRoute(Route):
    """A peer on this host whose memory is mapped into this process: its shared memory (host
    runtime) or its device allocations imported through ACL/CUDA IPC. deltas maps a cache id to
    what turns the peer's address into the mapped one (one per tensor for registered tensors,
    each imported on its own); single is set when a mapping is memory
    of another device, which a batch copy's one location cannot name."""

    name = "mapped"

    def __init__(
        self,
        link: "_core.LinkFlag",
        deltas: Dict[int, Union[int, Tuple[int, ...]]],
        single: bool = False,
    ) -> None:
        super().__init__(link)
        self._deltas = deltas
        self.single = single

    def lane(self, kind: CopyKind) -> Lane:
        return Lane.LANE_RUNTIME

    def reach(self, addrs, regions):
        bases: List[int] = []
        limits: List[int] = []
        cache = None
        delta = 0
        for a, r in zip(addrs, regions):
            if r.cache is not cache:  # the regions of one cache come in a row
                cache = r.cache
                delta = self._deltas[cache.cache_id]
            d = delta if type(delta) is int else delta[r.tensor_index]
            bases.append(a + d)
            limits.append(r.end + d)
        return bases, limits


class ProcessRoute(Route):
    """A peer on this host whose memory is not mapped here (memory it registered): the kernel
    moves the bytes between the two address spaces (process_vm_writev / process_vm_readv), on
    the host copy engine's stream."""

    name = "process"

    def __init__(self, link: "_core.LinkFlag", pid: int) -> None:
        super().__init__(link)
        self.pid = pid

    def lane(self, kind: CopyKind) -> Lane:
        return Lane.LANE_PROCESS


class EngineRoute(Route):
    """A peer on another host (or any peer, when the transport is forced): batched one-sided
    writes and reads through Mooncake Transfer Engine into memory the peer registered with its
    engine. Each transfer gets its own channel, which bounds the batches it keeps queued."""

    name = "engine"

    def __init__(
        self, link: "_core.LinkFlag", transport: "MooncakeTransport", session: str
    ) -> None:
        super().__init__(link)
        self._transport = transport
        self._session = session

    def lane(self, kind: CopyKind) -> Lane:
        return Lane.LANE_ENGINE

    def channel(self, sync_timeout: Optional[int]) -> "EngineChannel":
        from .transport_mooncake import EngineChannel

        wait_ms = (
            ENGINE_WAIT_DEFAULT_MS
            if sync_timeout is None
            else max(sync_timeout, ENGINE_WAIT_MIN_MS)
        )
        return EngineChannel(self._transport, self._session, wait_ms)
