# A link's state, readable by the layer loop without the GIL.

cdef class LinkFlag:
    """Whether a link to a peer is up; read by the layer loop without the GIL. pid names the
    peer's process when it is on this host (0 otherwise), so that a transfer ending before the
    control connection noticed a killed peer is not reported delivered."""
    cdef volatile int up
    cdef public int pid

    def __cinit__(self, int pid=0):
        self.up = 1
        self.pid = pid

    def peer_alive(self):
        """False once the link is down or the peer's process on this host is gone."""
        if not self.up:
            return False
        if self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except OSError:
                pass
        return True

    def down(self):
        self.up = 0

    @property
    def is_up(self):
        return bool(self.up)
