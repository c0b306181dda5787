# A link's state, readable by the layer loop without the GIL.

cdef class LinkFlag:
    """Whether a link to a peer is up; read by the layer loop without the GIL. pid names the
    peer's process when it is on this host (0 otherwise), so that a transfer ending before the
    control connection noticed a killed peer is not reported delivered. pidfd, when given (the
    flag owns it), is that process's pidfd: it tells the process's exit even once the pid has
    been reused, or while the dead process is not reaped."""

    def __cinit__(self, int pid=0, int pidfd=-1):
        self.up = 1
        self.pid = pid
        self.pidfd = pidfd

    def __dealloc__(self):
        if self.pidfd >= 0:
            os.close(self.pidfd)

    def peer_alive(self):
        """False once the link is down or the peer's process on this host is gone."""
        if not self.up:
            return False
        if self.pidfd >= 0:
            p = select.poll()
            p.register(self.pidfd, select.POLLIN)
            return not p.poll(0)        # a pidfd is readable once its process has exited
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
