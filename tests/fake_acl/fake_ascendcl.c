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
 * This file is the ACL skin over the core it shares with tests/fake_cuda: call counters and
 * fault injection, the allocation table, handle registries (../fake_runtime/fake_engine.h) and
 * the stream worker (../fake_runtime/fake_streams.h).
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

enum { K_H2H = 0, K_H2D = 1, K_D2H = 2, K_D2D = 3, K_DEFAULT = 4 };
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
#define FAKE_ALLOC_FIELDS                                                                     \
    int exported; /* live export keys */                                                      \
    int imported; /* an alias made by aclrtIpcMemImportByKey */                               \
    int peer;
#include "fake_engine.h"

static _Thread_local int t_has_msg;

__attribute__((format(printf, 2, 3))) static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_message(code, fmt, ap);
    va_end(ap);
    t_has_msg = 1;
    return code;
}

/* Count the call; return a nonzero injected error code when one fires. */
static int api_enter(int api)
{
    api_count(api);
    return injection_take(api);
}

#define ENTER(name)                                                                           \
    do {                                                                                      \
        int inj_ = api_enter(API_##name);                                                     \
        if (inj_) return fail(inj_, "injected failure");                                      \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Global state                                                                                 */

static pthread_mutex_t g_ev_mu = PTHREAD_MUTEX_INITIALIZER; /* event sequence numbers */
static pthread_cond_t g_ev_cv;
__attribute__((constructor)) static void global_init(void) { cond_init_mono(&g_ev_cv); }

static atomic_int g_initialized;
static atomic_uint g_epoch = 1; /* aclFinalize bumps it: every thread loses its device */
static _Thread_local int t_device = -1;
static _Thread_local unsigned t_epoch;

static atomic_int g_batch_override = -1;  /* -1: use env FAKE_ACL_NO_BATCH */
static atomic_long g_delay_override = -1; /* -1: use env FAKE_ACL_COPY_DELAY_US */

/* Lock order: g_mu -> stream.mu, g_mu -> g_ev_mu. Workers never hold two at once. */

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

/* ---- streams and operations ---- */

struct seg {
    char *dst;
    const char *src;
    size_t width, dpitch, spitch, rows;
    struct alloc *da, *sa;
};

enum { OP_COPY, OP_RECORD, OP_WAIT };

struct event;

struct op {
    int type;
    long delay_us;
    size_t nseg;
    struct seg *segs;
    struct event *ev;
    uint64_t seq;
    struct op *next;
};

struct stream {
    int device;
    int is_default;
    uint64_t id;
    int priority;
    uint64_t failure_mode;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* worker: work or stop */
    pthread_cond_t done_cv; /* synchronizers */
    struct op *head, *tail;
    uint64_t enq, done;
    int stop;
    int refs; /* registry + lookups in progress */
    int registered;
};

static struct reg g_streams;
static struct stream *g_default_stream[MAX_DEV];
static int g_nstreams_dev[MAX_DEV];
static uint64_t g_stream_ids;

struct event {
    int device;
    uint32_t flags;
    int counted; /* counts against the sync event limit */
    int refs;
    int registered;
    /* under g_ev_mu: */
    uint64_t rec_seq, done_seq;
    uint64_t rec_stream_id, done_stream_id;
    double t_done;
};

static struct reg g_events;
static int g_nsync_events_dev[MAX_DEV];

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
/* Stream worker                                                                                */

static void event_put_locked(struct event *e)
{
    if (--e->refs == 0) free(e);
}

static void stream_free(struct stream *s)
{
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->done_cv);
    free(s);
}

static void stream_unref_locked(struct stream *s, int n)
{
    s->refs -= n;
    if (s->refs == 0) stream_free(s);
}

static void stream_put_locked(struct stream *s) { stream_unref_locked(s, 1); }

static void op_release_locked(struct op *o)
{
    for (size_t i = 0; i < o->nseg; i++) {
        if (o->segs[i].da) o->segs[i].da->pending--;
        if (o->segs[i].sa) o->segs[i].sa->pending--;
    }
    if (o->ev) event_put_locked(o->ev);
}

static void op_run(struct stream *s, struct op *o)
{
    switch (o->type) {
    case OP_COPY:
        if (o->delay_us > 0) usleep((useconds_t)o->delay_us);
        for (size_t i = 0; i < o->nseg; i++) {
            const struct seg *g = &o->segs[i];
            for (size_t r = 0; r < g->rows; r++)
                memmove(g->dst + r * g->dpitch, g->src + r * g->spitch, g->width);
        }
        break;
    case OP_RECORD:
        pthread_mutex_lock(&g_ev_mu);
        if (o->seq > o->ev->done_seq) {
            o->ev->done_seq = o->seq;
            o->ev->done_stream_id = s->id;
            o->ev->t_done = now_s();
        }
        pthread_cond_broadcast(&g_ev_cv);
        pthread_mutex_unlock(&g_ev_mu);
        break;
    case OP_WAIT:
        pthread_mutex_lock(&g_ev_mu);
        while (o->ev->done_seq < o->seq) pthread_cond_wait(&g_ev_cv, &g_ev_mu);
        pthread_mutex_unlock(&g_ev_mu);
        break;
    }
}

#include "fake_streams.h"

/* caller holds g_mu */
static struct stream *stream_new_locked(int dev, int is_default, int *err)
{
    long maxs = env_long("FAKE_ACL_MAX_STREAMS", 1024);
    if (!is_default && g_nstreams_dev[dev] >= maxs) {
        *err = fail(ACL_ERROR_RT_NO_STREAM_RESOURCE, "too many streams on device %d (%d)", dev,
                    g_nstreams_dev[dev]);
        return NULL;
    }
    struct stream *s = calloc(1, sizeof *s);
    if (!s) {
        *err = fail(ACL_ERROR_RT_NO_STREAM_RESOURCE, "out of host memory");
        return NULL;
    }
    s->device = dev;
    s->is_default = is_default;
    s->id = ++g_stream_ids;
    pthread_mutex_init(&s->mu, NULL);
    cond_init_mono(&s->cv);
    cond_init_mono(&s->done_cv);
    if (pthread_create(&s->th, NULL, stream_main, s) != 0) {
        stream_free(s);
        *err = fail(ACL_ERROR_RT_NO_STREAM_RESOURCE, "cannot start the stream worker thread");
        return NULL;
    }
    if (reg_add(&g_streams, s) != 0) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
        stream_free(s);
        *err = fail(ACL_ERROR_RT_NO_STREAM_RESOURCE, "out of host memory");
        return NULL;
    }
    s->registered = 1;
    s->refs = 1;
    if (!is_default) g_nstreams_dev[dev]++;
    return s;
}

