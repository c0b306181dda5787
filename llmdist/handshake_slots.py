"""The handshakes a listener runs at once, bounded in all and per source address.

A connection that has sent no byte yet is idle. When a new connection finds its address (or
the whole listener) at the bound, it takes the slot of the oldest idle connection of that
address (or of any address), ending it; failing that it is refused. So idle connections, however
many one client opens, cannot keep another client's handshake out: a client that sends its
hello as it connects is idle only until its first bytes arrive."""

from __future__ import annotations

import select
import socket
import threading
from typing import Dict, Optional


class HandshakeSlots:
    """At most total handshakes at once, at most per_address from one source address."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self._lock = threading.Lock()
        self._open: Dict[socket.socket, str] = {}  # connection -> its address
        self._idle: Dict[socket.socket, str] = {}  # no first frame read yet, oldest first
        self._count: Dict[str, int] = {}

    def take(self, conn: socket.socket, address: str) -> bool:
        """Give conn a slot, ending an idle connection at the bound; False when every slot it
        could take is busy with a client that has sent bytes."""
        with self._lock:
            victim: Optional[socket.socket] = None
            same = self._count.get(address, 0) >= self.per_address
            if same or len(self._open) >= self.total:
                victim = next(
                    (
                        c
                        for c, a in self._idle.items()
                        if (a == address or not same) and not _has_bytes(c)
                    ),
                    None,
                )
                if victim is None:
                    return False
                self._drop(victim)
            self._open[conn] = self._idle[conn] = address
            self._count[address] = self._count.get(address, 0) + 1
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)  # its handshake thread sees the end
            except OSError:
                pass
        return True

    def heard(self, conn: socket.socket) -> None:
        """conn delivered its first frame: its slot is no longer taken over."""
        with self._lock:
            self._idle.pop(conn, None)

    def release(self, conn: socket.socket) -> None:
        """conn's handshake ended (a no-op when it lost its slot already)."""
        with self._lock:
            if conn in self._open:
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        address = self._open.pop(conn)
        self._idle.pop(conn, None)
        left = self._count[address] - 1
        if left:
            self._count[address] = left
        else:
            del self._count[address]


def _has_bytes(conn: socket.socket) -> bool:
    """Whether bytes from the client wait in conn (its first frame is on its way). A poll, not
    a read: it does not wait, whatever the socket's timeout."""
    try:
        poll = select.poll()
        poll.register(conn, select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return False  # closed meanwhile: as good as idle
