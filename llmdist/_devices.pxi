# Device runtimes: ACL (Ascend) and CUDA, looked up with dlopen/dlsym at run time into tables of
# function pointers, and adapted to the llmd_runtime interface by nogil functions.

from libc.stdint cimport uint32_t, uint64_t
from posix.unistd cimport usleep

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_LOCAL
    int RTLD_GLOBAL
    int RTLD_NOLOAD

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC

cdef extern from "llmdist/acl.h" nogil:
    ctypedef int aclError
    ctypedef struct llmd_aclrtMemLocation:
        uint32_t id
        int type
    ctypedef struct llmd_aclrtMemcpyBatchAttr:
        llmd_aclrtMemLocation dstLoc
        llmd_aclrtMemLocation srcLoc
    ctypedef struct llmd_acl_api:
        aclError (*aclInit)(const char *) nogil
        aclError (*aclrtSetDevice)(int32_t) nogil
        aclError (*aclrtGetDeviceCount)(uint32_t *) nogil
        aclError (*aclrtCreateStream)(void **) nogil
        aclError (*aclrtDestroyStream)(void *) nogil
        aclError (*aclrtSynchronizeStream)(void *) nogil
        aclError (*aclrtStreamWaitEvent)(void *, void *) nogil
        aclError (*aclrtCreateEvent)(void **) nogil
        aclError (*aclrtDestroyEvent)(void *) nogil
        aclError (*aclrtRecordEvent)(void *, void *) nogil
        aclError (*aclrtQueryEventStatus)(void *, int *) nogil
        aclError (*aclrtSynchronizeEvent)(void *) nogil
        aclError (*aclrtMalloc)(void **, size_t, int) nogil
        aclError (*aclrtFree)(void *) nogil
        aclError (*aclrtMallocHost)(void **, size_t) nogil
        aclError (*aclrtFreeHost)(void *) nogil
        aclError (*aclrtMemcpyAsync)(void *, size_t, const void *, size_t, int, void *) nogil
        const char *(*aclGetRecentErrMsg)() nogil
        aclError (*aclrtCreateEventExWithFlag)(void **, uint32_t) nogil
        aclError (*aclrtSynchronizeEventWithTimeout)(void *, int32_t) nogil
        aclError (*aclrtMemcpyBatchAsync)(void **, size_t *, void **, size_t *, size_t,
                                          llmd_aclrtMemcpyBatchAttr *, size_t *, size_t,
                                          size_t *, void *) nogil
        aclError (*aclrtGetVersion)(int32_t *, int32_t *, int32_t *) nogil
        aclError (*aclrtIpcMemGetExportKey)(void *, size_t, char *, size_t, uint64_t) nogil
        aclError (*aclrtIpcMemSetImportPid)(const char *, int32_t *, size_t) nogil
        aclError (*aclrtIpcMemImportByKey)(void **, const char *, uint64_t) nogil
        aclError (*aclrtIpcMemClose)(const char *) nogil
        aclError (*aclrtDeviceGetBareTgid)(int32_t *) nogil
    int LLMD_ACL_REPEAT_INITIALIZE
    int LLMD_ACL_FEATURE_NOT_SUPPORT
    unsigned LLMD_ACL_EVENT_SYNC
    int LLMD_ACL_EVENT_COMPLETE
    int LLMD_ACL_MEM_MALLOC_HUGE_FIRST
    int LLMD_ACL_MEM_LOCATION_HOST
    int LLMD_ACL_MEM_LOCATION_DEVICE
    int LLMD_ACL_IPC_HANDLE_SIZE
    unsigned LLMD_ACL_IPC_EXPORT_NO_PID_CHECK
    unsigned LLMD_ACL_IPC_IMPORT_PEER_ACCESS

