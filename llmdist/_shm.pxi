# Shared host memory: peers on this host map host-runtime memory from a sealed memfd.

def memfd_create(size_t size):
    """Create and map a sealed memfd of size bytes; returns (fd, address)."""
    cdef void *p = NULL
    cdef int fd = -1
    if llmd_host_memfd_create(size, &fd, &p) != 0:
        raise LLMException(f"could not create shared memory of {size} bytes",
                           status_code=LLMStatusCode.LLM_OUT_OF_MEMORY)
    return fd, <uintptr_t>p


def memfd_map(int fd, size_t size):
    """Map size bytes of a peer's memfd; returns the local address. Refuses a descriptor that
    is not sealed against shrinking and growing, or is smaller than size."""
    cdef void *p = NULL
    if llmd_host_memfd_map(fd, size, &p) != 0:
        raise LLMException(f"could not map the peer's shared memory ({size} bytes): not a sealed "
                           f"memfd of that size", status_code=LLMStatusCode.LLM_LINK_FAILED)
    return <uintptr_t>p


def shm_unmap(uintptr_t addr, size_t size):
    llmd_host_shm_unmap(<void *>addr, size)
