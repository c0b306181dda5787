"""Names and owners of the POSIX shared memory objects that hold host-runtime caches of a
listening cluster.

A name says which process created the object: /llmdist-<pid>-s<start>-<cluster>-<cache>-<tag>,
where start is the process's start time (clock ticks after boot, /proc/<pid>/stat), so that a
pid the kernel has reused is not taken for the owner. An object belongs to its owner's
lifetime: the owner unlinks it when the cache is freed; when the owner dies without finalize, a
linked peer that outlives it, or the next process that creates such objects, removes it. An
object is removed only when its owner is gone, so nothing a peer claims can remove the memory of
a live process."""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from typing import List, Optional, Tuple

from . import _core

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"/llmdist-([1-9][0-9]{0,9})-s([0-9]{1,20})-([0-9]{1,20})-([0-9]{1,20})-"
                   r"([0-9a-f]{8})", re.ASCII)
Owner = Tuple[int, int]       # (pid, start time)

# How long a survivor waits for a peer whose link broke to finish dying before it stops watching.
WATCH_S = 60.0


def start_time(pid: int) -> Optional[int]:
    """The start time of process pid, or None when it is gone or a zombie (dead, not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()    # field 3 (state) onwards
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])


def owner_alive(owner: Owner) -> bool:
    """Whether the process that created objects named for owner still runs. Without /proc this
    cannot be told: the owner is taken to be alive and nothing is removed."""
    if not os.path.isdir(f"/proc/{os.getpid()}"):
        return True
    return start_time(owner[0]) == owner[1]


_me: Optional[Owner] = None


def me() -> Owner:
    """This process as an owner (recomputed after a fork)."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:
        _me = (pid, start_time(pid) or 0)
    return _me


def new_name(cluster_id: int, cache_id: int) -> str:
    pid, start = me()
    return f"/llmdist-{pid}-s{start}-{cluster_id}-{cache_id}-{secrets.token_hex(4)}"


def owner_of(name: str) -> Optional[Owner]:
    """The owner a well-formed object name gives, else None."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def objects_of(owner: Optional[Owner] = None) -> List[str]:
    """Names of llmdist objects in /dev/shm (of one owner when given)."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    names = []
    for e in entries:
        name = "/" + e
        got = owner_of(name)
        if got is not None and (owner is None or got == owner):
            names.append(name)
    return names


def remove_dead(owner: Optional[Owner] = None) -> int:
    """Unlink the objects of owners that are gone (only owner's when given); returns how many."""
    removed = 0
    alive = {}
    for name in objects_of(owner):
        o = owner_of(name)
        if o not in alive:
            alive[o] = owner_alive(o)
        if not alive[o]:
            _core.shm_unlink(name)
            removed += 1
    if removed:
        log.info("removed %d shared memory objects of dead processes", removed)
    return removed


def remove_when_gone(owner: Owner, watch_s: float = WATCH_S) -> None:
    """Remove owner's objects once it has died (a peer whose connection just broke may still be
    exiting), watching for at most watch_s seconds from a background thread."""
    if owner == me():
        return

    def watch() -> None:
        deadline = time.monotonic() + watch_s
        pause = 0.01
        while owner_alive(owner):
            if time.monotonic() > deadline:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
        remove_dead(owner)

    threading.Thread(target=watch, name="llmdist-shm-watch", daemon=True).start()
