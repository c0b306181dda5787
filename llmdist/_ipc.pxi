# Device IPC: device memory shared with processes of this host, through the runtime table's
# ipc_* calls (ACL export keys, CUDA IPC handles). The Runtime methods of the same names call
# these.

cdef object ipc_unavailable_of(Runtime runtime):
    """Why device IPC cannot be used with this runtime, or None when it can."""
    cdef const char *why = runtime.rt.ipc_unavailable(runtime.rt.ctx)
    return why.decode("utf-8", "replace") if why != NULL else None


cdef int need_ipc(Runtime runtime) except -1:
    why = runtime.ipc_unavailable
    if why is not None:
        raise LLMException(f"device IPC is not available on the {runtime.name} runtime: {why}",
                           status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
    return 0


cdef object bare_tgid_of(Runtime runtime):
    """The pid an exporter allows so that this process may import its device memory (ACL:
    the host's pid, also inside a container, where the library can tell it)."""
    cdef int32_t pid = 0
    cdef int rc
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = runtime.rt.ipc_self_pid(runtime.rt.ctx, &pid)
    runtime.check(rc, "ipc_self_pid")
    return pid


cdef object ipc_export_of(Runtime runtime, uintptr_t ptr, size_t size, bint check_pid=True):
    """Export [ptr, ptr + size) (ptr a multiple of the runtime's ipc_align; where that is 1,
    the start of an allocation, which the export covers whole) to other processes of this
    host; returns its id. With check_pid, importers must be allowed with ipc_allow."""
    cdef char ident[LLMD_IPC_ID_MAX]
    cdef int rc
    need_ipc(runtime)
    memset(ident, 0, sizeof(ident))
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = runtime.rt.ipc_export(runtime.rt.ctx, <void *>ptr, size, check_pid, ident,
                                       LLMD_IPC_ID_MAX)
    runtime.check(rc, f"ipc_export({ptr:#x}, {size})")
    ident[LLMD_IPC_ID_MAX - 1] = 0
    return (<bytes>ident).decode("ascii", "replace")


cdef object ipc_allow_of(Runtime runtime, str ident, pids):
    """Let the processes pids import the export ident (pass every pid that should have
    access; a runtime without a whitelist accepts and ignores them)."""
    cdef Py_ssize_t i, n = len(pids)
    cdef int32_t *arr
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef int rc
    if n == 0:
        return
    need_ipc(runtime)
    arr = <int32_t *>malloc(n * sizeof(int32_t))
    if arr == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            arr[i] = pids[i]
        with nogil:
            rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
            if rc == 0:
                rc = runtime.rt.ipc_allow(runtime.rt.ctx, kp, arr, n)
    finally:
        free(arr)
    runtime.check(rc, f"ipc_allow({ident}, {list(pids)})")


cdef object ipc_import_of(Runtime runtime, str ident):
    """Map a peer's export into this process, with peer access enabled; returns the local
    address of the exported region's start."""
    cdef void *p = NULL
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef int rc
    need_ipc(runtime)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = runtime.rt.ipc_import(runtime.rt.ctx, kp, &p)
    runtime.check(rc, f"ipc_import({ident})")
    return <uintptr_t>p


cdef object ipc_close_import_of(Runtime runtime, str ident, uintptr_t ptr):
    """Unmap memory from ipc_import (after every copy into it has completed)."""
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef int rc
    need_ipc(runtime)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = runtime.rt.ipc_close_import(runtime.rt.ctx, kp, <void *>ptr)
    runtime.check(rc, f"ipc_close_import({ident}, {ptr:#x})")


cdef object ipc_close_export_of(Runtime runtime, str ident):
    """Withdraw an export (after the importers closed theirs, before freeing the memory)."""
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef int rc
    need_ipc(runtime)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = runtime.rt.ipc_close_export(runtime.rt.ctx, kp)
    runtime.check(rc, f"ipc_close_export({ident})")


cdef object ipc_range_of(Runtime runtime, uintptr_t ptr, size_t size):
    """(base, length) of the exportable region holding [ptr, ptr + size): the allocation
    that ipc_export(base, length) shares whole (CUDA), or the region itself (ACL)."""
    cdef uint64_t base = 0, length = 0
    cdef int rc
    need_ipc(runtime)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = runtime.rt.ipc_range(runtime.rt.ctx, <const void *>ptr, size, &base, &length)
    runtime.check(rc, f"ipc_range({ptr:#x}, {size})")
    return base, length
