/*
 * A fake libascendcl.so for tests on machines without an Ascend NPU.
 *
 * "Device" memory is host memory (one memfd per aclrtMalloc, mapped MAP_SHARED, so that another
 * process can map the same pages through device IPC), streams are worker threads with a FIFO,
 * events are sequence numbers. Every call checks its arguments the way the real runtime
 * does, and stricter where the real runtime would silently misbehave (pageable host memory in an
 * async copy, freeing memory that queued copies still use, destroying a stream with queued work),
 * so that bugs in the code under test surface as error codes with a message from
 * aclGetRecentErrMsg().
 *
 * Declarations are written from the facts in shared/spec/RUNTIMES.md (ACL section); no vendor
 * header is used.
 *
 * Build with -DFAKE_ACL_NO_IPC for a library without the device-IPC symbols (older CANN).
 *
 * This file is the ACL skin over the engine it shares with tests/fake_cuda (../fake_runtime):
 * call counters and fault injection, the allocation table, frees and imported mappings
 * (fake_engine.h), streams and events (fake_streams.h) and the copy checks and queueing
 * (fake_copies.h). Here are the vendor's names, error codes (struct fake_rules), signatures and
 * the checks only this runtime makes.
 *
 * Environment:
 *   FAKE_ACL_DEVICE_COUNT   number of devices (default 1, at most 64; 0 = no device)
 *   FAKE_ACL_NO_BATCH=1     aclrtMemcpyBatchAsync returns 207000 (feature not supported)
 *   FAKE_ACL_COPY_DELAY_US  microseconds each queued copy operation sleeps before copying
 *   FAKE_ACL_HBM_BYTES      device memory capacity per device (default 32 GiB)
 *   FAKE_ACL_POISON         0: never fill new allocations; 1: always fill with 0xA5;
 *                           unset: fill allocations up to 64 MiB (memory is "not zeroed")
 *   FAKE_ACL_STRICT_ALIGN=1 device ends of async copies must be 64-byte aligned (107008)
 *   FAKE_ACL_MAX_STREAMS    streams per device (default 1024; more -> 207008)
 *   FAKE_ACL_MAX_SYNC_EVENTS sync events per device (default 65535; more -> 207007)
 *
 * Device IPC works across processes of one host. An export key reads
 * "fakeacl-<pid>-<serial>-<memfd>-<metafd>": the exporting process, and two of its file
 * descriptors, which an importer opens through /proc/<pid>/fd (same user, as for ptrace reads).
 * <metafd> is a shared page holding the key's state (open or closed, export flags, the pid
 * whitelist of aclrtIpcMemSetImportPid, and which processes hold imports); <memfd> backs the
 * exported allocation. Rules: export flag 1 skips the pid check; the importer closes first
 * (aclrtIpcMemClose in the importing process), the exporter's close fails while a live process
 * still holds an import (dead importers are ignored), and memory is freed after its keys are
 * closed. Nothing outlives the processes: memfds vanish with their last mapping.
 *
 * Test hooks (extra exported symbols):
 *   int  fake_acl_inject(const char *api, int after, int code);
 *   long fake_acl_calls(const char *api);
 *   void fake_acl_reset(void);
 *   void fake_acl_set_batch_supported(int supported);
 *   void fake_acl_set_copy_delay_us(long us);
 *   long fake_acl_live(const char *what);
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef FAKE_ACL_NO_IPC /* an older CANN: the device-IPC functions are not exported */
#define IPC_EXPORT __attribute__((visibility("hidden")))
#else
#define IPC_EXPORT EXPORT
#endif

/* ------------------------------------------------------------------------------------------ */
/* Types, constants and error codes (from RUNTIMES.md)                                          */

typedef int aclError;
typedef void *aclrtStream;
typedef void *aclrtEvent;
typedef void *aclrtContext;

typedef struct {
    uint32_t id;
    int type; /* HOST=0, DEVICE=1, UNREGISTERED=2 */
} aclrtMemLocation;

typedef struct {
    aclrtMemLocation dstLoc, srcLoc;
    uint8_t rsv[16];
} aclrtMemcpyBatchAttr;

enum {
    ACL_SUCCESS = 0,
    ACL_ERROR_INVALID_PARAM = 100000,
    ACL_ERROR_UNINITIALIZE = 100001,
    ACL_ERROR_REPEAT_INITIALIZE = 100002,
    ACL_ERROR_RT_PARAM_INVALID = 107000,
    ACL_ERROR_RT_CONTEXT_NULL = 107002,
    ACL_ERROR_RT_STREAM_CONTEXT = 107003,
    ACL_ERROR_RT_ADDR_UNALIGNED = 107008,
    ACL_ERROR_RT_FEATURE_NOT_SUPPORT = 207000,
    ACL_ERROR_RT_MEMORY_ALLOCATION = 207001,
    ACL_ERROR_RT_NO_DEVICE = 207004,
    ACL_ERROR_RT_NO_EVENT_RESOURCE = 207007,
    ACL_ERROR_RT_NO_STREAM_RESOURCE = 207008,
    ACL_ERROR_RT_STREAM_SYNC_TIMEOUT = 507046,
    ACL_ERROR_RT_EVENT_SYNC_TIMEOUT = 507047,
    ACL_ERROR_RT_DEVICE_MEM_ERROR = 507053,
};

enum { LOC_HOST = 0, LOC_DEVICE = 1, LOC_UNREGISTERED = 2 };
#define ACL_EVENT_SYNC 0x1u
#define ACL_EVENT_TIME_LINE 0x8u
#define ACL_IPC_HANDLE_SIZE 65
#define MAX_DEV 64

/* ------------------------------------------------------------------------------------------ */
/* API table, call counters, fault injection                                                    */

#define API_LIST(X)                                                                           \
    X(aclInit) X(aclFinalize) X(aclrtSetDevice) X(aclrtResetDevice) X(aclrtGetDevice)          \
    X(aclrtGetDeviceCount) X(aclrtGetCurrentContext) X(aclrtSetCurrentContext)                \
    X(aclrtCreateStream) X(aclrtCreateStreamWithConfig) X(aclrtDestroyStream)                 \
    X(aclrtSynchronizeStream) X(aclrtSynchronizeStreamWithTimeout) X(aclrtStreamWaitEvent)    \
    X(aclrtSetStreamFailureMode) X(aclrtCreateEvent) X(aclrtCreateEventWithFlag)              \
    X(aclrtCreateEventExWithFlag) X(aclrtDestroyEvent) X(aclrtRecordEvent)                    \
    X(aclrtQueryEventStatus) X(aclrtSynchronizeEvent) X(aclrtSynchronizeEventWithTimeout)     \
    X(aclrtEventElapsedTime) X(aclrtMalloc) X(aclrtFree) X(aclrtMallocHost) X(aclrtFreeHost)  \
    X(aclrtGetMemInfo) X(aclrtMemcpy) X(aclrtMemcpyAsync) X(aclrtMemcpy2dAsync)               \
    X(aclrtMemcpyBatchAsync) X(aclrtIpcMemGetExportKey) X(aclrtIpcMemSetImportPid)            \
    X(aclrtIpcMemImportByKey) X(aclrtIpcMemClose) X(aclrtDeviceGetBareTgid)                   \
    X(aclGetRecentErrMsg) X(aclrtGetVersion)