/* caller holds g_mu; NULL stream = the default stream of the current device. Takes a ref. */
static struct stream *stream_get_locked(aclrtStream h, int dev, int *err)
{
    struct stream *s;
    if (!h) {
        s = g_default_stream[dev];
        if (!s) {
            s = stream_new_locked(dev, 1, err);
            if (!s) return NULL;
            g_default_stream[dev] = s;
        }
    } else {
        if (!reg_has(&g_streams, h)) {
            *err = fail(ACL_ERROR_RT_PARAM_INVALID, "unknown or destroyed stream %p", h);
            return NULL;
        }
        s = h;
    }
    if (s->device != dev) {
        *err = fail(ACL_ERROR_RT_STREAM_CONTEXT,
                    "stream %p belongs to device %d but the thread's current device is %d", h,
                    s->device, dev);
        return NULL;
    }
    s->refs++;
    return s;
}

static void stream_put(struct stream *s)
{
    pthread_mutex_lock(&g_mu);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
}

/* caller holds g_mu; takes a ref */
static struct event *event_get_locked(aclrtEvent h, int *err)
{
    if (!h || !reg_has(&g_events, h)) {
        *err = fail(ACL_ERROR_RT_PARAM_INVALID, "unknown or destroyed event %p", h);
        return NULL;
    }
    struct event *e = h;
    e->refs++;
    return e;
}

static void event_put(struct event *e)
{
    pthread_mutex_lock(&g_mu);
    event_put_locked(e);
    pthread_mutex_unlock(&g_mu);
}

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
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_new_locked(dev, 0, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    *stream = s;
    return ACL_SUCCESS;
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

EXPORT aclError aclrtDestroyStream(aclrtStream stream)
{
    ENTER(aclrtDestroyStream);
    if (!stream) return fail(ACL_ERROR_INVALID_PARAM, "cannot destroy the default (NULL) stream");
    NEED_DEVICE(dev);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    pthread_mutex_lock(&s->mu);
    uint64_t queued = s->enq - s->done;
    if (queued) {
        pthread_mutex_unlock(&s->mu);
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "stream %p still has %llu queued operation(s): synchronize it first", stream,
                    (unsigned long long)queued);
    }
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    reg_del(&g_streams, s);
    s->registered = 0;
    g_nstreams_dev[s->device]--;
    pthread_mutex_unlock(&g_mu);

    pthread_join(s->th, NULL);

    pthread_mutex_lock(&g_mu);
    stream_unref_locked(s, 2); /* the lookup and the registry */
    pthread_mutex_unlock(&g_mu);
    return ACL_SUCCESS;
}

