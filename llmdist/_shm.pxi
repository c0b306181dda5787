# Shared host memory: peers on this host map host-runtime memory by name.

def shm_create(str name, size_t size):
    """Create and map a shared memory object; returns its address."""
    cdef void *p = NULL
    cdef bytes b = name.encode()
    if llmd_host_shm_create(b, size, &p) != 0:
        raise LLMException(f"could not create shared memory {name} of {size} bytes",
                           status_code=LLMStatusCode.LLM_OUT_OF_MEMORY)
    return <uintptr_t>p


def shm_map(str name, size_t size):
    """Map a peer's shared memory object; returns the local address."""
    cdef void *p = NULL
    cdef bytes b = name.encode()
    if llmd_host_shm_map(b, size, &p) != 0:
        raise LLMException(f"could not map shared memory {name} ({size} bytes)",
                           status_code=LLMStatusCode.LLM_LINK_FAILED)
    return <uintptr_t>p


def shm_unmap(uintptr_t addr, size_t size):
    llmd_host_shm_unmap(<void *>addr, size)


def shm_unlink(str name):
    cdef bytes b = name.encode()
    llmd_host_shm_unlink(b)
