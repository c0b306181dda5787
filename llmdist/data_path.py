"""How bytes reach a linked peer at all (its path), chosen once per link at the handshake.

The words of the data path, from the option down to the C copy:

- transport (option `llmdist.transport`: auto, direct, mooncake): forces a path, or lets the
  hosts decide (auto);
- path (`Peer.path`, a PeerPath): DIRECT for a peer of this host (mapped memory or process
  transfers), MOONCAKE for one reached through Mooncake Transfer Engine;
- route (routes.py, one per transfer config): the path plus the share of the cache addressed
  (shares.py) gives local, mapped, process or engine;
- lane (the core's layer loop): the queue a route's runs go on;
- engine and channel: the node's Mooncake Transfer Engine (MooncakeTransport) and, per config
  on the engine lane, the EngineChannel carrying its batches."""

from __future__ import annotations

import enum

TRANSPORTS = ("auto", "direct", "mooncake")  # values of the option llmdist.transport


class PeerPath(str, enum.Enum):
    """How this process reaches a linked peer's memory."""

    DIRECT = "direct"  # a peer of this host: mapped memory or process transfers
    MOONCAKE = "mooncake"  # Mooncake Transfer Engine (another host, or forced)


def choose_path(transport: str, same_host: bool, peer_wants_engine: bool = False) -> PeerPath:
    """The path to a peer: Mooncake when either side forces it or the peer is on another host
    (with transport auto), else direct."""
    if transport == "mooncake" or peer_wants_engine or (transport == "auto" and not same_host):
        return PeerPath.MOONCAKE
    return PeerPath.DIRECT
