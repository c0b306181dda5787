/* The CUDA runtime behind llmd_runtime: libcudart looked up at run time (see cuda.h). */
#define _GNU_SOURCE
#include "llmdist/cuda.h"
#include "llmdist/cuda_copy.h"
#include "runtime_common.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct cuda_state {
    llmd_cuda_api api;
    int loaded;
    int version;                /* cudaRuntimeGetVersion: 12090, 13000, ... */
    int32_t device;
    char ipc_reason[2048];      /* why device IPC cannot be used; empty when it can */
    llmd_cuda_copy_kernel kernel;   /* the copy kernel, once loaded */
    int kernel_tried;           /* 1: loaded, -1: cannot be loaded (kernel_why), 0: not tried */
    char kernel_why[512];
    volatile int use_kernel;    /* device-to-device copy_runs by the copy kernel */
    /* The driver's cuMemGetAddressRange_v2 (libcuda.so.1), for ipc_range; NULL when absent. */
    int (*mem_get_address_range)(unsigned long long *base, size_t *size, unsigned long long ptr);
} cuda_state;

static cuda_state g_cuda;

#define CUDA_SYMBOL(group, ret, name, params) {#name, offsetof(llmd_cuda_api, name), LLMD_SYM_##group},
static const llmd_symbol g_cuda_symbols[] = {LLMD_CUDA_SYMBOLS(CUDA_SYMBOL)};
#define CUDA_NSYMBOLS (sizeof(g_cuda_symbols) / sizeof(g_cuda_symbols[0]))

#define API (((cuda_state *)ctx)->api)

static int c_set_device(void *ctx, int32_t dev) { return API.cudaSetDevice(dev); }
static int c_malloc_device(void *ctx, void **p, size_t n) { return API.cudaMalloc(p, n); }
static int c_free_device(void *ctx, void *p) { return API.cudaFree(p); }
static int c_malloc_host(void *ctx, void **p, size_t n) { return API.cudaMallocHost(p, n); }
static int c_free_host(void *ctx, void *p) { return API.cudaFreeHost(p); }

static int c_mem_info(void *ctx, size_t *free_bytes, size_t *total_bytes)
{
    if (!API.cudaMemGetInfo) return LLMD_RT_NOT_SUPPORTED;
    return API.cudaMemGetInfo(free_bytes, total_bytes);
}

static int c_stream_create(void *ctx, llmd_stream *s)
{
    return API.cudaStreamCreateWithFlags(s, LLMD_CUDA_STREAM_NON_BLOCKING);
}

static int c_stream_destroy(void *ctx, llmd_stream s)
{
    int rc = API.cudaStreamSynchronize(s);
    int rc2 = API.cudaStreamDestroy(s);
    return rc ? rc : rc2;
}

static int c_stream_synchronize(void *ctx, llmd_stream s) { return API.cudaStreamSynchronize(s); }

static int c_stream_wait_event(void *ctx, llmd_stream s, llmd_event e)
{
    return API.cudaStreamWaitEvent(s, e, 0);
}

static int c_event_create(void *ctx, llmd_event *e)
{
    return API.cudaEventCreateWithFlags(e, LLMD_CUDA_EVENT_DISABLE_TIMING);
}

static int c_event_destroy(void *ctx, llmd_event e) { return API.cudaEventDestroy(e); }
static int c_event_record(void *ctx, llmd_event e, llmd_stream s) { return API.cudaEventRecord(e, s); }

static int c_event_query(void *ctx, llmd_event e, int *done)
{
    int rc = API.cudaEventQuery(e);
    *done = rc == LLMD_CUDA_SUCCESS;
    return rc == LLMD_CUDA_ERROR_NOT_READY ? 0 : rc;
}

static int c_event_synchronize(void *ctx, llmd_event e, int32_t timeout_ms)
{
    if (timeout_ms < 0) return API.cudaEventSynchronize(e);
    return llmd_poll_event(ctx, c_event_query, e, timeout_ms);
}