cdef extern from "llmdist/cuda.h" nogil:
    ctypedef struct llmd_cudaMemLocation:
        int type
        int id
    ctypedef struct llmd_cudaMemcpyAttributes:
        int srcAccessOrder
        llmd_cudaMemLocation srcLocHint
        llmd_cudaMemLocation dstLocHint
        unsigned int flags
    ctypedef struct llmd_cudaIpcMemHandle_t:
        char reserved[64]
    ctypedef int (*llmd_cudaMemcpyBatchAsync12_t)(void **, void **, size_t *, size_t,
                                                 llmd_cudaMemcpyAttributes *, size_t *, size_t,
                                                 size_t *, void *) nogil
    ctypedef int (*llmd_cudaMemcpyBatchAsync13_t)(void **, void **, size_t *, size_t,
                                                 llmd_cudaMemcpyAttributes *, size_t *, size_t,
                                                 void *) nogil
    ctypedef struct llmd_cuda_api:
        int (*cudaRuntimeGetVersion)(int *) nogil
        int (*cudaGetDeviceCount)(int *) nogil
        int (*cudaSetDevice)(int) nogil
        int (*cudaStreamCreateWithFlags)(void **, unsigned int) nogil
        int (*cudaStreamDestroy)(void *) nogil
        int (*cudaStreamSynchronize)(void *) nogil
        int (*cudaStreamWaitEvent)(void *, void *, unsigned int) nogil
        int (*cudaEventCreateWithFlags)(void **, unsigned int) nogil
        int (*cudaEventDestroy)(void *) nogil
        int (*cudaEventRecord)(void *, void *) nogil
        int (*cudaEventQuery)(void *) nogil
        int (*cudaEventSynchronize)(void *) nogil
        int (*cudaMalloc)(void **, size_t) nogil
        int (*cudaFree)(void *) nogil
        int (*cudaMallocHost)(void **, size_t) nogil
        int (*cudaFreeHost)(void *) nogil
        int (*cudaMemcpyAsync)(void *, const void *, size_t, int, void *) nogil
        const char *(*cudaGetErrorString)(int) nogil
        void *cudaMemcpyBatchAsync
        int (*cudaIpcGetMemHandle)(llmd_cudaIpcMemHandle_t *, void *) nogil
        int (*cudaIpcOpenMemHandle)(void **, llmd_cudaIpcMemHandle_t, unsigned int) nogil
        int (*cudaIpcCloseMemHandle)(void *) nogil
        int (*cudaLibraryLoadData)(void **, const void *, void *, void **, unsigned int, void *,
                                   void **, unsigned int) nogil
        int (*cudaLibraryGetKernel)(void **, void *, const char *) nogil
        int (*cudaLibraryUnload)(void *) nogil
        int (*cudaLaunchKernel)(const void *, llmd_cuda_dim3, llmd_cuda_dim3, void **, size_t,
                                void *) nogil
    int LLMD_CUDA_ERROR_INVALID_VALUE
    int LLMD_CUDA_ERROR_MEMORY_ALLOCATION
    int LLMD_CUDA_ERROR_NOT_READY
    unsigned LLMD_CUDA_STREAM_NON_BLOCKING
    unsigned LLMD_CUDA_EVENT_DISABLE_TIMING
    int LLMD_CUDA_MEM_LOCATION_DEVICE
    int LLMD_CUDA_MEM_LOCATION_HOST
    int LLMD_CUDA_ACCESS_ORDER_STREAM
    int LLMD_CUDA_IPC_HANDLE_SIZE
    unsigned LLMD_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS
    ctypedef struct llmd_cuda_dim3:
        unsigned int x, y, z

cdef extern from "llmdist/cuda_copy.h" nogil:
    ctypedef struct llmd_cuda_copy_kernel:
        void *kernel
    ctypedef struct llmd_cuda_copy_table:
        size_t npieces
    int llmd_cuda_copy_kernel_load(llmd_cuda_copy_kernel *k, const llmd_cuda_api *api,
                                   const char *ptx, char *why, size_t why_len)
    int llmd_cuda_copy_table_create(const llmd_cuda_copy_kernel *k, const uint64_t *runs,
                                    size_t count, size_t pair_capacity,
                                    llmd_cuda_copy_table **out)
    void llmd_cuda_copy_table_destroy(const llmd_cuda_copy_kernel *k, llmd_cuda_copy_table *t)
    int llmd_cuda_copy_launch(const llmd_cuda_copy_kernel *k, llmd_cuda_copy_table *t,
                              const uint64_t *srcs, const uint64_t *dsts, const uint64_t *dst_ends,
                              size_t npairs, void *stream, size_t *fail_pair)

# Codes llmdist itself returns through a device runtime's table.
cdef enum:
    LLMD_TIMEOUT_CODE = -2          # a bounded event wait ran out

cdef double monotonic_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6


cdef str dl_error():
    cdef char *e = dlerror()
    return e.decode("utf-8", "replace") if e != NULL else "unknown dlopen error"


cdef void *open_first(list paths, bint try_noload, list errors):
    """dlopen the first path that loads; errors collects each failure's dlerror text."""
    cdef void *h
    cdef bytes b
    for p in paths:
        b = p.encode()
        if try_noload:
            h = dlopen(b, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD)
            if h != NULL:
                return h
        h = dlopen(b, RTLD_NOW | RTLD_GLOBAL)
        if h != NULL:
            return h
        errors.append(dl_error())
    return NULL


cdef void *need(void *h, str name, list missing):
    cdef void *p = dlsym(h, name.encode())
    if p == NULL:
        missing.append(name)
    return p


cdef void *maybe(void *h, str name):
    return dlsym(h, name.encode())


# ------------------------------------------------------------------------------------------
# ACL