/* ms < 0: forever. Returns 0 or ACL_ERROR_RT_STREAM_SYNC_TIMEOUT. */
static int stream_wait(struct stream *s, long ms)
{
    struct timespec dl;
    if (ms >= 0) deadline_after_ms(&dl, ms);
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    uint64_t target = s->enq;
    while (s->done < target) {
        if (ms < 0) {
            pthread_cond_wait(&s->done_cv, &s->mu);
        } else if (pthread_cond_timedwait(&s->done_cv, &s->mu, &dl) == ETIMEDOUT) {
            if (s->done < target) rc = ACL_ERROR_RT_STREAM_SYNC_TIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static aclError sync_stream(int inj, aclrtStream stream, long ms)
{
    NEED_DEVICE(dev);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    int rc = stream_wait(s, ms);
    stream_put(s);
    if (rc) return fail(rc, "stream %p not done within %ld ms", stream, ms);
    if (inj) return fail(inj, "injected failure (after the stream drained)");
    return ACL_SUCCESS;
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
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    struct event *e = event_get_locked(event, &err);
    if (!e) {
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    if (!(e->flags & ACL_EVENT_SYNC)) {
        event_put_locked(e);
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "event %p was created without ACL_EVENT_SYNC and cannot be waited on", event);
    }
    pthread_mutex_lock(&g_ev_mu);
    uint64_t target = e->rec_seq;
    int done = e->done_seq >= target;
    pthread_mutex_unlock(&g_ev_mu);
    struct op *o = NULL;
    if (!done) {
        o = calloc(1, sizeof *o);
        if (!o) {
            event_put_locked(e);
            stream_put_locked(s);
            pthread_mutex_unlock(&g_mu);
            return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
        }
        o->type = OP_WAIT;
        o->ev = e; /* keeps the lookup ref */
        o->seq = target;
        stream_push_locked(s, o);
    } else {
        event_put_locked(e);
    }
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

static aclError create_event(aclrtEvent *event, uint32_t flags, int counted)
{
    if (!event) return fail(ACL_ERROR_INVALID_PARAM, "event is NULL");
    if (flags & ~0xFu) return fail(ACL_ERROR_INVALID_PARAM, "unknown event flag bits 0x%x", flags);
    NEED_DEVICE(dev);
    if (!(flags & ACL_EVENT_SYNC)) counted = 0;
    pthread_mutex_lock(&g_mu);
    long maxe = env_long("FAKE_ACL_MAX_SYNC_EVENTS", 65535);
    if (counted && g_nsync_events_dev[dev] >= maxe) {
        int n = g_nsync_events_dev[dev];
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_NO_EVENT_RESOURCE,
                    "sync event limit reached on device %d (%d): pool and reuse events", dev, n);
    }
    struct event *e = calloc(1, sizeof *e);
    if (!e || reg_add(&g_events, e) != 0) {
        free(e);
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_NO_EVENT_RESOURCE, "out of host memory");
    }
    e->device = dev;
    e->flags = flags;
    e->counted = counted;
    e->refs = 1;
    e->registered = 1;
    if (counted) g_nsync_events_dev[dev]++;
    pthread_mutex_unlock(&g_mu);
    *event = e;
    return ACL_SUCCESS;
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
    pthread_mutex_lock(&g_mu);
    if (!event || !reg_has(&g_events, event)) {
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_PARAM_INVALID, "unknown or destroyed event %p", event);
    }
    struct event *e = event;
    reg_del(&g_events, e);
    e->registered = 0;
    if (e->counted) g_nsync_events_dev[e->device]--;
    event_put_locked(e); /* queued records/waits keep it alive */
    pthread_mutex_unlock(&g_mu);
    return ACL_SUCCESS;
}

EXPORT aclError aclrtRecordEvent(aclrtEvent event, aclrtStream stream)
{
    ENTER(aclrtRecordEvent);
    NEED_DEVICE(dev);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(event, &err);
    if (!e) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (!s) {
        event_put_locked(e);
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    if (e->device != s->device) {
        int ed = e->device;
        event_put_locked(e);
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_STREAM_CONTEXT, "event of device %d recorded on a stream of device %d",
                    ed, dev);
    }
    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        event_put_locked(e);
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    }
    pthread_mutex_lock(&g_ev_mu);
    o->seq = ++e->rec_seq;
    e->rec_stream_id = s->id;
    pthread_mutex_unlock(&g_ev_mu);
    o->type = OP_RECORD;
    o->ev = e; /* keeps the lookup ref */
    stream_push_locked(s, o);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return ACL_SUCCESS;
}