/* cudaMemcpyAsync has no destination bound: check it here, as ACL does. */
static int c_memcpy_async(void *ctx, void *dst, size_t dst_max, const void *src, size_t n,
                          int kind, llmd_stream s)
{
    if (n > dst_max) return LLMD_CUDA_ERROR_INVALID_VALUE;
    return API.cudaMemcpyAsync(dst, src, n, kind, s);
}

/* ------------------------------------------------------------------------------------------ */
/* The copies of one layer: one cudaMemcpyBatchAsync (12.8+), else one copy per run.           */

static int c_run_table_create(void *ctx, const llmd_run *runs, size_t count, size_t pairs,
                              llmd_run_table **out)
{
    (void)ctx;
    return llmd_run_table_new(runs, count, pairs, out) == 0 ? 0 : LLMD_RT_NO_MEMORY;
}

static int c_run_table_destroy(void *ctx, llmd_run_table *t)
{
    cuda_state *st = (cuda_state *)ctx;
    if (t && t->device) llmd_cuda_copy_table_destroy(&st->kernel, t->device);
    llmd_run_table_free(t);
    return 0;
}

/* Device to device by the copy kernel: one launch for all pairs, the table's runs reaching the
 * device with the table's first launch (see cuda_copy.h). */
static int c_copy_runs_kernel(cuda_state *st, llmd_run_table *t, const llmd_tensor_pair *pairs,
                              size_t count, llmd_stream s, size_t *fail_index)
{
    size_t pair = 0;
    if (!t->device) {
        int rc = llmd_cuda_copy_table_create(&st->kernel, t->runs, t->count,
                                             t->capacity / t->count,
                                             (llmd_cuda_copy_table **)&t->device);
        if (rc != 0) {
            t->device = NULL;
            return rc;
        }
    }
    int rc = llmd_cuda_copy_launch(&st->kernel, t->device, pairs, count, s, &pair);
    if (rc != 0) *fail_index = pair * t->count;
    return rc;
}