#define FAKE_TAG "fake-acl"
#define FAKE_ENV(name) "FAKE_ACL_" name
#define FAKE_HOOK(name) fake_acl_##name
#define FAKE_ALLOC_FIELDS                                                                     \
    int exported; /* live export keys */                                                      \
    int peer;     /* imported with peer access: any device may copy it */
#define FAKE_RULES                                                                            \
    {                                                                                         \
        .bad_value = ACL_ERROR_INVALID_PARAM, .bad_handle = ACL_ERROR_RT_PARAM_INVALID,       \
        .bad_range = ACL_ERROR_RT_PARAM_INVALID, .no_memory = ACL_ERROR_RT_MEMORY_ALLOCATION, \
        .no_stream = ACL_ERROR_RT_NO_STREAM_RESOURCE,                                         \
        .no_event = ACL_ERROR_RT_NO_EVENT_RESOURCE,                                           \
        .stream_device = ACL_ERROR_RT_STREAM_CONTEXT,                                         \
        .event_device = ACL_ERROR_RT_STREAM_CONTEXT,                                          \
        .stream_timeout = ACL_ERROR_RT_STREAM_SYNC_TIMEOUT,                                   \
        .event_timeout = ACL_ERROR_RT_EVENT_SYNC_TIMEOUT,                                     \
        .timing = ACL_ERROR_RT_PARAM_INVALID, .not_ready = ACL_ERROR_RT_PARAM_INVALID,        \
        .busy_destroy = ACL_ERROR_RT_PARAM_INVALID, .busy_free = ACL_ERROR_RT_PARAM_INVALID,  \
        .same_stream = 1, .wait_flag = ACL_EVENT_SYNC, .wait_flag_name = "ACL_EVENT_SYNC",    \
        .import_name = "aclrtIpcMemImportByKey", .close_name = "aclrtIpcMemClose",            \
    }
#include "fake_engine.h"

#define FAKE_STREAM_FIELDS                                                                    \
    int priority;                                                                             \
    uint64_t failure_mode;
#define FAKE_OP_FIELDS
#include "fake_streams.h"
#include "fake_copies.h"

/* ------------------------------------------------------------------------------------------ */
/* Global state                                                                                 */

static atomic_int g_initialized;
static atomic_uint g_epoch = 1; /* aclFinalize bumps it: every thread loses its device */
static _Thread_local int t_device = -1;
static _Thread_local unsigned t_epoch;

static atomic_int g_batch_override = -1; /* -1: use env FAKE_ACL_NO_BATCH */
static int g_nsync_events_dev[MAX_DEV];

static int current_device(void)
{
    if (t_device < 0 || t_epoch != atomic_load(&g_epoch)) return -1;
    return t_device;
}

#define NEED_DEVICE(dev)                                                                      \
    int dev = current_device();                                                               \
    if (dev < 0)                                                                              \
        return fail(ACL_ERROR_RT_CONTEXT_NULL,                                                \
                    "no current device/context in this thread (call aclrtSetDevice or "       \
                    "aclrtSetCurrentContext in every thread that issues work)")

/* ---- contexts ---- */

struct ctx {
    int device;
    unsigned epoch;
};
static struct reg g_ctxs;
/* ---- IPC ---- */

#define META_MAGIC 0x3143504c43414654ull /* "TFACLPC1" */
#define META_MAX_PIDS 256
#define META_MAX_IMPORTERS 64

/* A key's state, in a shared page that the exporter and every importer map. */
struct ipc_meta {
    uint64_t magic;
    char name[ACL_IPC_HANDLE_SIZE];
    pthread_mutex_t mu; /* process-shared, robust: a process may die holding it */
    int32_t owner_pid;
    int32_t open;       /* 0 once the exporter closed the key */
    uint64_t flags;     /* export flags: 1 = no pid check */
    uint64_t offset;    /* of the exported region inside the memfd */
    uint64_t size;
    int32_t device;
    uint32_t npids;
    int32_t pids[META_MAX_PIDS];
    uint32_t nimporters;
    struct {
        int32_t pid;
        int32_t count;
    } importers[META_MAX_IMPORTERS];
};

struct ipc_key { /* exported by this process */
    char name[ACL_IPC_HANDLE_SIZE];
    struct alloc *owner;
    uintptr_t ptr;
    size_t size;
    int meta_fd;
    struct ipc_meta *meta;
    struct ipc_key *next;
};
static struct ipc_key *g_keys;
static uint64_t g_key_serial;

struct ipc_import { /* imported by this process */
    char name[ACL_IPC_HANDLE_SIZE];
    struct alloc *alias;
    struct ipc_meta *meta; /* the key's state: our own mapping when foreign */
    int foreign;           /* exported by another process */
    struct ipc_import *next;
};
static struct ipc_import *g_imports;

/* ------------------------------------------------------------------------------------------ */
/* Init and device                                                                              */

EXPORT aclError aclInit(const char *configPath)
{
    (void)configPath;
    ENTER(aclInit);
    int expected = 0;
    if (!atomic_compare_exchange_strong(&g_initialized, &expected, 1))
        return fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit was already called");
    return ACL_SUCCESS;
}

EXPORT aclError aclFinalize(void)
{
    ENTER(aclFinalize);
    int expected = 1;
    if (!atomic_compare_exchange_strong(&g_initialized, &expected, 0))
        return fail(ACL_ERROR_UNINITIALIZE, "aclFinalize without aclInit");
    atomic_fetch_add(&g_epoch, 1);
    return ACL_SUCCESS;
}