cdef llmd_acl_api g_acl
cdef llmd_runtime g_acl_rt
cdef bint g_acl_loaded = False
cdef int g_acl_batch_ok = 1
cdef int32_t g_acl_device = 0
cdef object g_acl_path = None

cdef int acl_set_device(void *ctx, int32_t dev) noexcept nogil:
    return g_acl.aclrtSetDevice(dev)

cdef int acl_malloc_device(void *ctx, void **p, size_t n) noexcept nogil:
    return g_acl.aclrtMalloc(p, n, LLMD_ACL_MEM_MALLOC_HUGE_FIRST)

cdef int acl_free_device(void *ctx, void *p) noexcept nogil:
    return g_acl.aclrtFree(p)

cdef int acl_malloc_host(void *ctx, void **p, size_t n) noexcept nogil:
    return g_acl.aclrtMallocHost(p, n)

cdef int acl_free_host(void *ctx, void *p) noexcept nogil:
    return g_acl.aclrtFreeHost(p)

cdef int acl_stream_create(void *ctx, llmd_stream *s) noexcept nogil:
    return g_acl.aclrtCreateStream(s)

cdef int acl_stream_destroy(void *ctx, llmd_stream s) noexcept nogil:
    cdef int rc = g_acl.aclrtSynchronizeStream(s)
    cdef int rc2 = g_acl.aclrtDestroyStream(s)
    return rc if rc != 0 else rc2

cdef int acl_stream_synchronize(void *ctx, llmd_stream s) noexcept nogil:
    return g_acl.aclrtSynchronizeStream(s)

cdef int acl_stream_wait_event(void *ctx, llmd_stream s, llmd_event e) noexcept nogil:
    return g_acl.aclrtStreamWaitEvent(s, e)

cdef int acl_event_create(void *ctx, llmd_event *e) noexcept nogil:
    # Events llmdist waits on need ACL_EVENT_SYNC; the Ex variant has no count limit.
    if g_acl.aclrtCreateEventExWithFlag != NULL:
        return g_acl.aclrtCreateEventExWithFlag(e, LLMD_ACL_EVENT_SYNC)
    return g_acl.aclrtCreateEvent(e)

cdef int acl_event_destroy(void *ctx, llmd_event e) noexcept nogil:
    return g_acl.aclrtDestroyEvent(e)

cdef int acl_event_record(void *ctx, llmd_event e, llmd_stream s) noexcept nogil:
    return g_acl.aclrtRecordEvent(e, s)

cdef int acl_event_query(void *ctx, llmd_event e, int *done) noexcept nogil:
    cdef int status = 0
    cdef int rc = g_acl.aclrtQueryEventStatus(e, &status)
    done[0] = status == LLMD_ACL_EVENT_COMPLETE
    return rc

cdef int acl_event_synchronize(void *ctx, llmd_event e, int32_t timeout_ms) noexcept nogil:
    cdef int rc, done = 0
    cdef double deadline
    if timeout_ms < 0:
        return g_acl.aclrtSynchronizeEvent(e)
    if g_acl.aclrtSynchronizeEventWithTimeout != NULL:
        return g_acl.aclrtSynchronizeEventWithTimeout(e, timeout_ms)
    deadline = monotonic_ms() + timeout_ms
    while True:
        rc = acl_event_query(ctx, e, &done)
        if rc != 0 or done:
            return rc
        if monotonic_ms() >= deadline:
            return LLMD_TIMEOUT_CODE
        usleep(50)

cdef int acl_memcpy_async(void *ctx, void *dst, size_t dst_max, const void *src, size_t n,
                          int kind, llmd_stream s) noexcept nogil:
    return g_acl.aclrtMemcpyAsync(dst, dst_max, src, n, kind, s)

cdef int acl_memcpy_batch(void *ctx, void **dsts, size_t *maxs, void **srcs, size_t *sizes,
                          size_t n, int kind, llmd_stream s, size_t *fail) noexcept nogil:
    global g_acl_batch_ok
    cdef llmd_aclrtMemcpyBatchAttr attr
    cdef size_t idx = 0, i
    cdef int rc
    if g_acl_batch_ok and g_acl.aclrtMemcpyBatchAsync != NULL:
        memset(&attr, 0, sizeof(attr))
        attr.dstLoc.id = g_acl_device
        attr.srcLoc.id = g_acl_device
        attr.dstLoc.type = LLMD_ACL_MEM_LOCATION_HOST if kind == LLMD_MEMCPY_D2H else LLMD_ACL_MEM_LOCATION_DEVICE
        attr.srcLoc.type = LLMD_ACL_MEM_LOCATION_HOST if kind == LLMD_MEMCPY_H2D else LLMD_ACL_MEM_LOCATION_DEVICE
        rc = g_acl.aclrtMemcpyBatchAsync(dsts, maxs, srcs, sizes, n, &attr, &idx, 1, fail, s)
        if rc != LLMD_ACL_FEATURE_NOT_SUPPORT:
            return rc
        g_acl_batch_ok = 0          # a trial feature this device lacks: copy run by run from now on
    for i in range(n):
        rc = g_acl.aclrtMemcpyAsync(dsts[i], maxs[i], srcs[i], sizes[i], kind, s)
        if rc != 0:
            fail[0] = i
            return rc
    return 0

