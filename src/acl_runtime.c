/* The ACL runtime behind llmd_runtime: libascendcl.so looked up at run time (see acl.h). */
#define _GNU_SOURCE
#include "llmdist/acl.h"
#include "runtime_common.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct acl_state {
    llmd_acl_api api;
    int loaded;
    int batch_ok;               /* cleared once the device refuses batch copies */
    int32_t device;
    char ipc_reason[2048];      /* why device IPC cannot be used; empty when it can */
} acl_state;

static acl_state g_acl = {.batch_ok = 1};

#define ACL_SYMBOL(group, ret, name, params) {#name, offsetof(llmd_acl_api, name), LLMD_SYM_##group},
static const llmd_symbol g_acl_symbols[] = {LLMD_ACL_SYMBOLS(ACL_SYMBOL)};
#define ACL_NSYMBOLS (sizeof(g_acl_symbols) / sizeof(g_acl_symbols[0]))

#define API (((acl_state *)ctx)->api)

static int a_set_device(void *ctx, int32_t dev) { return API.aclrtSetDevice(dev); }

static int a_malloc_device(void *ctx, void **p, size_t n)
{
    return API.aclrtMalloc(p, n, LLMD_ACL_MEM_MALLOC_HUGE_FIRST);
}

static int a_free_device(void *ctx, void *p) { return API.aclrtFree(p); }
static int a_malloc_host(void *ctx, void **p, size_t n) { return API.aclrtMallocHost(p, n); }
static int a_free_host(void *ctx, void *p) { return API.aclrtFreeHost(p); }

static int a_mem_info(void *ctx, size_t *free_bytes, size_t *total_bytes)
{
    if (!API.aclrtGetMemInfo) return LLMD_RT_NOT_SUPPORTED;
    return API.aclrtGetMemInfo(LLMD_ACL_HBM_MEM, free_bytes, total_bytes);
}
static int a_stream_create(void *ctx, llmd_stream *s) { return API.aclrtCreateStream(s); }

static int a_stream_destroy(void *ctx, llmd_stream s)
{
    int rc = API.aclrtSynchronizeStream(s);
    int rc2 = API.aclrtDestroyStream(s);
    return rc ? rc : rc2;
}

static int a_stream_synchronize(void *ctx, llmd_stream s) { return API.aclrtSynchronizeStream(s); }

static int a_stream_wait_event(void *ctx, llmd_stream s, llmd_event e)
{
    return API.aclrtStreamWaitEvent(s, e);
}

static int a_event_create(void *ctx, llmd_event *e)
{
    /* Events llmdist waits on need ACL_EVENT_SYNC; the Ex variant has no count limit. */
    if (API.aclrtCreateEventExWithFlag) return API.aclrtCreateEventExWithFlag(e, LLMD_ACL_EVENT_SYNC);
    return API.aclrtCreateEvent(e);
}

static int a_event_destroy(void *ctx, llmd_event e) { return API.aclrtDestroyEvent(e); }
static int a_event_record(void *ctx, llmd_event e, llmd_stream s) { return API.aclrtRecordEvent(e, s); }

static int a_event_query(void *ctx, llmd_event e, int *done)
{
    int status = 0;
    int rc = API.aclrtQueryEventStatus(e, &status);
    *done = status == LLMD_ACL_EVENT_RECORDED_STATUS_COMPLETE;
    return rc;
}

static int a_event_synchronize(void *ctx, llmd_event e, int32_t timeout_ms)
{
    if (timeout_ms < 0) return API.aclrtSynchronizeEvent(e);
    if (API.aclrtSynchronizeEventWithTimeout) return API.aclrtSynchronizeEventWithTimeout(e, timeout_ms);
    return llmd_poll_event(ctx, a_event_query, e, timeout_ms);
}

static int a_memcpy_async(void *ctx, void *dst, size_t dst_max, const void *src, size_t n,
                          int kind, llmd_stream s)
{
    return API.aclrtMemcpyAsync(dst, dst_max, src, n, kind, s);
}

/* ------------------------------------------------------------------------------------------ */
/* The copies of one layer: one batch call, or one copy per run where the device refuses
 * batches (a trial feature) or the destination is another device's memory.                    */

static int a_run_table_create(void *ctx, const llmd_run *runs, size_t count, size_t pairs,
                              llmd_run_table **out)
{
    (void)ctx;
    return llmd_run_table_new(runs, count, pairs, out) == 0 ? 0 : LLMD_RT_NO_MEMORY;
}

static int a_run_table_destroy(void *ctx, llmd_run_table *t)
{
    (void)ctx;
    llmd_run_table_free(t);
    return 0;
}