EXPORT aclError aclrtSetDevice(int32_t deviceId)
{
    ENTER(aclrtSetDevice);
    if (!atomic_load(&g_initialized))
        return fail(ACL_ERROR_UNINITIALIZE, "aclInit must be called before aclrtSetDevice");
    int n = device_count();
    if (n == 0) return fail(ACL_ERROR_RT_NO_DEVICE, "no NPU device (FAKE_ACL_DEVICE_COUNT=0)");
    if (deviceId < 0 || deviceId >= n)
        return fail(ACL_ERROR_INVALID_PARAM, "device id %d out of range [0, %d)", deviceId, n);
    t_device = deviceId;
    t_epoch = atomic_load(&g_epoch);
    return ACL_SUCCESS;
}

EXPORT aclError aclrtResetDevice(int32_t deviceId)
{
    ENTER(aclrtResetDevice);
    if (!atomic_load(&g_initialized)) return fail(ACL_ERROR_UNINITIALIZE, "aclInit not called");
    int n = device_count();
    if (deviceId < 0 || deviceId >= n)
        return fail(ACL_ERROR_INVALID_PARAM, "device id %d out of range [0, %d)", deviceId, n);
    if (current_device() == deviceId) t_device = -1;
    return ACL_SUCCESS;
}

EXPORT aclError aclrtGetDevice(int32_t *deviceId)
{
    ENTER(aclrtGetDevice);
    if (!deviceId) return fail(ACL_ERROR_INVALID_PARAM, "deviceId is NULL");
    NEED_DEVICE(dev);
    *deviceId = dev;
    return ACL_SUCCESS;
}

EXPORT aclError aclrtGetDeviceCount(uint32_t *count)
{
    ENTER(aclrtGetDeviceCount);
    if (!count) return fail(ACL_ERROR_INVALID_PARAM, "count is NULL");
    *count = (uint32_t)device_count();
    return ACL_SUCCESS;
}

