# The bare process_vm_writev/readv baseline of the benchmarks (src/process_vm_baseline.c).

cdef class ProcessVmBaseline:
    """The same runs llmdist moves to or from process pid, issued straight to the kernel on
    `threads` threads (up to 1024 iovecs per call): the syscalls' own limit, as a benchmark's
    baseline. Calling it moves them once; an OSError carries the errno of a failure."""

    def __init__(self, int pid, bint write, list local_addrs, list remote_addrs, size_t size,
                 int threads=2):
        """local_addrs[i] here and remote_addrs[i] in process pid are the two ends of run i,
        each of size bytes; write: local into remote, else remote into local."""
        cdef Py_ssize_t i, n = len(local_addrs)
        if len(remote_addrs) != n:
            raise ValueError(f"remote_addrs must have one entry per local address ({n}), got "
                             f"{len(remote_addrs)}")
        if not 1 <= threads <= 64:
            raise ValueError(f"threads must be in [1, 64], got {threads}")
        self.local = <iovec *>malloc(max(n, 1) * sizeof(iovec))
        self.remote = <iovec *>malloc(max(n, 1) * sizeof(iovec))
        if self.local == NULL or self.remote == NULL:
            raise MemoryError()
        for i in range(n):
            self.local[i].iov_base = <void *><uintptr_t>local_addrs[i]
            self.local[i].iov_len = size
            self.remote[i].iov_base = <void *><uintptr_t>remote_addrs[i]
            self.remote[i].iov_len = size
        self.count = n
        self.pid, self.write, self.threads = pid, write, threads

    def __dealloc__(self):
        free(self.local)
        free(self.remote)

    def __call__(self):
        cdef int err
        with nogil:
            err = llmd_process_vm_baseline(self.pid, self.write, self.local, self.remote,
                                           self.count, self.threads)
        if err:
            raise OSError(err, os.strerror(err))
