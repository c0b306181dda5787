"""Bounds on what linked peers may cost this cluster: how long an announcement waits for their
acks, how many handshakes one address may hold open, and how many caches, keys and frames a
peer may send. Set with llmdist.* init options; every bound has a default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from .status import LLMException, LLMStatusCode


@dataclass(frozen=True)
class PeerLimits:
    """The bounds one cluster applies to its peers (see docs/api.md for the options)."""

    ack_timeout_s: float = 2.0  # llmdist.ack_timeout_ms: one deadline for all acks
    handshakes_per_address: int = 4  # llmdist.handshakes_per_address
    max_caches: int = 8192  # llmdist.max_peer_caches: caches a peer may announce
    max_keys: int = 65536  # llmdist.max_peer_keys: keys of those caches together
    frame_rate: int = 1000  # llmdist.peer_frame_rate: frames per second (and burst)

    @classmethod
    def from_options(cls, options: Dict[str, str]) -> "PeerLimits":
        """The limits an init options dict sets; LLM_PARAM_INVALID names a bad option."""
        d = cls()
        ack_ms = _bounded(
            options, "llmdist.ack_timeout_ms", int(d.ack_timeout_s * 1000), 1, 600_000
        )
        return cls(
            ack_timeout_s=ack_ms / 1000.0,
            handshakes_per_address=_bounded(
                options, "llmdist.handshakes_per_address", d.handshakes_per_address, 1, 1024
            ),
            max_caches=_bounded(options, "llmdist.max_peer_caches", d.max_caches, 1, 1 << 24),
            max_keys=_bounded(options, "llmdist.max_peer_keys", d.max_keys, 1, 1 << 26),
            frame_rate=_bounded(options, "llmdist.peer_frame_rate", d.frame_rate, 1, 1 << 24),
        )


OPTION_KEYS = {
    "llmdist.ack_timeout_ms",
    "llmdist.handshakes_per_address",
    "llmdist.max_peer_caches",
    "llmdist.max_peer_keys",
    "llmdist.peer_frame_rate",
}


def _bounded(options: Dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    text = options.get(key)
    if text is None:
        return default
    value = int(text) if isinstance(text, str) and text.isascii() and text.isdigit() else None
    if value is None or not lo <= value <= hi:
        raise LLMException(
            f"option {key} must be an integer in [{lo}, {hi}], got {text!r}",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )
    return value