EXPORT aclError aclrtGetCurrentContext(aclrtContext *context)
{
    ENTER(aclrtGetCurrentContext);
    if (!context) return fail(ACL_ERROR_INVALID_PARAM, "context is NULL");
    NEED_DEVICE(dev);
    unsigned ep = atomic_load(&g_epoch);
    pthread_mutex_lock(&g_mu);
    struct ctx *found = NULL;
    for (size_t i = 0; i < g_ctxs.n && !found; i++) {
        struct ctx *c = g_ctxs.v[i];
        if (c->device == dev && c->epoch == ep) found = c;
    }
    if (!found) {
        found = calloc(1, sizeof *found);
        if (found) {
            found->device = dev;
            found->epoch = ep;
            if (reg_add(&g_ctxs, found) != 0) {
                free(found);
                found = NULL;
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (!found) return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    *context = found;
    return ACL_SUCCESS;
}

EXPORT aclError aclrtSetCurrentContext(aclrtContext context)
{
    ENTER(aclrtSetCurrentContext);
    if (!context) return fail(ACL_ERROR_INVALID_PARAM, "context is NULL");
    pthread_mutex_lock(&g_mu);
    int ok = reg_has(&g_ctxs, context);
    pthread_mutex_unlock(&g_mu);
    if (!ok) return fail(ACL_ERROR_RT_PARAM_INVALID, "unknown context %p", context);
    struct ctx *c = context;
    if (c->epoch != atomic_load(&g_epoch))
        return fail(ACL_ERROR_RT_PARAM_INVALID, "context %p was destroyed by aclFinalize", context);
    t_device = c->device;
    t_epoch = c->epoch;
    return ACL_SUCCESS;
}

EXPORT aclError aclrtGetVersion(int32_t *major, int32_t *minor, int32_t *patch)
{
    ENTER(aclrtGetVersion);
    if (!major || !minor || !patch) return fail(ACL_ERROR_INVALID_PARAM, "NULL output pointer");
    *major = 1;
    *minor = 15;
    *patch = 0;
    return ACL_SUCCESS;
}

EXPORT const char *aclGetRecentErrMsg(void)
{
    atomic_fetch_add(&g_calls[API_aclGetRecentErrMsg], 1);
    return t_has_msg ? t_msg : NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Streams                                                                                      */

static aclError create_stream(aclrtStream *stream)
{
    if (!stream) return fail(ACL_ERROR_INVALID_PARAM, "stream is NULL");
    NEED_DEVICE(dev);
    return stream_create(stream, dev, env_long("FAKE_ACL_MAX_STREAMS", 1024));
}

EXPORT aclError aclrtCreateStream(aclrtStream *stream)
{
    ENTER(aclrtCreateStream);
    return create_stream(stream);
}

EXPORT aclError aclrtCreateStreamWithConfig(aclrtStream *stream, uint32_t priority, uint32_t flag)
{
    ENTER(aclrtCreateStreamWithConfig);
    (void)flag;
    if (priority > 7) return fail(ACL_ERROR_INVALID_PARAM, "priority %u not in 0..7", priority);
    aclError rc = create_stream(stream);
    if (rc == ACL_SUCCESS) ((struct stream *)*stream)->priority = (int)priority;
    return rc;
}

/* Destroying a stream with queued work is refused (rules.busy_destroy). */
EXPORT aclError aclrtDestroyStream(aclrtStream stream)
{
    ENTER(aclrtDestroyStream);
    if (!stream) return fail(ACL_ERROR_INVALID_PARAM, "cannot destroy the default (NULL) stream");
    NEED_DEVICE(dev);
    return stream_destroy(stream, dev);
}

/* A synchronization's outcome: its error rc, else the call's injected failure inj (returned
 * only once the wait is over, after: what ended it), else success. */
static aclError after_wait(int rc, int inj, const char *after)
{
    if (rc) return rc;
    if (inj) return fail(inj, "injected failure (after %s)", after);
    return ACL_SUCCESS;
}

static aclError sync_stream(int inj, aclrtStream stream, long ms)
{
    NEED_DEVICE(dev);
    return after_wait(stream_sync(stream, dev, ms), inj, "the stream drained");
}

EXPORT aclError aclrtSynchronizeStream(aclrtStream stream)
{
    int inj = api_enter(API_aclrtSynchronizeStream);
    return sync_stream(inj, stream, -1);
}

EXPORT aclError aclrtSynchronizeStreamWithTimeout(aclrtStream stream, int32_t timeout)
{
    int inj = api_enter(API_aclrtSynchronizeStreamWithTimeout);
    if (timeout < -1) return fail(ACL_ERROR_INVALID_PARAM, "timeout %d < -1", timeout);
    return sync_stream(inj, stream, timeout);
}

EXPORT aclError aclrtSetStreamFailureMode(aclrtStream stream, uint64_t mode)
{
    ENTER(aclrtSetStreamFailureMode);
    if (mode > 1)
        return fail(ACL_ERROR_INVALID_PARAM, "failure mode %llu not 0 or 1",
                    (unsigned long long)mode);
    NEED_DEVICE(dev);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (s) {
        s->failure_mode = mode;
        stream_put_locked(s);
    }
    pthread_mutex_unlock(&g_mu);
    return s ? ACL_SUCCESS : err;
}

EXPORT aclError aclrtStreamWaitEvent(aclrtStream stream, aclrtEvent event)
{
    ENTER(aclrtStreamWaitEvent);
    NEED_DEVICE(dev);
    return stream_wait_event(stream, event, dev);
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

static const char *event_untimed(const struct event *e)
{
    return e->flags & ACL_EVENT_TIME_LINE ? NULL : "both events need ACL_EVENT_TIME_LINE";
}

/* counted: the event counts against the sync event limit of its device (when it syncs). */
static aclError create_event(aclrtEvent *event, uint32_t flags, int counted)
{
    if (!event) return fail(ACL_ERROR_INVALID_PARAM, "event is NULL");
    if (flags & ~0xFu) return fail(ACL_ERROR_INVALID_PARAM, "unknown event flag bits 0x%x", flags);
    NEED_DEVICE(dev);
    int *count = counted && (flags & ACL_EVENT_SYNC) ? &g_nsync_events_dev[dev] : NULL;
    return event_create(event, dev, flags, count, env_long("FAKE_ACL_MAX_SYNC_EVENTS", 65535));
}

EXPORT aclError aclrtCreateEvent(aclrtEvent *event)
{
    ENTER(aclrtCreateEvent);
    return create_event(event, ACL_EVENT_SYNC | ACL_EVENT_TIME_LINE, 1);
}

EXPORT aclError aclrtCreateEventWithFlag(aclrtEvent *event, uint32_t flag)
{
    ENTER(aclrtCreateEventWithFlag);
    return create_event(event, flag, 1);
}

EXPORT aclError aclrtCreateEventExWithFlag(aclrtEvent *event, uint32_t flag)
{
    ENTER(aclrtCreateEventExWithFlag);
    return create_event(event, flag, 0);
}

EXPORT aclError aclrtDestroyEvent(aclrtEvent event)
{
    ENTER(aclrtDestroyEvent);
    NEED_DEVICE(dev);
    (void)dev;
    return event_destroy(event);
}

EXPORT aclError aclrtRecordEvent(aclrtEvent event, aclrtStream stream)
{
    ENTER(aclrtRecordEvent);
    NEED_DEVICE(dev);
    return event_record(event, stream, dev);
}

EXPORT aclError aclrtQueryEventStatus(aclrtEvent event, int *status)
{
    ENTER(aclrtQueryEventStatus);
    if (!status) return fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    NEED_DEVICE(dev);
    (void)dev;
    return event_query(event, status); /* COMPLETE=1, NOT_READY=0 */
}

static aclError sync_event(int inj, aclrtEvent event, long ms)
{
    NEED_DEVICE(dev);
    (void)dev;
    return after_wait(event_sync(event, ms), inj, "the event completed");
}

EXPORT aclError aclrtSynchronizeEvent(aclrtEvent event)
{
    int inj = api_enter(API_aclrtSynchronizeEvent);
    return sync_event(inj, event, -1);
}

EXPORT aclError aclrtSynchronizeEventWithTimeout(aclrtEvent event, int32_t timeout)
{
    int inj = api_enter(API_aclrtSynchronizeEventWithTimeout);
    if (timeout < -1) return fail(ACL_ERROR_INVALID_PARAM, "timeout %d < -1", timeout);
    return sync_event(inj, event, timeout);
}

EXPORT aclError aclrtEventElapsedTime(float *ms, aclrtEvent startEvent, aclrtEvent endEvent)
{
    ENTER(aclrtEventElapsedTime);
    if (!ms) return fail(ACL_ERROR_INVALID_PARAM, "ms is NULL");
    NEED_DEVICE(dev);
    (void)dev;
    return event_elapsed(ms, startEvent, endEvent);
}

/* ------------------------------------------------------------------------------------------ */
/* Memory                                                                                       */

EXPORT aclError aclrtMalloc(void **devPtr, size_t size, int policy)
{
    ENTER(aclrtMalloc);
    if (!devPtr) return fail(ACL_ERROR_INVALID_PARAM, "devPtr is NULL");
    if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "size 0");
    if (policy < 0) return fail(ACL_ERROR_INVALID_PARAM, "bad policy %d", policy);
    NEED_DEVICE(dev);
    char why[256];
    struct alloc *a = device_alloc(dev, size, "fakeacl-device", why, sizeof why);
    if (!a) return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s", why);
    *devPtr = a->raw;
    return ACL_SUCCESS;
}

/* Memory with live export keys stays until its keys are closed. */
static int free_refused_locked(const struct alloc *a, const void *p)
{
    if (a->exported)
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "%p is still exported (%d key(s)): aclrtIpcMemClose the keys first", p,
                    a->exported);
    return 0;
}

EXPORT aclError aclrtFree(void *devPtr)
{
    ENTER(aclrtFree);
    if (!devPtr) return fail(ACL_ERROR_INVALID_PARAM, "devPtr is NULL");
    NEED_DEVICE(dev);
    (void)dev;
    return alloc_free(devPtr, A_DEVICE, "device");
}

EXPORT aclError aclrtMallocHost(void **hostPtr, size_t size)
{
    ENTER(aclrtMallocHost);
    if (!hostPtr) return fail(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL");
    if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "size 0");
    NEED_DEVICE(dev);
    (void)dev;
    return host_alloc(size, hostPtr);
}

EXPORT aclError aclrtFreeHost(void *hostPtr)
{
    ENTER(aclrtFreeHost);
    if (!hostPtr) return fail(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL");
    NEED_DEVICE(dev);
    (void)dev;
    return alloc_free(hostPtr, A_HOST_PINNED, "page-locked host");
}

EXPORT aclError aclrtGetMemInfo(int attr, size_t *freeBytes, size_t *totalBytes)
{
    ENTER(aclrtGetMemInfo);
    if (!freeBytes || !totalBytes) return fail(ACL_ERROR_INVALID_PARAM, "NULL output pointer");
    if (attr < 0 || attr > 7) return fail(ACL_ERROR_INVALID_PARAM, "unknown memory attribute %d", attr);
    NEED_DEVICE(dev);
    size_t total, freeb;
    if (attr == 0) { /* DDR: report the host's numbers */
        long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
        total = (size_t)(pages > 0 ? pages : 0) * page_size();
        freeb = (size_t)(avail > 0 ? avail : 0) * page_size();
    } else {
        total = device_capacity();
        pthread_mutex_lock(&g_mu);
        size_t used = g_dev_used[dev];
        pthread_mutex_unlock(&g_mu);
        freeb = used < total ? total - used : 0;
    }
    *freeBytes = freeb;
    *totalBytes = total;
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Copies                                                                                       */

static const char *const g_kind_names[] = {"H2H", "H2D", "D2H", "D2D", "DEFAULT"};

/*
 * Check one end of a copy: [p, p + extent) with the side wanted by the copy kind.
 * want_dev: 1 for a device end, 0 for a host end. Caller holds g_mu. On success *out is the
 * allocation (NULL for pageable host memory in a synchronous copy).
 */
static int check_end_locked(const char *role, const void *p, size_t extent, int want_dev,
                            int async, int dev, struct alloc **out)
{
    struct alloc *a = tab_find(p);
    *out = a;
    uintptr_t u = (uintptr_t)p;
    if (want_dev) {
        if (!a || a->kind != A_DEVICE)
            return fail(ACL_ERROR_RT_PARAM_INVALID,
                        "%s %p should be device memory but is %s host memory", role, p,
                        a ? "page-locked" : "unregistered");
        if (u >= a->base + a->size || extent > a->base + a->size - u)
            return fail(ACL_ERROR_RT_DEVICE_MEM_ERROR,
                        "%s range [%p, +%zu) leaves the device allocation [%p, +%zu)", role, p,
                        extent, (void *)a->base, a->size);
        if (a->device != dev && !(a->imported && a->peer))
            return fail(ACL_ERROR_RT_PARAM_INVALID,
                        "%s %p is memory of device %d but the current device is %d", role, p,
                        a->device, dev);
        if (async && env_long("FAKE_ACL_STRICT_ALIGN", 0) == 1 && (u & 63))
            return fail(ACL_ERROR_RT_ADDR_UNALIGNED, "%s %p is not 64-byte aligned", role, p);
        return 0;
    }
    if (a && a->kind == A_DEVICE)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "%s %p should be host memory but is device memory",
                    role, p);
    if (a) {
        if (extent > a->base + a->size - u)
            return fail(ACL_ERROR_RT_PARAM_INVALID,
                        "%s range [%p, +%zu) leaves the page-locked buffer [%p, +%zu)", role, p,
                        extent, (void *)a->base, a->size);
        return 0;
    }
    if (async)
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "%s %p: pageable host memory in async copy (allocate it with "
                    "aclrtMallocHost and stage through it)",
                    role, p);
    return 0;
}

/* Validate one (2D) copy and fill g. Caller holds g_mu. Does not touch pending counts. */
static int check_copy_locked(struct seg *g, const struct copy_args *c)
{
    if (c->kind < 0 || c->kind > K_DEFAULT)
        return fail(ACL_ERROR_INVALID_PARAM, "bad copy kind %d", c->kind);
    int dd, sd, rc;
    copy_sides_locked(c, &dd, &sd);
    if (c->async && !dd && !sd)
        return fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT,
                    "host-to-host async copy (kind %s) is not supported", g_kind_names[c->kind]);
    rc = check_end_locked("dst", c->dst, copy_extent(c, c->dpitch), dd, c->async, c->dev, &g->da);
    if (!rc)
        rc = check_end_locked("src", c->src, copy_extent(c, c->spitch), sd, c->async, c->dev,
                              &g->sa);
    if (!rc) seg_set(g, c);
    return rc;
}

/* The error of a copy of count bytes into room for destMax, or 0. */
static int check_count(void *dst, size_t destMax, const void *src, size_t count)
{
    if (count > destMax)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "count %zu > destMax %zu", count, destMax);
    if (count && (!dst || !src)) return fail(ACL_ERROR_INVALID_PARAM, "NULL dst or src");
    return 0;
}

EXPORT aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, int kind)
{
    ENTER(aclrtMemcpy);
    NEED_DEVICE(dev);
    int rc = check_count(dst, destMax, src, count);
    if (rc || count == 0) return rc;
    return copy_sync(copy_line(dst, src, count, kind, 0, dev));
}