cdef const char *acl_error_string(void *ctx, int code) noexcept nogil:
    cdef const char *m = NULL
    if code == LLMD_TIMEOUT_CODE:
        return "wait timed out"
    if g_acl.aclGetRecentErrMsg != NULL:
        m = g_acl.aclGetRecentErrMsg()
    if m == NULL:
        m = "no message from the ACL runtime"
    return m


cdef list acl_ipc_missing():
    """The ACL device-IPC symbols the loaded libascendcl lacks (they are newer than the rest)."""
    cdef list out = []
    if g_acl.aclrtIpcMemGetExportKey == NULL:
        out.append("aclrtIpcMemGetExportKey")
    if g_acl.aclrtIpcMemSetImportPid == NULL:
        out.append("aclrtIpcMemSetImportPid")
    if g_acl.aclrtIpcMemImportByKey == NULL:
        out.append("aclrtIpcMemImportByKey")
    if g_acl.aclrtIpcMemClose == NULL:
        out.append("aclrtIpcMemClose")
    return out


def acl_load(list paths, bint try_noload, int device_id):
    """Load libascendcl from the first of paths that opens; initialise ACL and check that a
    device exists. Returns (path, version string); raises RuntimeError with the reason."""
    global g_acl_loaded, g_acl_device, g_acl_path
    cdef list errors = [], missing = []
    cdef void *h
    cdef uint32_t count = 0
    cdef int32_t major = 0, minor = 0, patch = 0
    cdef int rc
    if not g_acl_loaded:
        h = open_first(paths, try_noload, errors)
        if h == NULL:
            raise RuntimeError("libascendcl.so could not be loaded: " + "; ".join(errors))
        memset(&g_acl, 0, sizeof(g_acl))
        g_acl.aclInit = <aclError (*)(const char *) noexcept nogil>need(h, "aclInit", missing)
        g_acl.aclrtSetDevice = <aclError (*)(int32_t) noexcept nogil>need(h, "aclrtSetDevice", missing)
        g_acl.aclrtGetDeviceCount = <aclError (*)(uint32_t *) noexcept nogil>need(h, "aclrtGetDeviceCount", missing)
        g_acl.aclrtCreateStream = <aclError (*)(void **) noexcept nogil>need(h, "aclrtCreateStream", missing)
        g_acl.aclrtDestroyStream = <aclError (*)(void *) noexcept nogil>need(h, "aclrtDestroyStream", missing)
        g_acl.aclrtSynchronizeStream = <aclError (*)(void *) noexcept nogil>need(h, "aclrtSynchronizeStream", missing)
        g_acl.aclrtStreamWaitEvent = <aclError (*)(void *, void *) noexcept nogil>need(h, "aclrtStreamWaitEvent", missing)
        g_acl.aclrtCreateEvent = <aclError (*)(void **) noexcept nogil>need(h, "aclrtCreateEvent", missing)
        g_acl.aclrtDestroyEvent = <aclError (*)(void *) noexcept nogil>need(h, "aclrtDestroyEvent", missing)
        g_acl.aclrtRecordEvent = <aclError (*)(void *, void *) noexcept nogil>need(h, "aclrtRecordEvent", missing)
        g_acl.aclrtQueryEventStatus = <aclError (*)(void *, int *) noexcept nogil>need(h, "aclrtQueryEventStatus", missing)
        g_acl.aclrtSynchronizeEvent = <aclError (*)(void *) noexcept nogil>need(h, "aclrtSynchronizeEvent", missing)
        g_acl.aclrtMalloc = <aclError (*)(void **, size_t, int) noexcept nogil>need(h, "aclrtMalloc", missing)
        g_acl.aclrtFree = <aclError (*)(void *) noexcept nogil>need(h, "aclrtFree", missing)
        g_acl.aclrtMallocHost = <aclError (*)(void **, size_t) noexcept nogil>need(h, "aclrtMallocHost", missing)
        g_acl.aclrtFreeHost = <aclError (*)(void *) noexcept nogil>need(h, "aclrtFreeHost", missing)
        g_acl.aclrtMemcpyAsync = <aclError (*)(void *, size_t, const void *, size_t, int, void *) noexcept nogil>need(h, "aclrtMemcpyAsync", missing)
        g_acl.aclGetRecentErrMsg = <const char *(*)() noexcept nogil>need(h, "aclGetRecentErrMsg", missing)
        g_acl.aclrtCreateEventExWithFlag = <aclError (*)(void **, uint32_t) noexcept nogil>maybe(h, "aclrtCreateEventExWithFlag")
        g_acl.aclrtSynchronizeEventWithTimeout = <aclError (*)(void *, int32_t) noexcept nogil>maybe(h, "aclrtSynchronizeEventWithTimeout")
        g_acl.aclrtMemcpyBatchAsync = <aclError (*)(void **, size_t *, void **, size_t *, size_t, llmd_aclrtMemcpyBatchAttr *, size_t *, size_t, size_t *, void *) noexcept nogil>maybe(h, "aclrtMemcpyBatchAsync")
        g_acl.aclrtGetVersion = <aclError (*)(int32_t *, int32_t *, int32_t *) noexcept nogil>maybe(h, "aclrtGetVersion")
        g_acl.aclrtIpcMemGetExportKey = <aclError (*)(void *, size_t, char *, size_t, uint64_t) noexcept nogil>maybe(h, "aclrtIpcMemGetExportKey")
        g_acl.aclrtIpcMemSetImportPid = <aclError (*)(const char *, int32_t *, size_t) noexcept nogil>maybe(h, "aclrtIpcMemSetImportPid")
        g_acl.aclrtIpcMemImportByKey = <aclError (*)(void **, const char *, uint64_t) noexcept nogil>maybe(h, "aclrtIpcMemImportByKey")
        g_acl.aclrtIpcMemClose = <aclError (*)(const char *) noexcept nogil>maybe(h, "aclrtIpcMemClose")
        g_acl.aclrtDeviceGetBareTgid = <aclError (*)(int32_t *) noexcept nogil>maybe(h, "aclrtDeviceGetBareTgid")
        if missing:
            raise RuntimeError(f"the loaded libascendcl.so lacks {', '.join(missing)}")
        rc = g_acl.aclInit(NULL)
        if rc != 0 and rc != LLMD_ACL_REPEAT_INITIALIZE:
            raise RuntimeError(f"aclInit failed: error {rc}: {acl_error_string(NULL, rc).decode('utf-8', 'replace')}")
        g_acl_rt.name = b"acl"
        g_acl_rt.ctx = NULL
        g_acl_rt.set_device = acl_set_device
        g_acl_rt.malloc_device = acl_malloc_device
        g_acl_rt.free_device = acl_free_device
        g_acl_rt.malloc_host = acl_malloc_host
        g_acl_rt.free_host = acl_free_host
        g_acl_rt.stream_create = acl_stream_create
        g_acl_rt.stream_destroy = acl_stream_destroy
        g_acl_rt.stream_synchronize = acl_stream_synchronize
        g_acl_rt.stream_wait_event = acl_stream_wait_event
        g_acl_rt.event_create = acl_event_create
        g_acl_rt.event_destroy = acl_event_destroy
        g_acl_rt.event_record = acl_event_record
        g_acl_rt.event_query = acl_event_query
        g_acl_rt.event_synchronize = acl_event_synchronize
        g_acl_rt.memcpy_async = acl_memcpy_async
        g_acl_rt.memcpy_batch_async = acl_memcpy_batch
        g_acl_rt.error_string = acl_error_string
        g_acl_path = paths[len(errors)] if len(errors) < len(paths) else paths[-1]
        g_acl_loaded = True
    rc = g_acl.aclrtGetDeviceCount(&count)
    if rc != 0:
        raise RuntimeError(f"aclrtGetDeviceCount failed: error {rc}: {acl_error_string(NULL, rc).decode('utf-8', 'replace')}")
    if count == 0:
        raise RuntimeError("the ACL runtime sees no device")
    if device_id >= <int>count:
        raise RuntimeError(f"device_id {device_id} is out of range: the ACL runtime sees {count} device(s)")
    g_acl_device = device_id
    version = "unknown"
    if g_acl.aclrtGetVersion != NULL and g_acl.aclrtGetVersion(&major, &minor, &patch) == 0:
        version = f"{major}.{minor}.{patch}"
    return g_acl_path, version


