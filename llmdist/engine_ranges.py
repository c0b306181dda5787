"""What a cluster registered with its Mooncake engine, counted per range: the engine refuses
overlapping registrations, while several caches may lie over the same tensors."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Dict, List, Tuple

from .registry import ALLOCATED, MemoryEntry
from .status import LLMException

if TYPE_CHECKING:
    from .transport_mooncake import MooncakeTransport

log = logging.getLogger(__name__)


def engine_ranges(entry: MemoryEntry) -> List[Tuple[int, int]]:
    """(start, length) of what peers reach of entry through the engine."""
    if entry.origin == ALLOCATED and entry.size:
        return [(entry.base, entry.size)]
    return [(a, entry.cache.cache_desc.size) for a in entry.cache.tensor_addrs]


class EngineRanges:
    """Each range registered with the engine -> how many cache tensors use it; each cache
    tensor's range -> [the registered range holding it, how many tensors have that range]."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Dict[Tuple[int, int], int] = {}
        self._users: Dict[Tuple[int, int], list] = {}

    def register(self, engine: "MooncakeTransport", entry: MemoryEntry) -> None:
        """Register entry's memory with the engine. A range inside one registered already
        (overlapping registrations: a further cache over tensors already registered) is
        counted against it instead; a range the engine refuses (one that overlaps a registered
        range only in part) is logged: the cache stays reachable on the other routes."""
        with self._lock:
            for rng in engine_ranges(entry):
                user = self._users.get(rng)
                if user is not None:
                    user[1] += 1
                    self._held[user[0]] += 1
                    continue
                start, length = rng
                holder = next(
                    (h for h in self._held if h[0] <= start and start + length <= h[0] + h[1]), None
                )
                if holder is None:
                    try:
                        engine.register(start, length)
                    except LLMException as exc:
                        log.warning(
                            "cache %d: [%#x, +%d) is not reachable through Mooncake: %s",
                            entry.cache.cache_id,
                            start,
                            length,
                            exc,
                        )
                        continue
                    holder = rng
                    self._held[holder] = 0
                self._held[holder] += 1
                self._users[rng] = [holder, 1]

    def unregister(self, engine: "MooncakeTransport", entry: MemoryEntry) -> None:
        """Withdraw entry's memory from the engine once no other cache uses the range."""
        with self._lock:
            for rng in engine_ranges(entry):
                user = self._users.get(rng)
                if user is None:
                    continue
                user[1] -= 1
                if user[1] == 0:
                    del self._users[rng]
                holder = user[0]
                self._held[holder] -= 1
                if self._held[holder]:
                    continue
                del self._held[holder]
                try:
                    engine.unregister(holder[0])
                except LLMException as exc:
                    log.warning("engine unregister failed: %s", exc)

    def clear(self) -> None:
        """Forget every range (the engine is closed)."""
        with self._lock:
            self._held.clear()
            self._users.clear()