EXPORT aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count,
                                 int kind, aclrtStream stream)
{
    ENTER(aclrtMemcpyAsync);
    NEED_DEVICE(dev);
    int pre = check_count(dst, destMax, src, count);
    return copy_async(stream, copy_line(dst, src, count, kind, 1, dev), pre);
}

EXPORT aclError aclrtMemcpy2dAsync(void *dst, size_t dpitch, const void *src, size_t spitch,
                                   size_t width, size_t height, int kind, aclrtStream stream)
{
    ENTER(aclrtMemcpy2dAsync);
    NEED_DEVICE(dev);
    int pre = 0;
    int empty = width == 0 || height == 0;
    if (width > dpitch || width > spitch)
        pre = fail(ACL_ERROR_INVALID_PARAM, "width %zu > pitch (dpitch %zu, spitch %zu)", width,
                   dpitch, spitch);
    else if (!empty && (!dst || !src))
        pre = fail(ACL_ERROR_INVALID_PARAM, "NULL dst or src");
    else if (!empty && ((height - 1) > (SIZE_MAX - width) / dpitch ||
                        (height - 1) > (SIZE_MAX - width) / spitch))
        pre = fail(ACL_ERROR_INVALID_PARAM, "2D extent overflows");
    else if (!empty && kind == K_H2H)
        pre = fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "host-to-host 2D copy is not supported");
    struct copy_args c = {.dst = dst, .src = src, .dpitch = dpitch, .spitch = spitch,
                          .width = width, .rows = height, .kind = kind, .async = 1, .dev = dev};
    return copy_async(stream, c, pre);
}

static int batch_supported(void)
{
    int o = atomic_load(&g_batch_override);
    if (o >= 0) return o;
    return env_long("FAKE_ACL_NO_BATCH", 0) != 1;
}

/* The location an attribute claims vs what the pointer is. Caller holds g_mu. */
static int check_loc_locked(const char *role, size_t i, const void *at,
                            const struct alloc *a)
{
    const aclrtMemLocation *loc = at;
    int dev = current_device();
    switch (loc->type) {
    case LOC_DEVICE:
        if (!a || a->kind != A_DEVICE)
            return fail(ACL_ERROR_RT_PARAM_INVALID,
                        "entry %zu: %sLoc says DEVICE but the pointer is host memory", i, role);
        if (loc->id != (uint32_t)a->device || (int)loc->id != dev)
            return fail(ACL_ERROR_RT_PARAM_INVALID,
                        "entry %zu: %sLoc.id %u but the memory is on device %d (current %d)", i,
                        role, loc->id, a->device, dev);
        return 0;
    case LOC_HOST:
        if (a && a->kind == A_DEVICE)
            return fail(ACL_ERROR_RT_PARAM_INVALID,
                        "entry %zu: %sLoc says HOST but the pointer is device memory", i, role);
        return 0;
    case LOC_UNREGISTERED:
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "entry %zu: %sLoc UNREGISTERED: pageable host memory in async copy", i, role);
    default:
        return fail(ACL_ERROR_INVALID_PARAM, "entry %zu: bad %sLoc.type %d", i, role, loc->type);
    }
}

