# A job's end as waiters see it: set once, waited on by any number of threads.

import _thread


cdef class Done:
    """threading.Event without clear, on one lock held until set(): creating, setting and
    checking it run no Python-level code, and a wait is the lock's own (a C wait that
    Ctrl-C interrupts, with a monotonic timeout). Attributes: _core.pxd."""

    def __cinit__(self):
        self.lock = _thread.allocate_lock()
        self.lock.acquire()

    def set(self):
        """Mark done and wake every waiter (later calls do nothing)."""
        if not self.flag:
            self.flag = True
            self.lock.release()

    def is_set(self):
        return self.flag

    def wait(self, timeout=None):
        """True once set; False when timeout seconds (None: no limit) passed first."""
        if self.flag:
            return True
        if timeout is None:
            got = self.lock.acquire()
        elif timeout <= 0:
            return self.flag
        else:
            got = self.lock.acquire(True, timeout)
        if got:
            self.lock.release()  # the next waiter's turn
            return True
        return self.flag