EXPORT aclError aclrtQueryEventStatus(aclrtEvent event, int *status)
{
    ENTER(aclrtQueryEventStatus);
    if (!status) return fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    NEED_DEVICE(dev);
    (void)dev;
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(event, &err);
    pthread_mutex_unlock(&g_mu);
    if (!e) return err;
    pthread_mutex_lock(&g_ev_mu);
    *status = e->done_seq >= e->rec_seq ? 1 : 0; /* COMPLETE=1, NOT_READY=0 */
    pthread_mutex_unlock(&g_ev_mu);
    event_put(e);
    return ACL_SUCCESS;
}

static aclError sync_event(int inj, aclrtEvent event, long ms)
{
    NEED_DEVICE(dev);
    (void)dev;
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(event, &err);
    pthread_mutex_unlock(&g_mu);
    if (!e) return err;
    struct timespec dl;
    if (ms >= 0) deadline_after_ms(&dl, ms);
    int rc = 0;
    pthread_mutex_lock(&g_ev_mu);
    uint64_t target = e->rec_seq;
    while (e->done_seq < target) {
        if (ms < 0) {
            pthread_cond_wait(&g_ev_cv, &g_ev_mu);
        } else if (pthread_cond_timedwait(&g_ev_cv, &g_ev_mu, &dl) == ETIMEDOUT) {
            if (e->done_seq < target) rc = ACL_ERROR_RT_EVENT_SYNC_TIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&g_ev_mu);
    event_put(e);
    if (rc) return fail(rc, "event %p not complete within %ld ms", event, ms);
    if (inj) return fail(inj, "injected failure (after the event completed)");
    return ACL_SUCCESS;
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
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *a = event_get_locked(startEvent, &err);
    struct event *b = a ? event_get_locked(endEvent, &err) : NULL;
    if (a && !b) event_put_locked(a);
    pthread_mutex_unlock(&g_mu);
    if (!b) return err;
    aclError rc = ACL_SUCCESS;
    if (!(a->flags & ACL_EVENT_TIME_LINE) || !(b->flags & ACL_EVENT_TIME_LINE)) {
        rc = fail(ACL_ERROR_RT_PARAM_INVALID, "both events need ACL_EVENT_TIME_LINE");
    } else {
        pthread_mutex_lock(&g_ev_mu);
        if (a->rec_seq == 0 || b->rec_seq == 0)
            rc = fail(ACL_ERROR_RT_PARAM_INVALID, "event never recorded");
        else if (a->done_seq < a->rec_seq || b->done_seq < b->rec_seq)
            rc = fail(ACL_ERROR_RT_PARAM_INVALID, "event not complete yet");
        else if (a->done_stream_id != b->done_stream_id)
            rc = fail(ACL_ERROR_RT_PARAM_INVALID, "events were recorded on different streams");
        else
            *ms = (float)((b->t_done - a->t_done) * 1000.0);
        pthread_mutex_unlock(&g_ev_mu);
    }
    pthread_mutex_lock(&g_mu);
    event_put_locked(a);
    event_put_locked(b);
    pthread_mutex_unlock(&g_mu);
    return rc;
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

/* caller holds g_mu; returns 0 or an error (message set) */
static int check_freeable_locked(struct alloc *a, const void *p, int kind, const char *what)
{
    if (!a || a->base != (uintptr_t)p)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "%p is not the start of a live %s allocation", p,
                    what);
    if (a->kind != kind)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "%p is %s memory, not %s memory", p,
                    a->kind == A_DEVICE ? "device" : "page-locked host", what);
    if (a->imported)
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "%p was imported by aclrtIpcMemImportByKey: close it with aclrtIpcMemClose", p);
    if (a->pending)
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "%p is still used by %ld queued async operation(s): synchronize first", p,
                    a->pending);
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
    pthread_mutex_lock(&g_mu);
    struct alloc *a = tab_find(devPtr);
    int rc = check_freeable_locked(a, devPtr, A_DEVICE, "device");
    if (!rc) {
        tab_remove(a);
        g_dev_used[a->device] -= a->size;
    }
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    munmap(a->raw, a->maplen);
    if (a->fd >= 0) close(a->fd);
    free(a);
    return ACL_SUCCESS;
}