EXPORT aclError aclrtMemcpyBatchAsync(void **dsts, size_t *destMaxs, void **srcs, size_t *sizes,
                                      size_t numBatches, aclrtMemcpyBatchAttr *attrs,
                                      size_t *attrsIndexes, size_t numAttrs, size_t *failIndex,
                                      aclrtStream stream)
{
    ENTER(aclrtMemcpyBatchAsync);
    if (!failIndex) return fail(ACL_ERROR_INVALID_PARAM, "failIndex is NULL");
    *failIndex = SIZE_MAX;
    if (!batch_supported())
        return fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "aclrtMemcpyBatchAsync is not supported here");
    NEED_DEVICE(dev);
    if (!dsts || !destMaxs || !srcs || !sizes || !attrs || !attrsIndexes)
        return fail(ACL_ERROR_INVALID_PARAM, "NULL array argument");
    struct batch_args b = {.dsts = dsts, .srcs = srcs, .sizes = sizes, .dest_maxs = destMaxs,
                           .count = numBatches, .attrs = attrs, .attr_size = sizeof *attrs,
                           .dst_loc_at = offsetof(aclrtMemcpyBatchAttr, dstLoc),
                           .src_loc_at = offsetof(aclrtMemcpyBatchAttr, srcLoc),
                           .attr_idxs = attrsIndexes, .nattrs = numAttrs,
                           .fail_index = failIndex, .count_name = "numBatches",
                           .idxs_name = "attrsIndexes"};
    int rc = check_batch_args(&b);
    return rc ? rc : copy_batch(stream, dev, &b);
}

/* ------------------------------------------------------------------------------------------ */
/* IPC (across processes of one host: see the top of this file)                                 */

static size_t round_page(size_t n)
{
    size_t ps = page_size();
    return (n + ps - 1) / ps * ps;
}

static size_t meta_maplen(void) { return round_page(sizeof(struct ipc_meta)); }

static void meta_lock(struct ipc_meta *m)
{
    if (pthread_mutex_lock(&m->mu) == EOWNERDEAD) pthread_mutex_consistent(&m->mu);
}

static void meta_unlock(struct ipc_meta *m) { pthread_mutex_unlock(&m->mu); }

/* A process that still exists and is not a zombie. */
static int pid_alive(int32_t pid)
{
    if (pid <= 0 || (kill(pid, 0) != 0 && errno != EPERM)) return 0;
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')'); /* the state follows the command name */
    return !(rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X'));
}

/* caller holds the meta lock */
static int meta_allows(const struct ipc_meta *m, int32_t pid)
{
    if (m->flags & 1) return 1;
    for (uint32_t i = 0; i < m->npids; i++)
        if (m->pids[i] == pid) return 1;
    return 0;
}

static void meta_drop_importer(struct ipc_meta *m, int32_t pid)
{
    meta_lock(m);
    for (uint32_t i = 0; i < m->nimporters; i++)
        if (m->importers[i].pid == pid && m->importers[i].count > 0) {
            m->importers[i].count--;
            break;
        }
    meta_unlock(m);
}

/* caller holds g_mu: a key this process exported and has not closed */
static struct ipc_key *key_find_locked(const char *name)
{
    for (struct ipc_key *k = g_keys; k; k = k->next)
        if (strncmp(k->name, name, ACL_IPC_HANDLE_SIZE) == 0) return k;
    return NULL;
}

/* caller holds g_mu: the newest open import of name in this process, and the link to it */
static struct ipc_import *import_find_locked(const char *name, struct ipc_import ***link)
{
    for (struct ipc_import **pp = &g_imports; *pp; pp = &(*pp)->next)
        if (strncmp((*pp)->name, name, ACL_IPC_HANDLE_SIZE) == 0) {
            if (link) *link = pp;
            return *pp;
        }
    return NULL;
}

/* "fakeacl-<pid>-<serial>-<memfd>-<metafd>"; 0 when name is not such a key. */
static int key_parse(const char *name, long *pid, int *memfd, int *metafd)
{
    unsigned long long serial;
    int n = 0;
    if (sscanf(name, "fakeacl-%ld-%llu-%d-%d%n", pid, &serial, memfd, metafd, &n) != 4 || !n)
        return 0;
    return name[n] == '\0' && *pid > 0 && *metafd >= 0;
}

static int valid_key_string(const char *key)
{
    return strnlen(key, ACL_IPC_HANDLE_SIZE) < ACL_IPC_HANDLE_SIZE;
}