# ------------------------------------------------------------------------------------------
# CUDA

cdef llmd_cuda_api g_cuda
cdef llmd_runtime g_cuda_rt
cdef bint g_cuda_loaded = False
cdef int g_cuda_version = 0
cdef int g_cuda_device = 0
cdef object g_cuda_path = None

cdef int cuda_set_device(void *ctx, int32_t dev) noexcept nogil:
    return g_cuda.cudaSetDevice(dev)

cdef int cuda_malloc_device(void *ctx, void **p, size_t n) noexcept nogil:
    return g_cuda.cudaMalloc(p, n)

cdef int cuda_free_device(void *ctx, void *p) noexcept nogil:
    return g_cuda.cudaFree(p)

cdef int cuda_malloc_host(void *ctx, void **p, size_t n) noexcept nogil:
    return g_cuda.cudaMallocHost(p, n)

cdef int cuda_free_host(void *ctx, void *p) noexcept nogil:
    return g_cuda.cudaFreeHost(p)

cdef int cuda_stream_create(void *ctx, llmd_stream *s) noexcept nogil:
    return g_cuda.cudaStreamCreateWithFlags(s, LLMD_CUDA_STREAM_NON_BLOCKING)

cdef int cuda_stream_destroy(void *ctx, llmd_stream s) noexcept nogil:
    cdef int rc = g_cuda.cudaStreamSynchronize(s)
    cdef int rc2 = g_cuda.cudaStreamDestroy(s)
    return rc if rc != 0 else rc2