static int c_copy_runs(void *ctx, llmd_run_table *t, const llmd_tensor_pair *pairs, size_t count,
                       int kind, unsigned flags, llmd_stream s, size_t *fail_index)
{
    cuda_state *st = (cuda_state *)ctx;
    size_t first, n;
    *fail_index = 0;
    if (st->use_kernel && kind == LLMD_MEMCPY_D2D && t->count > 0)
        return c_copy_runs_kernel(st, t, pairs, count, s, fail_index);
    if (llmd_run_table_expand(t, pairs, count, 1, &first, &n) != 0) return LLMD_RT_BAD_ARGUMENT;
    void **dsts = t->dsts + first, **srcs = t->srcs + first;
    size_t *sizes = t->sizes + first, *maxs = t->maxs + first;
    if (flags & LLMD_COPY_PEER_DEVICE)
        return llmd_copy_each(ctx, c_memcpy_async, dsts, maxs, srcs, sizes, n, kind, s, fail_index);
    for (size_t i = 0; i < n; i++) {
        if (sizes[i] > maxs[i]) {
            *fail_index = i;
            return LLMD_CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (!API.cudaMemcpyBatchAsync)
        return llmd_copy_each(ctx, c_memcpy_async, dsts, maxs, srcs, sizes, n, kind, s, fail_index);
    llmd_cudaMemcpyAttributes attr;
    size_t attr_index = 0;
    memset(&attr, 0, sizeof(attr));
    attr.srcAccessOrder = LLMD_CUDA_ACCESS_ORDER_STREAM;   /* keep stream order (RUNTIMES.md) */
    attr.srcLocHint.type = kind == LLMD_MEMCPY_H2D ? LLMD_CUDA_MEM_LOCATION_HOST : LLMD_CUDA_MEM_LOCATION_DEVICE;
    attr.srcLocHint.id = kind == LLMD_MEMCPY_H2D ? 0 : st->device;
    attr.dstLocHint.type = kind == LLMD_MEMCPY_D2H ? LLMD_CUDA_MEM_LOCATION_HOST : LLMD_CUDA_MEM_LOCATION_DEVICE;
    attr.dstLocHint.id = kind == LLMD_MEMCPY_D2H ? 0 : st->device;
    if (st->version >= LLMD_CUDA_BATCH_V13_VERSION)
        return ((llmd_cudaMemcpyBatchAsync13_t)API.cudaMemcpyBatchAsync)(
            dsts, (const void *const *)srcs, sizes, n, &attr, &attr_index, 1, s);
    return ((llmd_cudaMemcpyBatchAsync12_t)API.cudaMemcpyBatchAsync)(
        dsts, srcs, sizes, n, &attr, &attr_index, 1, fail_index, s);
}

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                       */

static const char *c_error_string(void *ctx, int code)
{
    const char *m = llmd_rt_error_string(code);
    if (m) return m;
    m = API.cudaGetErrorString(code);
    return m ? m : "no message from the CUDA runtime";
}

static int c_error_class(void *ctx, int code)
{
    (void)ctx;
    switch (code) {
    case LLMD_CUDA_ERROR_MEMORY_ALLOCATION: return LLMD_ERROR_DEVICE_OUT_OF_MEMORY;
    case LLMD_CUDA_ERROR_NOT_SUPPORTED: return LLMD_ERROR_NOT_SUPPORTED;
    default: return llmd_rt_error_class(code);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Device IPC: a handle covers the exporter's whole cudaMalloc allocation; its id is the hex of
 * the handle. No whitelist; nothing to close on the exporter's side.                           */

static const char *c_ipc_unavailable(void *ctx)
{
    cuda_state *st = (cuda_state *)ctx;
    return st->ipc_reason[0] ? st->ipc_reason : NULL;
}

static int c_ipc_self_pid(void *ctx, int32_t *pid)
{
    (void)ctx;
    *pid = (int32_t)getpid();
    return 0;
}

static int c_ipc_export(void *ctx, void *ptr, size_t size, int check_pid, char *id, size_t id_len)
{
    static const char hex[] = "0123456789abcdef";
    llmd_cudaIpcMemHandle_t handle;
    const unsigned char *raw = (const unsigned char *)&handle;
    (void)size; (void)check_pid;
    if (!API.cudaIpcGetMemHandle) return LLMD_RT_NOT_SUPPORTED;
    if (id_len < 2 * sizeof(handle) + 1) return LLMD_RT_BAD_ARGUMENT;
    memset(&handle, 0, sizeof(handle));
    int rc = API.cudaIpcGetMemHandle(&handle, ptr);
    if (rc != 0) return rc;
    for (size_t i = 0; i < sizeof(handle); i++) {
        id[2 * i] = hex[raw[i] >> 4];
        id[2 * i + 1] = hex[raw[i] & 15];
    }
    id[2 * sizeof(handle)] = 0;
    return 0;
}

static int c_ipc_allow(void *ctx, const char *id, const int32_t *pids, size_t count)
{
    (void)ctx; (void)id; (void)pids; (void)count;
    return 0;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int c_ipc_import(void *ctx, const char *id, void **ptr)
{
    llmd_cudaIpcMemHandle_t handle;
    unsigned char *raw = (unsigned char *)&handle;
    if (!API.cudaIpcOpenMemHandle) return LLMD_RT_NOT_SUPPORTED;
    if (strlen(id) != 2 * sizeof(handle)) return LLMD_RT_BAD_ARGUMENT;
    for (size_t i = 0; i < sizeof(handle); i++) {
        int hi = hex_digit(id[2 * i]), lo = hex_digit(id[2 * i + 1]);
        if (hi < 0 || lo < 0) return LLMD_RT_BAD_ARGUMENT;
        raw[i] = (unsigned char)(hi << 4 | lo);
    }
    return API.cudaIpcOpenMemHandle(ptr, handle, LLMD_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS);
}

static int c_ipc_close_import(void *ctx, const char *id, void *ptr)
{
    (void)id;
    if (!API.cudaIpcCloseMemHandle) return LLMD_RT_NOT_SUPPORTED;
    return API.cudaIpcCloseMemHandle(ptr);
}

static int c_ipc_close_export(void *ctx, const char *id)
{
    (void)ctx; (void)id;
    return 0;
}

/* The allocation holding ptr, from the driver: cudaIpcGetMemHandle of it covers ptr. Memory the
 * driver does not know (host memory) is not exportable; memory it knows but cannot share by a
 * handle (cuMem VMM) fails later, in cudaIpcGetMemHandle. */
static int c_ipc_range(void *ctx, const void *ptr, size_t size, uint64_t *base, uint64_t *len)
{
    cuda_state *st = (cuda_state *)ctx;
    unsigned long long b = 0;
    size_t n = 0;
    if (!st->mem_get_address_range) return LLMD_RT_NOT_SUPPORTED;
    if (!ptr || st->mem_get_address_range(&b, &n, (unsigned long long)(uintptr_t)ptr) != 0)
        return LLMD_RT_NOT_EXPORTABLE;
    if ((uintptr_t)ptr < b || (uintptr_t)ptr - b > n || size > n - ((uintptr_t)ptr - b))
        return LLMD_RT_NOT_EXPORTABLE;   /* [ptr, ptr + size) runs past the allocation */
    *base = b;
    *len = n;
    return 0;
}

/* The driver library (LLMDIST_CUDA_DRIVER_LIBRARY, else libcuda.so.1, which libcudart has
 * loaded already on a machine with a GPU): only for ipc_range. */
static void c_load_driver(cuda_state *st)
{
    const char *path = getenv("LLMDIST_CUDA_DRIVER_LIBRARY");
    void *h = dlopen(path && path[0] ? path : "libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h) *(void **)&st->mem_get_address_range = dlsym(h, "cuMemGetAddressRange_v2");
}

/* The copy kernel is PTX here (copy_runs.ptx in the package), loaded into the current device
 * on the first choice that wants it. */
static int c_select_device_copy(void *ctx, int mode, const char *ptx, char *why, size_t why_len)
{
    cuda_state *st = ctx;
    why[0] = 0;
    if (mode == LLMD_DEVICE_COPY_DMA || !st->loaded) {
        st->use_kernel = 0;
        snprintf(why, why_len, "%s", st->loaded ? "llmdist.device_copy=dma" : "CUDA is not loaded");
        return 0;
    }
    if (st->kernel_tried == 0) {
        char missing[256];
        llmd_missing(g_cuda_symbols, CUDA_NSYMBOLS, &st->api, LLMD_SYM_KERNEL, missing,
                     sizeof(missing));
        if (missing[0]) {
            snprintf(st->kernel_why, sizeof(st->kernel_why),
                     "the loaded libcudart lacks %s (CUDA 12.0 or newer is needed)", missing);
        } else if (!ptx) {
            snprintf(st->kernel_why, sizeof(st->kernel_why), "the copy kernel's PTX is missing");
        } else {
            API.cudaSetDevice(st->device);
            llmd_cuda_copy_kernel_load(&st->kernel, &st->api, ptx, st->kernel_why,
                                       sizeof(st->kernel_why));
        }
        st->kernel_tried = st->kernel.kernel ? 1 : -1;
    }
    st->use_kernel = st->kernel_tried == 1;
    if (st->use_kernel) return 1;
    snprintf(why, why_len, "%s", st->kernel_why);
    return mode == LLMD_DEVICE_COPY_KERNEL ? -1 : 0;
}

static const llmd_runtime g_cuda_runtime = {
    .name = "cuda",
    .ctx = &g_cuda,
    .device_is_host = 0,
    .ipc_kind = "cuda_ipc",
    .ipc_align = 1,
    .framework_device = "cuda",
    .set_device = c_set_device,
    .malloc_device = c_malloc_device,
    .free_device = c_free_device,
    .malloc_host = c_malloc_host,
    .free_host = c_free_host,
    .mem_info = c_mem_info,
    .stream_create = c_stream_create,
    .stream_destroy = c_stream_destroy,
    .stream_synchronize = c_stream_synchronize,
    .stream_wait_event = c_stream_wait_event,
    .event_create = c_event_create,
    .event_destroy = c_event_destroy,
    .event_record = c_event_record,
    .event_query = c_event_query,
    .event_synchronize = c_event_synchronize,
    .memcpy_async = c_memcpy_async,
    .run_table_create = c_run_table_create,
    .run_table_destroy = c_run_table_destroy,
    .copy_runs = c_copy_runs,
    .select_device_copy = c_select_device_copy,
    .error_string = c_error_string,
    .error_class = c_error_class,
    .ipc_unavailable = c_ipc_unavailable,
    .ipc_self_pid = c_ipc_self_pid,
    .ipc_export = c_ipc_export,
    .ipc_allow = c_ipc_allow,
    .ipc_import = c_ipc_import,
    .ipc_close_import = c_ipc_close_import,
    .ipc_close_export = c_ipc_close_export,
    .ipc_range = c_ipc_range,
};

/* ------------------------------------------------------------------------------------------ */
/* Loading                                                                                      */

const llmd_runtime *llmd_cuda_load(const char *const *paths, size_t count, int32_t device_id,
                                   llmd_load_report *report)
{
    static char library[sizeof(report->library)];
    cuda_state *st = &g_cuda;
    void *ctx = st;
    report->error[0] = 0;
    if (!st->loaded) {
        char errors[sizeof(report->error) - 64], missing[512];
        size_t which = 0;
        void *h = llmd_open_first(paths, count, 0, &which, errors, sizeof(errors));
        if (!h) {
            snprintf(report->error, sizeof(report->error), "libcudart could not be loaded: %s", errors);
            return NULL;
        }
        llmd_resolve(h, g_cuda_symbols, CUDA_NSYMBOLS, &st->api);
        llmd_missing(g_cuda_symbols, CUDA_NSYMBOLS, &st->api, LLMD_SYM_REQUIRED, missing, sizeof(missing));
        if (missing[0]) {
            snprintf(report->error, sizeof(report->error), "the loaded libcudart lacks %s", missing);
            return NULL;
        }
        int version = 0;
        int rc = API.cudaRuntimeGetVersion(&version);
        if (rc != 0) {
            snprintf(report->error, sizeof(report->error), "cudaRuntimeGetVersion failed: error %d", rc);
            return NULL;
        }
        st->version = version;
        if (version >= LLMD_CUDA_BATCH_MIN_VERSION)
            st->api.cudaMemcpyBatchAsync = dlsym(h, "cudaMemcpyBatchAsync");
        snprintf(library, sizeof(library), "%s", paths[which]);
        llmd_missing(g_cuda_symbols, CUDA_NSYMBOLS, &st->api, LLMD_SYM_IPC, missing, sizeof(missing));
        if (missing[0])
            snprintf(st->ipc_reason, sizeof(st->ipc_reason),
                     "the loaded runtime library (%s) lacks %s", library, missing);
        c_load_driver(st);
        st->loaded = 1;
    }
    snprintf(report->library, sizeof(report->library), "%s", library);
    snprintf(report->version, sizeof(report->version), "%d.%d", st->version / 1000,
             (st->version % 1000) / 10);
    int devices = 0;
    int rc = API.cudaGetDeviceCount(&devices);
    if (rc != 0) {
        snprintf(report->error, sizeof(report->error),
                 "libcudart %s (%s) found no usable GPU: cudaGetDeviceCount: error %d: %s",
                 report->version, library, rc, c_error_string(ctx, rc));
        return NULL;
    }
    if (devices == 0) {
        snprintf(report->error, sizeof(report->error), "libcudart %s sees no GPU", report->version);
        return NULL;
    }
    if (device_id < 0 || device_id >= devices) {
        snprintf(report->error, sizeof(report->error),
                 "device_id %d is out of range: CUDA sees %d GPU(s)", device_id, devices);
        return NULL;
    }
    st->device = device_id;
    return &g_cuda_runtime;
}