EXPORT aclError aclrtMallocHost(void **hostPtr, size_t size)
{
    ENTER(aclrtMallocHost);
    if (!hostPtr) return fail(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL");
    if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "size 0");
    NEED_DEVICE(dev);
    (void)dev;
    void *p = NULL;
    if (posix_memalign(&p, page_size(), size) != 0)
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "cannot allocate %zu bytes", size);
    struct alloc *a = calloc(1, sizeof *a);
    if (a) {
        a->base = (uintptr_t)p;
        a->size = a->maplen = size;
        a->kind = A_HOST_PINNED;
        a->device = -1;
        a->fd = -1;
        a->raw = p;
        poison(p, size);
    }
    pthread_mutex_lock(&g_mu);
    if (!a || tab_insert(a) != 0) {
        pthread_mutex_unlock(&g_mu);
        free(a);
        free(p);
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    }
    pthread_mutex_unlock(&g_mu);
    *hostPtr = p;
    return ACL_SUCCESS;
}

EXPORT aclError aclrtFreeHost(void *hostPtr)
{
    ENTER(aclrtFreeHost);
    if (!hostPtr) return fail(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL");
    NEED_DEVICE(dev);
    (void)dev;
    pthread_mutex_lock(&g_mu);
    struct alloc *a = tab_find(hostPtr);
    int rc = check_freeable_locked(a, hostPtr, A_HOST_PINNED, "page-locked host");
    if (!rc) tab_remove(a);
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    free(a->raw);
    free(a);
    return ACL_SUCCESS;
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

/* Resolve the kind into (dst is device, src is device). Caller holds g_mu. */
static int resolve_kind_locked(int kind, const void *dst, const void *src, int async, int *dd,
                               int *sd)
{
    if (kind < 0 || kind > K_DEFAULT) return fail(ACL_ERROR_INVALID_PARAM, "bad copy kind %d", kind);
    if (kind == K_DEFAULT) {
        struct alloc *a = tab_find(dst), *b = tab_find(src);
        *dd = a && a->kind == A_DEVICE;
        *sd = b && b->kind == A_DEVICE;
    } else {
        *dd = kind == K_H2D || kind == K_D2D;
        *sd = kind == K_D2H || kind == K_D2D;
    }
    if (async && !*dd && !*sd)
        return fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "host-to-host async copy (kind %s) is not supported",
                    g_kind_names[kind]);
    return 0;
}

static long copy_delay_us(void)
{
    long d = atomic_load(&g_delay_override);
    return d >= 0 ? d : env_long("FAKE_ACL_COPY_DELAY_US", 0);
}

/* Validate one (2D) copy and fill seg. Caller holds g_mu. Does not touch pending counts. */
static int check_copy_locked(struct seg *g, void *dst, size_t dpitch, const void *src,
                             size_t spitch, size_t width, size_t rows, int kind, int async, int dev)
{
    int dd, sd, rc;
    if ((rc = resolve_kind_locked(kind, dst, src, async, &dd, &sd))) return rc;
    size_t dext = (rows - 1) * dpitch + width, sext = (rows - 1) * spitch + width;
    if ((rc = check_end_locked("dst", dst, dext, dd, async, dev, &g->da))) return rc;
    if ((rc = check_end_locked("src", src, sext, sd, async, dev, &g->sa))) return rc;
    g->dst = dst;
    g->src = src;
    g->width = width;
    g->dpitch = dpitch;
    g->spitch = spitch;
    g->rows = rows;
    return 0;
}

static void seg_pin_locked(struct seg *g, long delta)
{
    if (g->da) g->da->pending += delta;
    if (g->sa) g->sa->pending += delta;
}

/* Queue a copy op of n segments (ownership of segs passes). Caller holds g_mu. */
static int enqueue_copy_locked(struct stream *s, struct seg *segs, size_t n)
{
    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        free(segs);
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    }
    for (size_t i = 0; i < n; i++) seg_pin_locked(&segs[i], 1);
    o->type = OP_COPY;
    o->delay_us = copy_delay_us();
    o->segs = segs;
    o->nseg = n;
    stream_push_locked(s, o);
    return 0;
}