IPC_EXPORT aclError aclrtIpcMemGetExportKey(void *devPtr, size_t size, char *key, size_t len,
                                        uint64_t flags)
{
    ENTER(aclrtIpcMemGetExportKey);
    if (!devPtr || !key || size == 0) return fail(ACL_ERROR_INVALID_PARAM, "NULL pointer or size 0");
    if (len < ACL_IPC_HANDLE_SIZE)
        return fail(ACL_ERROR_INVALID_PARAM, "key buffer %zu < ACL_IPC_HANDLE_SIZE", len);
    if (flags > 1) return fail(ACL_ERROR_INVALID_PARAM, "bad flags %llu", (unsigned long long)flags);
    NEED_DEVICE(dev);
    if ((uintptr_t)devPtr % page_size())
        return fail(ACL_ERROR_RT_ADDR_UNALIGNED, "exported region %p is not page aligned", devPtr);
    size_t ml = meta_maplen();
    pthread_mutex_lock(&g_mu);
    struct alloc *a = NULL;
    int rc = check_end_locked("devPtr", devPtr, size, 1, 0, dev, &a);
    if (!rc && a->imported)
        rc = fail(ACL_ERROR_RT_PARAM_INVALID, "%p is imported memory and cannot be re-exported",
                  devPtr);
    struct ipc_key *k = NULL;
    struct ipc_meta *m = MAP_FAILED;
    int mfd = -1;
    if (!rc) {
        k = calloc(1, sizeof *k);
        mfd = memfd_create("fakeacl-ipc-key", MFD_CLOEXEC);
        int e = errno;
        if (k && mfd >= 0 && ftruncate(mfd, (off_t)ml) == 0)
            m = mmap(NULL, ml, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        if (m == MAP_FAILED) {
            rc = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "cannot create the key's shared state (errno %d)",
                      mfd < 0 ? e : errno);
            if (mfd >= 0) close(mfd);
            free(k);
        }
    }
    if (!rc) {
        pthread_mutexattr_t at;
        pthread_mutexattr_init(&at);
        pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&at, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&m->mu, &at);
        pthread_mutexattr_destroy(&at);
        snprintf(k->name, sizeof k->name, "fakeacl-%ld-%llu-%d-%d", (long)getpid(),
                 (unsigned long long)++g_key_serial, a->fd, mfd);
        memcpy(m->name, k->name, sizeof m->name);
        m->owner_pid = (int32_t)getpid();
        m->open = 1;
        m->flags = flags;
        m->offset = (uintptr_t)devPtr - a->base;
        m->size = size;
        m->device = a->device;
        m->magic = META_MAGIC;
        k->owner = a;
        k->ptr = (uintptr_t)devPtr;
        k->size = size;
        k->meta_fd = mfd;
        k->meta = m;
        k->next = g_keys;
        g_keys = k;
        a->exported++;
        memset(key, 0, ACL_IPC_HANDLE_SIZE);
        memcpy(key, k->name, strlen(k->name));
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

IPC_EXPORT aclError aclrtIpcMemSetImportPid(const char *key, int32_t *pid, size_t num)
{
    ENTER(aclrtIpcMemSetImportPid);
    if (!key || !pid || num == 0) return fail(ACL_ERROR_INVALID_PARAM, "NULL key/pid or num 0");
    if (!valid_key_string(key)) return fail(ACL_ERROR_INVALID_PARAM, "key is longer than 64 characters");
    for (size_t i = 0; i < num; i++)
        if (pid[i] <= 0) return fail(ACL_ERROR_INVALID_PARAM, "pid[%zu] = %d", i, (int)pid[i]);
    NEED_DEVICE(dev);
    (void)dev;
    pthread_mutex_lock(&g_mu);
    struct ipc_key *k = key_find_locked(key);
    int rc = 0;
    if (!k) {
        rc = fail(ACL_ERROR_RT_PARAM_INVALID,
                  "key %.64s is not an open key exported by this process", key);
    } else {
        struct ipc_meta *m = k->meta;
        meta_lock(m);
        for (size_t i = 0; i < num && !rc; i++) {
            if (meta_allows(m, pid[i]) && !(m->flags & 1)) continue; /* already listed */
            if (m->npids == META_MAX_PIDS)
                rc = fail(ACL_ERROR_RT_PARAM_INVALID, "more than %d pids whitelisted for key %.64s",
                          META_MAX_PIDS, key);
            else
                m->pids[m->npids++] = pid[i];
        }
        meta_unlock(m);
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

/* Map another process's key: its state page, then the exported pages. Caller holds g_mu. */
static int import_foreign_locked(const char *key, int32_t me, struct ipc_meta **mout, void **pout,
                                 size_t *maplen, size_t *size, int *device)
{
    long pid;
    int memfd, metafd;
    if (!key_parse(key, &pid, &memfd, &metafd) || pid == me)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "unknown or closed IPC key %.64s", key);
    size_t ml = meta_maplen();
    int opened;
    struct ipc_meta *m = map_foreign_fd(pid, metafd, ml, 0, ml, &opened);
    if (!opened)
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "unknown or closed IPC key %.64s: cannot open the exporter's key state (%s)",
                    key, strerror(errno));
    if (m == MAP_FAILED || m->magic != META_MAGIC || m->owner_pid != (int32_t)pid ||
        strncmp(m->name, key, ACL_IPC_HANDLE_SIZE) != 0) {
        if (m != MAP_FAILED) munmap(m, ml);
        return fail(ACL_ERROR_RT_PARAM_INVALID, "unknown or closed IPC key %.64s", key);
    }
    int rc = 0;
    uint32_t slot = META_MAX_IMPORTERS;
    void *p = MAP_FAILED;
    size_t len = 0;
    meta_lock(m);
    if (!m->open)
        rc = fail(ACL_ERROR_RT_PARAM_INVALID, "IPC key %.64s was closed by its exporter", key);
    else if (!meta_allows(m, me))
        rc = fail(ACL_ERROR_RT_PARAM_INVALID,
                  "pid %d is not whitelisted for key %.64s (aclrtIpcMemSetImportPid)", (int)me, key);
    else if (memfd < 0)
        rc = fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT,
                  "the memory of key %.64s is not backed by shareable memory", key);
    if (!rc) {
        for (uint32_t i = 0; i < m->nimporters && slot == META_MAX_IMPORTERS; i++)
            if (m->importers[i].pid == me) slot = i;
        for (uint32_t i = 0; i < m->nimporters && slot == META_MAX_IMPORTERS; i++)
            if (m->importers[i].count == 0 || !pid_alive(m->importers[i].pid)) slot = i;
        if (slot == META_MAX_IMPORTERS && m->nimporters < META_MAX_IMPORTERS) slot = m->nimporters;
        if (slot == META_MAX_IMPORTERS)
            rc = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "key %.64s has %d importing processes",
                      key, META_MAX_IMPORTERS);
    }
    if (!rc) {
        len = round_page((size_t)m->size);
        int opened_mem;
        p = map_foreign_fd(pid, memfd, len, (off_t)m->offset, 0, &opened_mem);
        int e = errno;
        if (p == MAP_FAILED)
            rc = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "cannot map the memory of key %.64s (%s)",
                      key, strerror(e));
    }
    if (!rc) {
        if (m->importers[slot].pid != me) m->importers[slot].count = 0;
        m->importers[slot].pid = me;
        m->importers[slot].count++;
        if (slot == m->nimporters) m->nimporters++;
        *size = (size_t)m->size;
        *device = m->device;
    }
    meta_unlock(m);
    if (rc) {
        munmap(m, ml);
        return rc;
    }
    *mout = m;
    *pout = p;
    *maplen = len;
    return 0;
}