static int a_copy_runs(void *ctx, llmd_run_table *t, const llmd_tensor_pair *pairs, size_t count,
                       int kind, unsigned flags, llmd_stream s, size_t *fail_index)
{
    acl_state *st = (acl_state *)ctx;
    size_t first, n;
    if (llmd_run_table_expand(t, pairs, count, 1, &first, &n) != 0) return LLMD_RT_BAD_ARGUMENT;
    void **dsts = t->dsts + first, **srcs = t->srcs + first;
    size_t *sizes = t->sizes + first, *maxs = t->maxs + first;
    if (!(flags & LLMD_COPY_PEER_DEVICE) && st->batch_ok && API.aclrtMemcpyBatchAsync) {
        llmd_aclrtMemcpyBatchAttr attr;
        size_t attr_index = 0;
        memset(&attr, 0, sizeof(attr));
        attr.dstLoc.id = (uint32_t)st->device;
        attr.srcLoc.id = (uint32_t)st->device;
        attr.dstLoc.type = kind == LLMD_MEMCPY_D2H ? LLMD_ACL_MEM_LOCATION_HOST : LLMD_ACL_MEM_LOCATION_DEVICE;
        attr.srcLoc.type = kind == LLMD_MEMCPY_H2D ? LLMD_ACL_MEM_LOCATION_HOST : LLMD_ACL_MEM_LOCATION_DEVICE;
        int rc = API.aclrtMemcpyBatchAsync(dsts, maxs, srcs, sizes, n, &attr, &attr_index, 1,
                                           fail_index, s);
        if (rc != LLMD_ACL_FEATURE_NOT_SUPPORT) return rc;
        st->batch_ok = 0;       /* this device lacks the trial feature: run by run from now on */
    }
    return llmd_copy_each(ctx, a_memcpy_async, dsts, maxs, srcs, sizes, n, kind, s, fail_index);
}

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                       */

static const char *a_error_string(void *ctx, int code)
{
    const char *m = llmd_rt_error_string(code);
    if (m) return m;
    if (API.aclGetRecentErrMsg) m = API.aclGetRecentErrMsg();
    return m ? m : "no message from the ACL runtime";
}