EXPORT aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, int kind)
{
    ENTER(aclrtMemcpy);
    NEED_DEVICE(dev);
    if (count > destMax)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "count %zu > destMax %zu", count, destMax);
    if (count && (!dst || !src)) return fail(ACL_ERROR_INVALID_PARAM, "NULL dst or src");
    if (count == 0) return ACL_SUCCESS;
    struct seg g;
    pthread_mutex_lock(&g_mu);
    int rc = check_copy_locked(&g, dst, count, src, count, count, 1, kind, 0, dev);
    if (!rc) seg_pin_locked(&g, 1);
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    memmove(dst, src, count);
    pthread_mutex_lock(&g_mu);
    seg_pin_locked(&g, -1);
    pthread_mutex_unlock(&g_mu);
    return ACL_SUCCESS;
}

EXPORT aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count,
                                 int kind, aclrtStream stream)
{
    ENTER(aclrtMemcpyAsync);
    NEED_DEVICE(dev);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    struct seg *g = NULL;
    if (count > destMax)
        err = fail(ACL_ERROR_RT_PARAM_INVALID, "count %zu > destMax %zu", count, destMax);
    else if (count && (!dst || !src))
        err = fail(ACL_ERROR_INVALID_PARAM, "NULL dst or src");
    else if (count && !(g = malloc(sizeof *g)))
        err = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    else if (count && (err = check_copy_locked(g, dst, count, src, count, count, 1, kind, 1, dev)))
        free(g);
    else if (count)
        err = enqueue_copy_locked(s, g, 1);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT aclError aclrtMemcpy2dAsync(void *dst, size_t dpitch, const void *src, size_t spitch,
                                   size_t width, size_t height, int kind, aclrtStream stream)
{
    ENTER(aclrtMemcpy2dAsync);
    NEED_DEVICE(dev);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    struct seg *g = NULL;
    int empty = width == 0 || height == 0;
    if (width > dpitch || width > spitch)
        err = fail(ACL_ERROR_INVALID_PARAM, "width %zu > pitch (dpitch %zu, spitch %zu)", width,
                   dpitch, spitch);
    else if (!empty && (!dst || !src))
        err = fail(ACL_ERROR_INVALID_PARAM, "NULL dst or src");
    else if (!empty && ((height - 1) > (SIZE_MAX - width) / dpitch ||
                        (height - 1) > (SIZE_MAX - width) / spitch))
        err = fail(ACL_ERROR_INVALID_PARAM, "2D extent overflows");
    else if (!empty && kind == K_H2H)
        err = fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "host-to-host 2D copy is not supported");
    else if (!empty && !(g = malloc(sizeof *g)))
        err = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    else if (!empty &&
             (err = check_copy_locked(g, dst, dpitch, src, spitch, width, height, kind, 1, dev)))
        free(g);
    else if (!empty)
        err = enqueue_copy_locked(s, g, 1);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

static int batch_supported(void)
{
    int o = atomic_load(&g_batch_override);
    if (o >= 0) return o;
    return env_long("FAKE_ACL_NO_BATCH", 0) != 1;
}

/* The location an attribute claims vs what the pointer is. Caller holds g_mu. */
static int check_loc_locked(const char *role, size_t i, const aclrtMemLocation *loc,
                            const struct alloc *a, int dev)
{
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
    if (numBatches == 0) return fail(ACL_ERROR_INVALID_PARAM, "numBatches is 0");
    if (numAttrs == 0 || numAttrs > numBatches)
        return fail(ACL_ERROR_INVALID_PARAM, "numAttrs %zu not in [1, numBatches=%zu]", numAttrs,
                    numBatches);
    if (attrsIndexes[0] != 0) return fail(ACL_ERROR_INVALID_PARAM, "attrsIndexes[0] must be 0");
    for (size_t j = 1; j < numAttrs; j++)
        if (attrsIndexes[j] <= attrsIndexes[j - 1] || attrsIndexes[j] >= numBatches)
            return fail(ACL_ERROR_INVALID_PARAM,
                        "attrsIndexes must increase strictly and stay below numBatches (index %zu)",
                        j);
    struct seg *segs = calloc(numBatches, sizeof *segs);
    if (!segs) return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "out of host memory");
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, dev, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        free(segs);
        return err;
    }
    size_t nseg = 0, ai = 0;
    for (size_t i = 0; i < numBatches && !err; i++) {
        while (ai + 1 < numAttrs && attrsIndexes[ai + 1] <= i) ai++;
        const aclrtMemcpyBatchAttr *at = &attrs[ai];
        size_t n = sizes[i];
        if (n > destMaxs[i]) {
            err = fail(ACL_ERROR_RT_PARAM_INVALID, "entry %zu: size %zu > destMax %zu", i, n,
                       destMaxs[i]);
        } else if (n && (!dsts[i] || !srcs[i])) {
            err = fail(ACL_ERROR_INVALID_PARAM, "entry %zu: NULL dst or src", i);
        } else if (n) {
            struct seg *g = &segs[nseg];
            err = check_copy_locked(g, dsts[i], n, srcs[i], n, n, 1, K_DEFAULT, 1, dev);
            if (!err) err = check_loc_locked("dst", i, &at->dstLoc, g->da, dev);
            if (!err) err = check_loc_locked("src", i, &at->srcLoc, g->sa, dev);
            if (!err) nseg++;
        }
        if (err) *failIndex = i;
    }
    if (!err && nseg)
        err = enqueue_copy_locked(s, segs, nseg);
    else
        free(segs);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
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
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/fd/%d", pid, metafd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail(ACL_ERROR_RT_PARAM_INVALID,
                    "unknown or closed IPC key %.64s: cannot open the exporter's key state %s (%s)",
                    key, path, strerror(errno));
    size_t ml = meta_maplen();
    struct stat st;
    struct ipc_meta *m = MAP_FAILED;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (size_t)st.st_size >= ml)
        m = mmap(NULL, ml, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
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
        snprintf(path, sizeof path, "/proc/%ld/fd/%d", pid, memfd);
        len = round_page((size_t)m->size);
        int e = 0, mf = open(path, O_RDWR | O_CLOEXEC);
        if (mf >= 0) {
            p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mf, (off_t)m->offset);
            e = errno;
            close(mf);
        } else {
            e = errno;
        }
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
        al = calloc(1, sizeof *al);
        im = calloc(1, sizeof *im);
        if (al && im) {
            al->base = (uintptr_t)p;
            al->size = size;
            al->maplen = maplen;
            al->kind = A_DEVICE;
            al->device = device;
            al->imported = 1;
            al->peer = (int)(flags & 1);
            al->fd = -1;
            al->raw = p;
        }
        if (!al || !im || tab_insert(al) != 0) {
            munmap(p, maplen);
            if (foreign) {
                meta_drop_importer(m, me);
                munmap(m, meta_maplen());
            }
            free(al);
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

/* Calls of `api` since the last fake_acl_reset(); -1 for an unknown name. */
EXPORT long fake_acl_calls(const char *api) { return calls_of(api); }

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

/* Sleep per queued copy operation; a negative value goes back to FAKE_ACL_COPY_DELAY_US. */
EXPORT void fake_acl_set_copy_delay_us(long us) { atomic_store(&g_delay_override, us < 0 ? -1 : us); }

/* Live objects: "device" (allocations, imported ones included), "host" (page-locked), "stream"
 * (created streams, not the per-device default ones), "event", "ipc_key", "ipc_import",
 * "pending" (queued/in-flight copy references); -1 for an unknown name. */
EXPORT long fake_acl_live(const char *what)
{
    if (!what) return -1;
    long n = 0;
    pthread_mutex_lock(&g_mu);
    if (strcmp(what, "device") == 0 || strcmp(what, "host") == 0) {
        int kind = what[0] == 'd' ? A_DEVICE : A_HOST_PINNED;
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->kind == kind;
    } else if (strcmp(what, "stream") == 0) {
        for (size_t i = 0; i < g_streams.n; i++) n += !((struct stream *)g_streams.v[i])->is_default;
    } else if (strcmp(what, "event") == 0) {
        n = (long)g_events.n;
    } else if (strcmp(what, "ipc_key") == 0) {
        for (struct ipc_key *k = g_keys; k; k = k->next) n++;
    } else if (strcmp(what, "ipc_import") == 0) {
        for (struct ipc_import *im = g_imports; im; im = im->next) n++;
    } else if (strcmp(what, "pending") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->pending;
    } else {
        n = -1;
    }
    pthread_mutex_unlock(&g_mu);
    return n;
}