IPC_EXPORT aclError aclrtIpcMemImportByKey(void **devPtr, const char *key, uint64_t flags)
{
    ENTER(aclrtIpcMemImportByKey);
    if (!devPtr || !key) return fail(ACL_ERROR_INVALID_PARAM, "NULL devPtr or key");
    if (!valid_key_string(key)) return fail(ACL_ERROR_INVALID_PARAM, "key is longer than 64 characters");
    if (flags > 1) return fail(ACL_ERROR_INVALID_PARAM, "bad flags %llu", (unsigned long long)flags);
    NEED_DEVICE(dev);
    (void)dev;
    int32_t me = (int32_t)getpid();
    pthread_mutex_lock(&g_mu);
    int rc = 0, foreign = 0, device = 0;
    struct ipc_meta *m = NULL;
    void *p = MAP_FAILED;
    size_t maplen = 0, size = 0;
    struct ipc_key *k = key_find_locked(key);
    if (k) { /* our own key: a second mapping of the same pages at another address */
        meta_lock(k->meta);
        if (!meta_allows(k->meta, me))
            rc = fail(ACL_ERROR_RT_PARAM_INVALID,
                      "pid %d is not whitelisted for key %.64s (aclrtIpcMemSetImportPid)", (int)me,
                      key);
        meta_unlock(k->meta);
        if (!rc) {
            m = k->meta;
            size = k->size;
            device = k->owner->device;
            maplen = round_page(size);
            p = mremap((void *)k->ptr, 0, maplen, MREMAP_MAYMOVE);
            if (p == MAP_FAILED)
                rc = fail(ACL_ERROR_RT_MEMORY_ALLOCATION,
                          "cannot map the imported region (errno %d)", errno);
        }
    } else {
        foreign = 1;
        rc = import_foreign_locked(key, me, &m, &p, &maplen, &size, &device);
    }
    struct alloc *al = NULL;
    struct ipc_import *im = NULL;
    if (!rc) {
        im = calloc(1, sizeof *im);
        al = im ? import_insert_locked(p, size, maplen, device) : NULL;
        if (al) {
            al->peer = (int)(flags & 1);
        } else {
            munmap(p, maplen);
            if (foreign) {
                meta_drop_importer(m, me);
                munmap(m, meta_maplen());
            }
            free(im);
            rc = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
        }
    }
    if (!rc) {
        memcpy(im->name, key, strnlen(key, ACL_IPC_HANDLE_SIZE));
        im->alias = al;
        im->meta = m;
        im->foreign = foreign;
        im->next = g_imports;
        g_imports = im;
        *devPtr = p;
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

IPC_EXPORT aclError aclrtIpcMemClose(const char *key)
{
    ENTER(aclrtIpcMemClose);
    if (!key) return fail(ACL_ERROR_INVALID_PARAM, "key is NULL");
    if (!valid_key_string(key)) return fail(ACL_ERROR_INVALID_PARAM, "key is longer than 64 characters");
    NEED_DEVICE(dev);
    (void)dev;
    int32_t me = (int32_t)getpid();
    pthread_mutex_lock(&g_mu);
    int rc = 0;
    struct ipc_import **link = NULL;
    struct ipc_import *im = import_find_locked(key, &link); /* the importer closes first */
    struct ipc_key *k = im ? NULL : key_find_locked(key);
    if (im) {
        if (im->alias->pending) {
            rc = fail(ACL_ERROR_RT_PARAM_INVALID,
                      "imported memory %p is still used by %ld queued async operation(s)",
                      (void *)im->alias->base, im->alias->pending);
        } else {
            *link = im->next;
            tab_remove(im->alias);
        }
    } else if (k) { /* then the exporter, once no live process holds an import */
        int live = 0;
        int32_t holder = 0;
        meta_lock(k->meta);
        for (uint32_t i = 0; i < k->meta->nimporters; i++) {
            if (k->meta->importers[i].count <= 0) continue;
            if (pid_alive(k->meta->importers[i].pid)) {
                live++;
                holder = k->meta->importers[i].pid;
            } else {
                k->meta->importers[i].count = 0; /* died without closing */
            }
        }
        if (!live) k->meta->open = 0;
        meta_unlock(k->meta);
        if (live) {
            rc = fail(ACL_ERROR_RT_PARAM_INVALID,
                      "key %.64s is still imported by %d other process(es) (pid %d): importers "
                      "close first",
                      key, live, (int)holder);
        } else {
            struct ipc_key **pp = &g_keys;
            while (*pp != k) pp = &(*pp)->next;
            *pp = k->next;
            k->owner->exported--;
        }
    } else {
        rc = fail(ACL_ERROR_RT_PARAM_INVALID, "unknown or closed IPC key %.64s", key);
    }
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    if (im) {
        munmap(im->alias->raw, im->alias->maplen);
        if (im->foreign) {
            meta_drop_importer(im->meta, me);
            munmap(im->meta, meta_maplen());
        }
        free(im->alias);
        free(im);
    } else {
        munmap(k->meta, meta_maplen());
        close(k->meta_fd);
        free(k);
    }
    return ACL_SUCCESS;
}

IPC_EXPORT aclError aclrtDeviceGetBareTgid(int32_t *pid)
{
    ENTER(aclrtDeviceGetBareTgid);
    if (!pid) return fail(ACL_ERROR_INVALID_PARAM, "pid is NULL");
    *pid = (int32_t)getpid();
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Test hooks                                                                                   */

/* The (after+1)-th next call of `api` returns `code` (once). 0 on success, -1 on bad args. */
EXPORT int fake_acl_inject(const char *api, int after, int code)
{
    int i = api_lookup(api);
    return i == API_aclGetRecentErrMsg ? -1 : injection_arm(i, after, code);
}

/* Clear the counters and pending injections; settings made with the setters go back to the
 * environment's defaults. */
EXPORT void fake_acl_reset(void)
{
    counters_reset();
    atomic_store(&g_batch_override, -1);
    atomic_store(&g_delay_override, -1);
}

EXPORT void fake_acl_set_batch_supported(int supported)
{
    atomic_store(&g_batch_override, supported ? 1 : 0);
}

/* Live objects: "device" (allocations, imported ones included), "host" (page-locked), "stream"
 * (created streams, not the per-device default ones), "event", "ipc_key", "ipc_import",
 * "pending" (queued/in-flight copy references); -1 for an unknown name. */
EXPORT long fake_acl_live(const char *what)
{
    if (!what) return -1;
    long n = 0;
    pthread_mutex_lock(&g_mu);
    if (strcmp(what, "device") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->kind == A_DEVICE;
    } else if (strcmp(what, "ipc_key") == 0) {
        for (struct ipc_key *k = g_keys; k; k = k->next) n++;
    } else if (strcmp(what, "ipc_import") == 0) {
        for (struct ipc_import *im = g_imports; im; im = im->next) n++;
    } else {
        n = live_count_locked(what);
    }
    pthread_mutex_unlock(&g_mu);
    return n;
}