cdef int cuda_stream_synchronize(void *ctx, llmd_stream s) noexcept nogil:
    return g_cuda.cudaStreamSynchronize(s)

cdef int cuda_stream_wait_event(void *ctx, llmd_stream s, llmd_event e) noexcept nogil:
    return g_cuda.cudaStreamWaitEvent(s, e, 0)

cdef int cuda_event_create(void *ctx, llmd_event *e) noexcept nogil:
    return g_cuda.cudaEventCreateWithFlags(e, LLMD_CUDA_EVENT_DISABLE_TIMING)

cdef int cuda_event_destroy(void *ctx, llmd_event e) noexcept nogil:
    return g_cuda.cudaEventDestroy(e)

cdef int cuda_event_record(void *ctx, llmd_event e, llmd_stream s) noexcept nogil:
    return g_cuda.cudaEventRecord(e, s)

cdef int cuda_event_query(void *ctx, llmd_event e, int *done) noexcept nogil:
    cdef int rc = g_cuda.cudaEventQuery(e)
    done[0] = rc == 0
    return 0 if rc == LLMD_CUDA_ERROR_NOT_READY else rc

cdef int cuda_event_synchronize(void *ctx, llmd_event e, int32_t timeout_ms) noexcept nogil:
    cdef int rc, done = 0
    cdef double deadline
    if timeout_ms < 0:
        return g_cuda.cudaEventSynchronize(e)
    deadline = monotonic_ms() + timeout_ms
    while True:
        rc = cuda_event_query(ctx, e, &done)
        if rc != 0 or done:
            return rc
        if monotonic_ms() >= deadline:
            return LLMD_TIMEOUT_CODE
        usleep(50)

cdef int cuda_memcpy_async(void *ctx, void *dst, size_t dst_max, const void *src, size_t n,
                           int kind, llmd_stream s) noexcept nogil:
    if n > dst_max:
        return LLMD_CUDA_ERROR_INVALID_VALUE
    return g_cuda.cudaMemcpyAsync(dst, src, n, kind, s)

cdef int cuda_memcpy_batch(void *ctx, void **dsts, size_t *maxs, void **srcs, size_t *sizes,
                           size_t n, int kind, llmd_stream s, size_t *fail) noexcept nogil:
    cdef llmd_cudaMemcpyAttributes attr
    cdef size_t idx = 0, i
    cdef int rc
    for i in range(n):
        if sizes[i] > maxs[i]:
            fail[0] = i
            return LLMD_CUDA_ERROR_INVALID_VALUE
    if g_cuda.cudaMemcpyBatchAsync == NULL:
        for i in range(n):
            rc = g_cuda.cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], kind, s)
            if rc != 0:
                fail[0] = i
                return rc
        return 0
    memset(&attr, 0, sizeof(attr))
    attr.srcAccessOrder = LLMD_CUDA_ACCESS_ORDER_STREAM     # keep stream order (see RUNTIMES.md)
    attr.srcLocHint.type = LLMD_CUDA_MEM_LOCATION_HOST if kind == LLMD_MEMCPY_H2D else LLMD_CUDA_MEM_LOCATION_DEVICE
    attr.srcLocHint.id = 0 if kind == LLMD_MEMCPY_H2D else g_cuda_device
    attr.dstLocHint.type = LLMD_CUDA_MEM_LOCATION_HOST if kind == LLMD_MEMCPY_D2H else LLMD_CUDA_MEM_LOCATION_DEVICE
    attr.dstLocHint.id = 0 if kind == LLMD_MEMCPY_D2H else g_cuda_device
    if g_cuda_version >= 13000:
        return (<llmd_cudaMemcpyBatchAsync13_t>g_cuda.cudaMemcpyBatchAsync)(
            dsts, srcs, sizes, n, &attr, &idx, 1, s)
    return (<llmd_cudaMemcpyBatchAsync12_t>g_cuda.cudaMemcpyBatchAsync)(
        dsts, srcs, sizes, n, &attr, &idx, 1, fail, s)