static int a_error_class(void *ctx, int code)
{
    (void)ctx;
    switch (code) {
    case LLMD_ACL_MEMORY_ALLOCATION:
    case LLMD_ACL_DEVICE_OOM: return LLMD_ERROR_DEVICE_OUT_OF_MEMORY;
    case LLMD_ACL_DEVICE_MEM_ERROR: return LLMD_ERROR_DEVICE_MEMORY;
    case LLMD_ACL_STREAM_SYNC_TIMEOUT:
    case LLMD_ACL_EVENT_SYNC_TIMEOUT: return LLMD_ERROR_TIMEOUT;
    case LLMD_ACL_FEATURE_NOT_SUPPORT: return LLMD_ERROR_NOT_SUPPORTED;
    default: return llmd_rt_error_class(code);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Device IPC: the exporter makes a key for a page-aligned region and whitelists importers'
 * pids; an importer maps the key; both close it (the importer first).                          */

static const char *a_ipc_unavailable(void *ctx)
{
    acl_state *st = (acl_state *)ctx;
    return st->ipc_reason[0] ? st->ipc_reason : NULL;
}

static int a_ipc_self_pid(void *ctx, int32_t *pid)
{
    /* The host's pid, also inside a container, where the library can tell it. */
    if (API.aclrtDeviceGetBareTgid) return API.aclrtDeviceGetBareTgid(pid);
    *pid = (int32_t)getpid();
    return 0;
}

static int a_ipc_export(void *ctx, void *ptr, size_t size, int check_pid, char *id, size_t id_len)
{
    char key[LLMD_ACL_IPC_KEY_SIZE];
    if (!API.aclrtIpcMemGetExportKey) return LLMD_RT_NOT_SUPPORTED;
    if (id_len < sizeof(key)) return LLMD_RT_BAD_ARGUMENT;
    memset(key, 0, sizeof(key));
    int rc = API.aclrtIpcMemGetExportKey(ptr, size, key, sizeof(key),
                                         check_pid ? 0 : LLMD_ACL_IPC_EXPORT_NO_PID_CHECK);
    key[sizeof(key) - 1] = 0;
    memcpy(id, key, sizeof(key));
    return rc;
}

static int a_ipc_allow(void *ctx, const char *id, const int32_t *pids, size_t count)
{
    if (!API.aclrtIpcMemSetImportPid) return LLMD_RT_NOT_SUPPORTED;
    return API.aclrtIpcMemSetImportPid(id, (int32_t *)pids, count);
}

static int a_ipc_import(void *ctx, const char *id, void **ptr)
{
    if (!API.aclrtIpcMemImportByKey) return LLMD_RT_NOT_SUPPORTED;
    return API.aclrtIpcMemImportByKey(ptr, id, LLMD_ACL_IPC_IMPORT_PEER_ACCESS);
}

static int a_ipc_close(void *ctx, const char *id)
{
    if (!API.aclrtIpcMemClose) return LLMD_RT_NOT_SUPPORTED;
    return API.aclrtIpcMemClose(id);
}

static int a_ipc_close_import(void *ctx, const char *id, void *ptr)
{
    (void)ptr;
    return a_ipc_close(ctx, id);
}

/* An export key names the region it was made for, which must start on a page: a registered
 * region is exported as itself when it does. */
static int a_ipc_range(void *ctx, const void *ptr, size_t size, uint64_t *base, uint64_t *len)
{
    (void)ctx;
    if (!ptr || size == 0 || (uintptr_t)ptr % LLMD_ACL_IPC_ALIGN) return LLMD_RT_NOT_EXPORTABLE;
    *base = (uintptr_t)ptr;
    *len = size;
    return 0;
}

static const llmd_runtime g_acl_runtime = {
    .name = "acl",
    .ctx = &g_acl,
    .device_is_host = 0,
    .ipc_kind = "acl_ipc",
    .ipc_align = LLMD_ACL_IPC_ALIGN,
    .framework_device = "npu",
    .set_device = a_set_device,
    .malloc_device = a_malloc_device,
    .free_device = a_free_device,
    .malloc_host = a_malloc_host,
    .free_host = a_free_host,
    .mem_info = a_mem_info,
    .stream_create = a_stream_create,
    .stream_destroy = a_stream_destroy,
    .stream_synchronize = a_stream_synchronize,
    .stream_wait_event = a_stream_wait_event,
    .event_create = a_event_create,
    .event_destroy = a_event_destroy,
    .event_record = a_event_record,
    .event_query = a_event_query,
    .event_synchronize = a_event_synchronize,
    .memcpy_async = a_memcpy_async,
    .run_table_create = a_run_table_create,
    .run_table_destroy = a_run_table_destroy,
    .copy_runs = a_copy_runs,
    .select_device_copy = NULL,
    .error_string = a_error_string,
    .error_class = a_error_class,
    .ipc_unavailable = a_ipc_unavailable,
    .ipc_self_pid = a_ipc_self_pid,
    .ipc_export = a_ipc_export,
    .ipc_allow = a_ipc_allow,
    .ipc_import = a_ipc_import,
    .ipc_close_import = a_ipc_close_import,
    .ipc_close_export = a_ipc_close,
    .ipc_range = a_ipc_range,
};

/* ------------------------------------------------------------------------------------------ */
/* Loading                                                                                      */

const llmd_runtime *llmd_acl_load(const char *const *paths, size_t count, int try_loaded,
                                  int32_t device_id, llmd_load_report *report)
{
    static char library[sizeof(report->library)];
    acl_state *st = &g_acl;
    void *ctx = st;
    report->error[0] = 0;
    if (!st->loaded) {
        char errors[sizeof(report->error) - 64], missing[512];
        size_t which = 0;
        void *h = llmd_open_first(paths, count, try_loaded, &which, errors, sizeof(errors));
        if (!h) {
            snprintf(report->error, sizeof(report->error),
                     "libascendcl.so could not be loaded: %s", errors);
            return NULL;
        }
        llmd_resolve(h, g_acl_symbols, ACL_NSYMBOLS, &st->api);
        llmd_missing(g_acl_symbols, ACL_NSYMBOLS, &st->api, LLMD_SYM_REQUIRED, missing, sizeof(missing));
        if (missing[0]) {
            snprintf(report->error, sizeof(report->error),
                     "the loaded libascendcl.so lacks %s", missing);
            return NULL;
        }
        int rc = API.aclInit(NULL);
        if (rc != 0 && rc != LLMD_ACL_REPEAT_INITIALIZE) {
            snprintf(report->error, sizeof(report->error), "aclInit failed: error %d: %s", rc,
                     a_error_string(ctx, rc));
            return NULL;
        }
        snprintf(library, sizeof(library), "%s", paths[which]);
        llmd_missing(g_acl_symbols, ACL_NSYMBOLS, &st->api, LLMD_SYM_IPC, missing, sizeof(missing));
        if (missing[0])
            snprintf(st->ipc_reason, sizeof(st->ipc_reason),
                     "the loaded runtime library (%s) lacks %s", library, missing);
        st->loaded = 1;
    }
    uint32_t devices = 0;
    int rc = API.aclrtGetDeviceCount(&devices);
    if (rc != 0) {
        snprintf(report->error, sizeof(report->error), "aclrtGetDeviceCount failed: error %d: %s",
                 rc, a_error_string(ctx, rc));
        return NULL;
    }
    if (devices == 0) {
        snprintf(report->error, sizeof(report->error), "the ACL runtime sees no device");
        return NULL;
    }
    if (device_id < 0 || (uint32_t)device_id >= devices) {
        snprintf(report->error, sizeof(report->error),
                 "device_id %d is out of range: the ACL runtime sees %u device(s)", device_id, devices);
        return NULL;
    }
    st->device = device_id;
    snprintf(report->library, sizeof(report->library), "%s", library);
    int32_t major = 0, minor = 0, patch = 0;
    if (API.aclrtGetVersion && API.aclrtGetVersion(&major, &minor, &patch) == 0)
        snprintf(report->version, sizeof(report->version), "%d.%d.%d", major, minor, patch);
    else
        snprintf(report->version, sizeof(report->version), "unknown");
    return &g_acl_runtime;
}
