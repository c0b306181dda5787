"""Which route moves a transfer, or why none does: every route's capabilities as data, and the
one function (choose_route) that matches a transfer's facts against them.

A transfer is described by a SelectionContext: its direction, the placements of the memory it
reads (source) and writes (destination), where the other cluster's memory is (Reach) and how
this process can get at that cache (Access). choose_route has no side effects: opening a
device IPC import for the route it picks is a separate step (peer.Peer.import_device)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple, Union

from ._core import Direction
from .descs import Placement
from .status import LLMStatusCode


class Reach(enum.Enum):
    """Where the other cluster's memory is, seen from this process."""

    SELF = "this cluster"
    SAME_HOST = "a process on this host, linked directly"
    ENGINE = "a cluster linked through Mooncake Transfer Engine (another host, or forced)"


class Access(enum.Enum):
    """How this process can reach one cache of the other cluster."""

    OWN = "this process's own memory"
    SHARED_MEMORY = "the peer's shared memory, mapped here"
    DEVICE_IPC = "a device IPC export of this runtime's kind"
    PROCESS = "the peer process's memory, by process reads and writes"
    ENGINE = "memory the peer registered with its Mooncake engine"
    NONE = "no way (SelectionContext.why says why)"


class RouteKind(enum.Enum):
    """The routes of routes.py."""

    LOCAL = "local"
    MAPPED = "mapped"
    PROCESS = "process"
    ENGINE = "engine"


_BOTH = frozenset((Direction.WRITE, Direction.READ))
_H, _D = Placement.HOST, Placement.DEVICE
# HOST source to DEVICE destination is refused in both directions (spec 5.3 rule 9).
_PLACEMENTS = frozenset(((_H, _H), (_D, _H), (_D, _D)))
_DEVICE_ONLY = frozenset(((_D, _D),))


@dataclass(frozen=True)
class Capabilities:
    """What one route moves: directions, (source, destination) placements, where the other
    memory may be, on which runtimes (device: ACL/CUDA; host: the built-in one), and the access
    to the other cache it needs."""

    directions: FrozenSet[Direction]
    placements: FrozenSet[Tuple[Placement, Placement]]
    reaches: FrozenSet[Reach]
    device_runtime: FrozenSet[bool]
    access: Access


# One row per route and way of reaching memory, tried in this order.
CAPABILITIES: Tuple[Tuple[RouteKind, Capabilities], ...] = (
    (
        RouteKind.LOCAL,
        Capabilities(
            _BOTH, _PLACEMENTS, frozenset((Reach.SELF,)), frozenset((False, True)), Access.OWN
        ),
    ),
    (
        RouteKind.MAPPED,
        Capabilities(
            _BOTH,
            _PLACEMENTS,
            frozenset((Reach.SAME_HOST,)),
            frozenset((False,)),
            Access.SHARED_MEMORY,
        ),
    ),
    (
        RouteKind.MAPPED,
        Capabilities(
            _BOTH,
            _DEVICE_ONLY,
            frozenset((Reach.SAME_HOST,)),
            frozenset((True,)),
            Access.DEVICE_IPC,
        ),
    ),
    (
        RouteKind.PROCESS,
        Capabilities(
            _BOTH, _PLACEMENTS, frozenset((Reach.SAME_HOST,)), frozenset((False,)), Access.PROCESS
        ),
    ),
    (
        RouteKind.ENGINE,
        Capabilities(
            _BOTH, _PLACEMENTS, frozenset((Reach.ENGINE,)), frozenset((False,)), Access.ENGINE
        ),
    ),
)


@dataclass(frozen=True)
class SelectionContext:
    """The facts about one transfer between this process and one cache that choose its route.
    other: the cache's name for messages ("cache 3 of cluster 2"); why: the reason when access
    is NONE; peer_runtime: the runtime the other cluster runs; link_down: the link's state."""

    direction: Direction
    source: Placement
    destination: Placement
    reach: Reach
    device_runtime: bool
    runtime: str
    access: Access
    other: str = "the cache"
    why: str = ""
    peer_runtime: Optional[str] = None
    link_down: Optional[str] = None


@dataclass(frozen=True)
class Refusal:
    """Why no route moves a transfer, with the status code to raise."""

    message: str
    status_code: LLMStatusCode


def _fits(caps: Capabilities, ctx: SelectionContext) -> bool:
    return (
        ctx.direction in caps.directions
        and (ctx.source, ctx.destination) in caps.placements
        and ctx.reach in caps.reaches
        and ctx.device_runtime in caps.device_runtime
        and ctx.access is caps.access
    )


def choose_route(ctx: SelectionContext) -> Union[RouteKind, Refusal]:
    """The route that moves the transfer ctx describes, or the refusal naming the rule."""
    refuse = LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    if ctx.link_down is not None:
        return Refusal(ctx.link_down, LLMStatusCode.LLM_NOT_YET_LINK)
    if ctx.source == _H and ctx.destination == _D:
        return Refusal(
            f"a HOST source cannot go to a DEVICE destination ({ctx.other})",
            LLMStatusCode.LLM_PARAM_INVALID,
        )
    other_place = ctx.destination if ctx.direction == Direction.WRITE else ctx.source
    if (
        ctx.reach is not Reach.SELF
        and other_place == _D
        and ctx.peer_runtime is not None
        and ctx.peer_runtime != ctx.runtime
    ):
        verb = "write into" if ctx.direction == Direction.WRITE else "read from"
        return Refusal(
            f"{ctx.other} is DEVICE memory of the {ctx.peer_runtime} runtime; this "
            f"cluster runs the {ctx.runtime} runtime and cannot {verb} it",
            refuse,
        )
    for kind, caps in CAPABILITIES:
        if _fits(caps, ctx):
            return kind
    if ctx.access is Access.NONE:
        return Refusal(ctx.why, refuse)
    if ctx.device_runtime and ctx.reach is not Reach.SELF and other_place == _H:
        return Refusal(
            f"{ctx.other} is HOST memory of another process: on the {ctx.runtime} "
            f"runtime a transfer to another process reaches only DEVICE caches that "
            f"process allocated (device IPC)",
            refuse,
        )
    return Refusal(
        f"no route moves {ctx.other} ({ctx.direction.name}, "
        f"{ctx.source.name} to {ctx.destination.name}, {ctx.reach.value}, "
        f"{ctx.access.value}) on the {ctx.runtime} runtime",
        refuse,
    )