cdef const char *cuda_error_string(void *ctx, int code) noexcept nogil:
    if code == LLMD_TIMEOUT_CODE:
        return "wait timed out"
    return g_cuda.cudaGetErrorString(code)


cdef list cuda_ipc_missing():
    """The CUDA device-IPC symbols the loaded libcudart lacks."""
    cdef list out = []
    if g_cuda.cudaIpcGetMemHandle == NULL:
        out.append("cudaIpcGetMemHandle")
    if g_cuda.cudaIpcOpenMemHandle == NULL:
        out.append("cudaIpcOpenMemHandle")
    if g_cuda.cudaIpcCloseMemHandle == NULL:
        out.append("cudaIpcCloseMemHandle")
    return out


def cuda_load(list paths, int device_id):
    """Load libcudart from the first of paths that opens and check that a device exists.
    Returns (path, version string); raises RuntimeError with the reason."""
    global g_cuda_loaded, g_cuda_version, g_cuda_device, g_cuda_path
    cdef list errors = [], missing = []
    cdef void *h
    cdef int count = 0, rc, version = 0
    if not g_cuda_loaded:
        h = open_first(paths, False, errors)
        if h == NULL:
            raise RuntimeError("libcudart could not be loaded: " + "; ".join(errors))
        memset(&g_cuda, 0, sizeof(g_cuda))
        g_cuda.cudaRuntimeGetVersion = <int (*)(int *) noexcept nogil>need(h, "cudaRuntimeGetVersion", missing)
        g_cuda.cudaGetDeviceCount = <int (*)(int *) noexcept nogil>need(h, "cudaGetDeviceCount", missing)
        g_cuda.cudaSetDevice = <int (*)(int) noexcept nogil>need(h, "cudaSetDevice", missing)
        g_cuda.cudaStreamCreateWithFlags = <int (*)(void **, unsigned int) noexcept nogil>need(h, "cudaStreamCreateWithFlags", missing)
        g_cuda.cudaStreamDestroy = <int (*)(void *) noexcept nogil>need(h, "cudaStreamDestroy", missing)
        g_cuda.cudaStreamSynchronize = <int (*)(void *) noexcept nogil>need(h, "cudaStreamSynchronize", missing)
        g_cuda.cudaStreamWaitEvent = <int (*)(void *, void *, unsigned int) noexcept nogil>need(h, "cudaStreamWaitEvent", missing)
        g_cuda.cudaEventCreateWithFlags = <int (*)(void **, unsigned int) noexcept nogil>need(h, "cudaEventCreateWithFlags", missing)
        g_cuda.cudaEventDestroy = <int (*)(void *) noexcept nogil>need(h, "cudaEventDestroy", missing)
        g_cuda.cudaEventRecord = <int (*)(void *, void *) noexcept nogil>need(h, "cudaEventRecord", missing)
        g_cuda.cudaEventQuery = <int (*)(void *) noexcept nogil>need(h, "cudaEventQuery", missing)
        g_cuda.cudaEventSynchronize = <int (*)(void *) noexcept nogil>need(h, "cudaEventSynchronize", missing)
        g_cuda.cudaMalloc = <int (*)(void **, size_t) noexcept nogil>need(h, "cudaMalloc", missing)
        g_cuda.cudaFree = <int (*)(void *) noexcept nogil>need(h, "cudaFree", missing)
        g_cuda.cudaMallocHost = <int (*)(void **, size_t) noexcept nogil>need(h, "cudaMallocHost", missing)
        g_cuda.cudaFreeHost = <int (*)(void *) noexcept nogil>need(h, "cudaFreeHost", missing)
        g_cuda.cudaMemcpyAsync = <int (*)(void *, const void *, size_t, int, void *) noexcept nogil>need(h, "cudaMemcpyAsync", missing)
        g_cuda.cudaGetErrorString = <const char *(*)(int) noexcept nogil>need(h, "cudaGetErrorString", missing)
        g_cuda.cudaIpcGetMemHandle = <int (*)(llmd_cudaIpcMemHandle_t *, void *) noexcept nogil>maybe(h, "cudaIpcGetMemHandle")
        g_cuda.cudaIpcOpenMemHandle = <int (*)(void **, llmd_cudaIpcMemHandle_t, unsigned int) noexcept nogil>maybe(h, "cudaIpcOpenMemHandle")
        g_cuda.cudaIpcCloseMemHandle = <int (*)(void *) noexcept nogil>maybe(h, "cudaIpcCloseMemHandle")
        g_cuda.cudaLibraryLoadData = <int (*)(void **, const void *, void *, void **, unsigned int, void *, void **, unsigned int) noexcept nogil>maybe(h, "cudaLibraryLoadData")
        g_cuda.cudaLibraryGetKernel = <int (*)(void **, void *, const char *) noexcept nogil>maybe(h, "cudaLibraryGetKernel")
        g_cuda.cudaLibraryUnload = <int (*)(void *) noexcept nogil>maybe(h, "cudaLibraryUnload")
        g_cuda.cudaLaunchKernel = <int (*)(const void *, llmd_cuda_dim3, llmd_cuda_dim3, void **, size_t, void *) noexcept nogil>maybe(h, "cudaLaunchKernel")
        if missing:
            raise RuntimeError(f"the loaded libcudart lacks {', '.join(missing)}")
        rc = g_cuda.cudaRuntimeGetVersion(&version)
        if rc != 0:
            raise RuntimeError(f"cudaRuntimeGetVersion failed: error {rc}")
        g_cuda_version = version
        if version >= 12080:
            g_cuda.cudaMemcpyBatchAsync = maybe(h, "cudaMemcpyBatchAsync")
        g_cuda_rt.name = b"cuda"
        g_cuda_rt.ctx = NULL
        g_cuda_rt.set_device = cuda_set_device
        g_cuda_rt.malloc_device = cuda_malloc_device
        g_cuda_rt.free_device = cuda_free_device
        g_cuda_rt.malloc_host = cuda_malloc_host
        g_cuda_rt.free_host = cuda_free_host
        g_cuda_rt.stream_create = cuda_stream_create
        g_cuda_rt.stream_destroy = cuda_stream_destroy
        g_cuda_rt.stream_synchronize = cuda_stream_synchronize
        g_cuda_rt.stream_wait_event = cuda_stream_wait_event
        g_cuda_rt.event_create = cuda_event_create
        g_cuda_rt.event_destroy = cuda_event_destroy
        g_cuda_rt.event_record = cuda_event_record
        g_cuda_rt.event_query = cuda_event_query
        g_cuda_rt.event_synchronize = cuda_event_synchronize
        g_cuda_rt.memcpy_async = cuda_memcpy_async
        g_cuda_rt.memcpy_batch_async = cuda_memcpy_batch
        g_cuda_rt.error_string = cuda_error_string
        g_cuda_path = paths[len(errors)]
        g_cuda_loaded = True
    version_text = f"{g_cuda_version // 1000}.{(g_cuda_version % 1000) // 10}"
    rc = g_cuda.cudaGetDeviceCount(&count)
    if rc != 0:
        raise RuntimeError(f"libcudart {version_text} ({g_cuda_path}) found no usable GPU: "
                           f"cudaGetDeviceCount: error {rc}: "
                           f"{g_cuda.cudaGetErrorString(rc).decode('utf-8', 'replace')}")
    if count == 0:
        raise RuntimeError(f"libcudart {version_text} sees no GPU")
    if device_id >= count:
        raise RuntimeError(f"device_id {device_id} is out of range: CUDA sees {count} GPU(s)")
    g_cuda_device = device_id
    return g_cuda_path, version_text


