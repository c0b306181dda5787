# Task slots: the bound on transfers in flight (llmdist.max_inflight_tasks), a POSIX semaphore
# taken and given back without Python-level locks or conditions.

from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
from libc.errno cimport errno, EINTR


cdef extern from "<semaphore.h>" nogil:  # sem_t is declared in _core.pxd
    int sem_init(sem_t *sem, int pshared, unsigned int value)
    int sem_destroy(sem_t *sem)
    int sem_post(sem_t *sem)
    int sem_trywait(sem_t *sem)
    int sem_wait(sem_t *sem)
    int sem_timedwait(sem_t *sem, const timespec *abstime)
    int sem_getvalue(sem_t *sem, int *sval)


cdef class Slots:
    """size slots, as threading.BoundedSemaphore: acquire waits up to timeout seconds for a free
    one, release gives one back (ValueError past size). The uncontended path is one atomic
    operation; only a wait releases the GIL. Attributes: _core.pxd."""

    def __cinit__(self, int size):
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        if sem_init(&self.sem, 0, <unsigned int>size) != 0:
            raise OSError(errno, "sem_init failed")
        self.ready = True
        self.size = size

    def __dealloc__(self):
        if self.ready:
            sem_destroy(&self.sem)

    def acquire(self, double timeout=-1.0):
        """Take a slot: True, or False when none was free within timeout seconds (< 0: wait
        as long as it takes)."""
        cdef timespec at
        cdef int rc
        cdef double whole
        if sem_trywait(&self.sem) == 0:
            return True
        if timeout == 0:
            return False
        with nogil:
            if timeout < 0:
                rc = sem_wait(&self.sem)
                while rc != 0 and errno == EINTR:
                    rc = sem_wait(&self.sem)
            else:
                clock_gettime(CLOCK_REALTIME, &at)
                whole = <double><long>timeout
                at.tv_sec += <long>whole
                at.tv_nsec += <long>((timeout - whole) * 1e9)
                if at.tv_nsec >= 1000000000:
                    at.tv_sec += 1
                    at.tv_nsec -= 1000000000
                rc = sem_timedwait(&self.sem, &at)
                while rc != 0 and errno == EINTR:
                    rc = sem_timedwait(&self.sem, &at)
        return rc == 0

    def release(self):
        """Give a slot back; ValueError when every slot is already free."""
        cdef int value = 0
        sem_getvalue(&self.sem, &value)
        if value >= self.size:
            raise ValueError("Semaphore released too many times")
        sem_post(&self.sem)

