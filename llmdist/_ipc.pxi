# Device IPC: device memory shared with processes of this host (ACL export keys, CUDA IPC
# handles). The Runtime methods of the same names call these.

cdef object ipc_kind_of(Runtime runtime):
    """How peers reach this runtime's exported device memory: "acl_ipc" or "cuda_ipc"
    (None on the host runtime, whose memory is shared as POSIX shared memory)."""
    return {"acl": "acl_ipc", "cuda": "cuda_ipc"}.get(runtime.name)


cdef object ipc_unavailable_of(Runtime runtime):
    """Why device IPC cannot be used with this runtime, or None when it can."""
    if runtime.name == "host":
        return "the host runtime has no device memory"
    missing = acl_ipc_missing() if runtime.name == "acl" else cuda_ipc_missing()
    if missing:
        return f"the loaded runtime library ({runtime.library}) lacks {', '.join(missing)}"
    return None


cdef int need_ipc(Runtime runtime) except -1:
    why = runtime.ipc_unavailable
    if why is not None:
        raise LLMException(f"device IPC is not available on the {runtime.name} runtime: {why}",
                           status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
    return 0


cdef object bare_tgid_of(Runtime runtime):
    """The pid an exporter whitelists so that this process may import its device memory:
    ACL's aclrtDeviceGetBareTgid (the host's pid, also inside a container) when the
    library has it, else os.getpid()."""
    cdef int32_t pid = 0
    cdef int rc
    if runtime.name != "acl" or g_acl.aclrtDeviceGetBareTgid == NULL:
        return os.getpid()
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = g_acl.aclrtDeviceGetBareTgid(&pid)
    runtime.check(rc, "aclrtDeviceGetBareTgid")
    return pid


cdef object ipc_export_of(Runtime runtime, uintptr_t ptr, size_t size, bint check_pid=True):
    """Export device memory to other processes of this host. ACL: the page-aligned region
    [ptr, ptr + size), returned as its key; importers must be whitelisted with ipc_allow
    unless check_pid is False. CUDA: the whole cudaMalloc allocation starting at ptr,
    returned as the hex of its handle (no whitelist)."""
    cdef char key[65]
    cdef llmd_cudaIpcMemHandle_t handle
    cdef uint64_t flags = 0 if check_pid else LLMD_ACL_IPC_EXPORT_NO_PID_CHECK
    cdef bint acl = runtime.name == "acl"
    cdef int rc
    need_ipc(runtime)
    memset(key, 0, sizeof(key))
    memset(&handle, 0, sizeof(handle))
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            if acl:
                rc = g_acl.aclrtIpcMemGetExportKey(<void *>ptr, size, key, 65, flags)
            else:
                rc = g_cuda.cudaIpcGetMemHandle(&handle, <void *>ptr)
    if acl:
        runtime.check(rc, f"aclrtIpcMemGetExportKey({ptr:#x}, {size})")
        key[64] = 0
        return (<bytes>key).decode("ascii", "replace")
    runtime.check(rc, f"cudaIpcGetMemHandle({ptr:#x})")
    return (<char *>&handle)[:LLMD_CUDA_IPC_HANDLE_SIZE].hex()


cdef object ipc_allow_of(Runtime runtime, str key, pids):
    """ACL: let the processes pids import key (aclrtIpcMemSetImportPid; pass every pid
    that should have access). Nothing to do on CUDA."""
    cdef Py_ssize_t i, n = len(pids)
    cdef int32_t *arr
    cdef bytes k = key.encode()
    cdef const char *kp = k
    cdef int rc
    if runtime.name != "acl" or n == 0:
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
                rc = g_acl.aclrtIpcMemSetImportPid(kp, arr, n)
    finally:
        free(arr)
    runtime.check(rc, f"aclrtIpcMemSetImportPid({key}, {list(pids)})")


cdef object ipc_import_of(Runtime runtime, str ident):
    """Map a peer's exported device memory (ACL key, CUDA handle hex) into this process,
    with peer access enabled; returns the local address of the exported region's start
    (CUDA: of the exporter's allocation)."""
    cdef void *p = NULL
    cdef llmd_cudaIpcMemHandle_t handle
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef bint acl = runtime.name == "acl"
    cdef int rc
    need_ipc(runtime)
    if not acl:
        raw = bytes.fromhex(ident)
        if len(raw) != LLMD_CUDA_IPC_HANDLE_SIZE:
            raise LLMException(f"a CUDA IPC handle has {LLMD_CUDA_IPC_HANDLE_SIZE} bytes, "
                               f"got {len(raw)}", status_code=LLMStatusCode.LLM_PARAM_INVALID)
        memcpy(&handle, <const char *>raw, LLMD_CUDA_IPC_HANDLE_SIZE)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            if acl:
                rc = g_acl.aclrtIpcMemImportByKey(&p, kp, LLMD_ACL_IPC_IMPORT_PEER_ACCESS)
            else:
                rc = g_cuda.cudaIpcOpenMemHandle(&p, handle, LLMD_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS)
    runtime.check(rc, f"aclrtIpcMemImportByKey({ident})" if acl else "cudaIpcOpenMemHandle")
    return <uintptr_t>p


cdef object ipc_close_import_of(Runtime runtime, str ident, uintptr_t ptr):
    """Unmap memory from ipc_import (after every copy into it has completed)."""
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef bint acl = runtime.name == "acl"
    cdef int rc
    need_ipc(runtime)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            if acl:
                rc = g_acl.aclrtIpcMemClose(kp)
            else:
                rc = g_cuda.cudaIpcCloseMemHandle(<void *>ptr)
    runtime.check(rc, f"aclrtIpcMemClose({ident})" if acl else f"cudaIpcCloseMemHandle({ptr:#x})")


cdef object ipc_close_export_of(Runtime runtime, str ident):
    """Withdraw an export (after the importers closed theirs, before freeing the memory).
    ACL closes the key; a CUDA handle needs no closing."""
    cdef bytes k = ident.encode()
    cdef const char *kp = k
    cdef int rc
    if runtime.name != "acl":
        return
    need_ipc(runtime)
    with nogil:
        rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
        if rc == 0:
            rc = g_acl.aclrtIpcMemClose(kp)
    runtime.check(rc, f"aclrtIpcMemClose({ident})")