# ------------------------------------------------------------------------------------------
# CUDA copy kernel (device-to-device copies of the layer loop; DMA when it is not available)

cdef llmd_cuda_copy_kernel g_cuda_kernel
cdef int g_cuda_kernel_state = 0        # 0 not tried, 1 loaded, -1 failed
cdef str g_cuda_kernel_why = ""


def cuda_copy_kernel_load():
    """Load the copy kernel's PTX into the CUDA runtime once per process (the driver JIT-compiles
    it for the current device). Returns None when it is ready, else why it cannot be used."""
    global g_cuda_kernel_state, g_cuda_kernel_why
    cdef char why[512]
    cdef bytes ptx
    cdef const char *text
    cdef int rc
    if g_cuda_kernel_state == 0:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "copy_runs.ptx")
        try:
            with open(path, "rb") as f:
                ptx = f.read() + b"\0"
        except OSError as exc:
            g_cuda_kernel_state = -1
            g_cuda_kernel_why = f"the copy kernel's PTX is missing: {exc}"
            return g_cuda_kernel_why
        text = ptx
        why[0] = 0
        with nogil:
            g_cuda.cudaSetDevice(g_cuda_device)
            rc = llmd_cuda_copy_kernel_load(&g_cuda_kernel, &g_cuda, text, why, sizeof(why))
        if rc == 0:
            g_cuda_kernel_state = 1
        else:
            g_cuda_kernel_state = -1
            g_cuda_kernel_why = (<bytes>why).decode("utf-8", "replace")
    return None if g_cuda_kernel_state == 1 else g_cuda_kernel_why
