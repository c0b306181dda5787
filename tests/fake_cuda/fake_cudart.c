/*
 * A fake libcudart.so for tests on machines without an NVIDIA GPU.
 *
 * "Device" memory is host memory (one memfd per cudaMalloc, mapped MAP_SHARED, so that another
 * process can map the same pages through a CUDA IPC handle), streams are worker threads with a
 * FIFO, events are sequence numbers. Kernels are not compiled: cudaLibraryLoadData reads the PTX
 * text (ISA version, target, entry points and their parameters) and refuses what a driver would
 * refuse; launching llmdist's copy kernel (include/llmdist/copy_kernel.h) runs its semantics on
 * the stream's thread, reading the run table and the pairs from "device" memory, and an access
 * outside device memory is an illegal address (700), sticky for the process as on a GPU.
 *
 * Every call checks its arguments the way the real runtime does, and stricter where the real
 * runtime would silently misbehave (a copy kind that contradicts the pointers, closing an IPC
 * mapping that queued work still uses), so bugs in the code under test surface as error codes
 * with a message (fake_cuda_last_message). Declarations are written from the facts in
 * shared/spec/RUNTIMES.md (CUDA sections); no vendor header is used.
 *
 * This file is the CUDA skin over the core it shares with tests/fake_acl: call counters and
 * fault injection, the allocation table, handle registries (../fake_runtime/fake_engine.h) and
 * the stream worker (../fake_runtime/fake_streams.h).
 *
 * Environment:
 *   FAKE_CUDA_DEVICE_COUNT   devices (default 1, at most 64; 0: cudaGetDeviceCount says 100)
 *   FAKE_CUDA_NO_DRIVER=1    cudaGetDeviceCount says 35 (insufficient driver), as without a GPU
 *   FAKE_CUDA_VERSION        what cudaRuntimeGetVersion reports (default 12090); from 13000 on,
 *                            cudaMemcpyBatchAsync takes the 13.0 parameters (no failIdx)
 *   FAKE_CUDA_NO_BATCH=1     cudaMemcpyBatchAsync answers 801 (not supported)
 *   FAKE_CUDA_MAX_PTX_ISA    newest PTX ISA the "driver" JIT-compiles (default 8.8): newer is 222
 *   FAKE_CUDA_SM             the devices' compute capability as 10*major+minor (default 90)
 *   FAKE_CUDA_COPY_DELAY_US  microseconds each queued copy or kernel sleeps before running
 *   FAKE_CUDA_HBM_BYTES      device memory per device (default 32 GiB)
 *   FAKE_CUDA_POISON         0: never fill new allocations; 1: always fill with 0xA5; unset: up
 *                            to 64 MiB
 *
 * Threads that never call cudaSetDevice work on device 0, as with the real runtime.
 * Pageable host memory in an async copy is copied synchronously (the real runtime stages it):
 * the call returns after the stream drained and the bytes moved.
 *
 * Test hooks (extra exported symbols):
 *   int  fake_cuda_inject(const char *api, int after, int code);  (after+1)-th next call fails
 *   long fake_cuda_calls(const char *api);                         calls since the last reset
 *   long fake_cuda_kernel_bytes(void);                             bytes kernels copied
 *   void fake_cuda_reset(void);
 *   void fake_cuda_set_copy_delay_us(long us);
 *   long fake_cuda_live(const char *what);    "device", "host", "stream", "event", "ipc_import",
 *                                             "library", "pending"
 *   const char *fake_cuda_last_message(void); the calling thread's last error message
 *   cudaError_t fake_cuda_malloc_vmm(void **p, size_t n);         device memory IPC cannot export
 *
 * The driver's cuMemGetAddressRange_v2 is here too: build.sh makes libcuda.so.1 a link to this
 * library (set LLMDIST_CUDA_DRIVER_LIBRARY to it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
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

#include "llmdist/copy_kernel.h"

/* ------------------------------------------------------------------------------------------ */
/* Types, constants and error codes (from RUNTIMES.md)                                          */

typedef int cudaError_t;
typedef void *cudaStream_t;
typedef void *cudaEvent_t;
typedef void *cudaLibrary_t;
typedef void *cudaKernel_t;
typedef struct { unsigned int x, y, z; } dim3;
typedef struct { char reserved[64]; } cudaIpcMemHandle_t;
typedef struct { int type; int id; } cudaMemLocation;
typedef struct {
    int srcAccessOrder;
    cudaMemLocation srcLocHint, dstLocHint;
    unsigned int flags;
} cudaMemcpyAttributes;

enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInsufficientDriver = 35,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidKernelImage = 200,
    cudaErrorDeviceUninitialized = 201,
    cudaErrorMapBufferObjectFailed = 205,
    cudaErrorNoKernelImageForDevice = 209,
    cudaErrorInvalidPtx = 218,
    cudaErrorUnsupportedPtxVersion = 222,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorSymbolNotFound = 500,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
};

enum { K_H2H = 0, K_H2D = 1, K_D2H = 2, K_D2D = 3, K_DEFAULT = 4 };
enum { LOC_DEVICE = 1, LOC_HOST = 2 };
enum { ORDER_STREAM = 1, ORDER_DURING_API_CALL = 2, ORDER_ANY = 3 };
#define STREAM_NON_BLOCKING 1u
#define EVENT_BLOCKING_SYNC 1u
#define EVENT_DISABLE_TIMING 2u
#define EVENT_INTERPROCESS 4u
#define IPC_LAZY_ENABLE_PEER_ACCESS 1u
#define MAX_DEV 64

static const struct { int code; const char *name, *text; } g_errors[] = {
    {0, "cudaSuccess", "no error"},
    {1, "cudaErrorInvalidValue", "invalid argument"},
    {2, "cudaErrorMemoryAllocation", "out of memory"},
    {9, "cudaErrorInvalidConfiguration", "invalid configuration argument"},
    {21, "cudaErrorInvalidMemcpyDirection", "invalid copy direction for memcpy"},
    {35, "cudaErrorInsufficientDriver", "CUDA driver version is insufficient for CUDA runtime version"},
    {98, "cudaErrorInvalidDeviceFunction", "invalid device function"},
    {100, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {101, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {200, "cudaErrorInvalidKernelImage", "device kernel image is invalid"},
    {201, "cudaErrorDeviceUninitialized", "invalid device context"},
    {205, "cudaErrorMapBufferObjectFailed", "mapping of buffer object failed"},
    {209, "cudaErrorNoKernelImageForDevice", "no kernel image is available for execution on the device"},
    {218, "cudaErrorInvalidPtx", "a PTX JIT compilation failed"},
    {221, "cudaErrorJitCompilerNotFound", "PTX JIT compiler library not found"},
    {222, "cudaErrorUnsupportedPtxVersion", "the provided PTX was compiled with an unsupported toolchain."},
    {400, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {500, "cudaErrorSymbolNotFound", "named symbol not found"},
    {600, "cudaErrorNotReady", "device not ready"},
    {700, "cudaErrorIllegalAddress", "an illegal memory access was encountered"},
    {701, "cudaErrorLaunchOutOfResources", "too many resources requested for launch"},
    {719, "cudaErrorLaunchFailure", "unspecified launch failure"},
    {801, "cudaErrorNotSupported", "operation not supported"},
};

/* ------------------------------------------------------------------------------------------ */
/* API table, call counters, fault injection                                                    */

#define API_LIST(X)                                                                           \
    X(cudaRuntimeGetVersion) X(cudaDriverGetVersion) X(cudaGetDeviceCount) X(cudaSetDevice)   \
    X(cudaGetDevice) X(cudaDeviceSynchronize) X(cudaGetLastError) X(cudaPeekAtLastError)      \
    X(cudaStreamCreate) X(cudaStreamCreateWithFlags) X(cudaStreamDestroy)                     \
    X(cudaStreamSynchronize) X(cudaStreamQuery) X(cudaStreamWaitEvent) X(cudaEventCreate)     \
    X(cudaEventCreateWithFlags) X(cudaEventDestroy) X(cudaEventRecord) X(cudaEventQuery)      \
    X(cudaEventSynchronize) X(cudaEventElapsedTime) X(cudaMalloc) X(cudaFree)                 \
    X(cudaMallocHost) X(cudaFreeHost) X(cudaMemGetInfo) X(cudaMemcpy) X(cudaMemcpyAsync)      \
    X(cudaMemcpyBatchAsync) X(cudaIpcGetMemHandle) X(cudaIpcOpenMemHandle)                    \
    X(cudaIpcCloseMemHandle) X(cudaLibraryLoadData) X(cudaLibraryGetKernel)                   \
    X(cudaLibraryUnload) X(cudaLaunchKernel)

#define FAKE_TAG "fake-cuda"
#define FAKE_ENV(name) "FAKE_CUDA_" name
#define FAKE_ALLOC_FIELDS                                                                     \
    int imported; /* a mapping made by cudaIpcOpenMemHandle */                                \
    int import_refs;                                                                          \
    uint64_t import_id; /* (exporter pid << 32) | serial, for a second open of one handle */
#include "fake_engine.h"

static atomic_long g_kernel_bytes;
static atomic_int g_sticky; /* a kernel fault: every later call returns it, as on a GPU */
static _Thread_local int t_last; /* cudaGetLastError */

__attribute__((format(printf, 2, 3))) static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_message(code, fmt, ap);
    va_end(ap);
    t_last = code;
    return code;
}

/* Count the call; return a nonzero code when an injected failure fires or the process has a
 * sticky kernel fault. */
static int api_enter(int api)
{
    api_count(api);
    int sticky = atomic_load(&g_sticky);
    if (sticky) return fail(sticky, "an earlier kernel faulted; the context is unusable");
    int code = injection_take(api);
    return code ? fail(code, "injected failure") : 0;
}

#define ENTER(name)                                                                           \
    do {                                                                                      \
        int inj_ = api_enter(API_##name);                                                     \
        if (inj_) return inj_;                                                                \
    } while (0)

static int runtime_version(void) { return (int)env_long("FAKE_CUDA_VERSION", 12090); }

/* ------------------------------------------------------------------------------------------ */
/* Global state                                                                                 */

static pthread_cond_t g_pending_cv;                          /* an allocation's pending count fell */
static pthread_mutex_t g_ev_mu = PTHREAD_MUTEX_INITIALIZER; /* event sequence numbers */
static pthread_cond_t g_ev_cv;
__attribute__((constructor)) static void global_init(void)
{
    cond_init_mono(&g_ev_cv);
    cond_init_mono(&g_pending_cv);
}

static _Thread_local int t_device; /* device 0 until cudaSetDevice, as the real runtime */
static atomic_long g_delay_override = -1;

static uint64_t g_alloc_serial;

/* [p, p + n) inside a's requested size */
static int inside(const struct alloc *a, uintptr_t p, size_t n)
{
    return a && p >= a->base && p - a->base <= a->size && n <= a->size - (p - a->base);
}

/* ---- streams and operations ---- */

struct seg {
    char *dst;
    const char *src;
    size_t n;
    struct alloc *da, *sa;
};

/* A launch of the copy kernel: the argument values, captured at launch as the GPU does. */
struct launch {
    uintptr_t pieces, pairs;
    unsigned npieces, npairs;
    dim3 grid;
    int device;
    struct alloc *pa, *qa; /* the tables' allocations, pinned while queued */
};

enum { OP_COPY, OP_RECORD, OP_WAIT, OP_KERNEL };

struct event;

struct op {
    int type;
    long delay_us;
    size_t nseg;
    struct seg *segs;
    struct launch kernel;
    struct event *ev;
    uint64_t seq;
    struct op *next;
};

struct stream {
    int device;
    int is_default;
    uint64_t id;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* worker: work or stop */
    pthread_cond_t done_cv; /* synchronizers */
    struct op *head, *tail;
    uint64_t enq, done;
    int stop;
    int refs;
};

static struct reg g_streams;
static struct stream *g_default_stream[MAX_DEV];
static uint64_t g_stream_ids;

struct event {
    int device;
    unsigned flags;
    int refs;
    /* under g_ev_mu: */
    uint64_t rec_seq, done_seq;
    uint64_t done_stream_id;
    double t_done;
};

static struct reg g_events;

struct library {
    char **entries;   /* entry points of the PTX */
    int *copy_kernel; /* per entry: 1 when it has the copy kernel's parameter list */
    int nentries;
    int maxntid;      /* of the copy kernel (0: none given) */
    int refs;         /* the registry + kernels + queued launches */
};
static struct reg g_libs;

struct kernel {
    struct library *lib;
    int entry;
};
static struct reg g_kernels;

static void stream_free(struct stream *s)
{
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->done_cv);
    free(s);
}

static void stream_put_locked(struct stream *s)
{
    if (--s->refs == 0) stream_free(s);
}

static void event_put_locked(struct event *e)
{
    if (--e->refs == 0) free(e);
}

static void pin_locked(struct alloc *a, long delta)
{
    if (!a) return;
    a->pending += delta;
    if (a->pending == 0) pthread_cond_broadcast(&g_pending_cv);
}

static void op_release_locked(struct op *o)
{
    for (size_t i = 0; i < o->nseg; i++) {
        pin_locked(o->segs[i].da, -1);
        pin_locked(o->segs[i].sa, -1);
    }
    if (o->type == OP_KERNEL) {
        pin_locked(o->kernel.pa, -1);
        pin_locked(o->kernel.qa, -1);
    }
    if (o->ev) event_put_locked(o->ev);
}

/* A device address range a kernel on device dev may touch: device memory of dev, or memory
 * imported by IPC (mapped with peer access). Caller holds g_mu. */
static struct alloc *kernel_range_locked(uintptr_t p, size_t n, int dev)
{
    struct alloc *a = tab_find((const void *)p);
    if (!a || a->kind != A_DEVICE || !inside(a, p, n)) return NULL;
    if (a->device != dev && !a->imported) return NULL;
    return a;
}

/* Run the copy kernel's semantics: thread block (x, y) copies piece x for pairs y, y + grid.y,
 * ...; blocks past npieces do nothing. Any access outside device memory faults (700, sticky). */
static void run_copy_kernel(const struct launch *k)
{
    unsigned nx = k->grid.x < k->npieces ? k->grid.x : k->npieces;
    pthread_mutex_lock(&g_mu);
    struct alloc *pa = kernel_range_locked(k->pieces, (size_t)nx * sizeof(llmd_copy_piece), k->device);
    struct alloc *qa = kernel_range_locked(k->pairs, (size_t)k->npairs * sizeof(llmd_copy_pair), k->device);
    int bad = (nx && !pa) || (k->npairs && !qa);
    const llmd_copy_piece *pieces = (const llmd_copy_piece *)k->pieces;
    const llmd_copy_pair *pairs = (const llmd_copy_pair *)k->pairs;
    /* check every access first, pinning what is touched, then copy without the lock */
    size_t ntouch = 0, cap = 0;
    struct alloc **touched = NULL;
    for (unsigned x = 0; x < nx && !bad; x++)
        for (unsigned gy = 0; gy < k->grid.y && !bad; gy++)
            for (unsigned q = gy; q < k->npairs && !bad; q += k->grid.y) {
                llmd_copy_piece pc = pieces[x];
                llmd_copy_pair pr = pairs[q];
                if (pc.nbytes == 0) continue;
                struct alloc *s = kernel_range_locked(pr.src + pc.src_off, pc.nbytes, k->device);
                struct alloc *d = kernel_range_locked(pr.dst + pc.dst_off, pc.nbytes, k->device);
                if (!s || !d) {
                    bad = 1;
                    break;
                }
                if (ntouch + 2 > cap) {
                    cap = cap ? cap * 2 : 64;
                    touched = realloc(touched, cap * sizeof *touched);
                    if (!touched) abort();
                }
                touched[ntouch++] = s;
                touched[ntouch++] = d;
                pin_locked(s, 1);
                pin_locked(d, 1);
            }
    pthread_mutex_unlock(&g_mu);
    long moved = 0;
    if (!bad) {
        for (unsigned x = 0; x < nx; x++)
            for (unsigned gy = 0; gy < k->grid.y; gy++)
                for (unsigned q = gy; q < k->npairs; q += k->grid.y) {
                    llmd_copy_piece pc = pieces[x];
                    llmd_copy_pair pr = pairs[q];
                    memmove((char *)(uintptr_t)(pr.dst + pc.dst_off),
                            (const char *)(uintptr_t)(pr.src + pc.src_off), pc.nbytes);
                    moved += (long)pc.nbytes;
                }
        atomic_fetch_add(&g_kernel_bytes, moved);
    } else {
        int zero = 0;
        atomic_compare_exchange_strong(&g_sticky, &zero, cudaErrorIllegalAddress);
    }
    pthread_mutex_lock(&g_mu);
    for (size_t i = 0; i < ntouch; i++) pin_locked(touched[i], -1);
    pthread_mutex_unlock(&g_mu);
    free(touched);
}

static void op_run(struct stream *s, struct op *o)
{
    if (o->delay_us > 0 && (o->type == OP_COPY || o->type == OP_KERNEL))
        usleep((useconds_t)o->delay_us);
    switch (o->type) {
    case OP_COPY:
        if (atomic_load(&g_sticky)) break;
        for (size_t i = 0; i < o->nseg; i++) memmove(o->segs[i].dst, o->segs[i].src, o->segs[i].n);
        break;
    case OP_KERNEL:
        if (!atomic_load(&g_sticky)) run_copy_kernel(&o->kernel);
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
    struct stream *s = calloc(1, sizeof *s);
    if (!s) {
        *err = fail(cudaErrorMemoryAllocation, "out of host memory");
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
        *err = fail(cudaErrorMemoryAllocation, "cannot start the stream worker thread");
        return NULL;
    }
    if (reg_add(&g_streams, s) != 0) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
        stream_free(s);
        *err = fail(cudaErrorMemoryAllocation, "out of host memory");
        return NULL;
    }
    s->refs = 1;
    return s;
}

/* caller holds g_mu; NULL = the default stream of the current device. Takes a ref. */
static struct stream *stream_get_locked(cudaStream_t h, int *err)
{
    struct stream *s;
    if (!h) {
        s = g_default_stream[t_device];
        if (!s) {
            s = stream_new_locked(t_device, 1, err);
            if (!s) return NULL;
            g_default_stream[t_device] = s;
        }
    } else {
        if (!reg_has(&g_streams, h)) {
            *err = fail(cudaErrorInvalidResourceHandle, "unknown or destroyed stream %p", h);
            return NULL;
        }
        s = h;
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
static struct event *event_get_locked(cudaEvent_t h, int *err)
{
    if (!h || !reg_has(&g_events, h)) {
        *err = fail(cudaErrorInvalidResourceHandle, "unknown or destroyed event %p", h);
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

static void stream_drain(struct stream *s)
{
    pthread_mutex_lock(&s->mu);
    uint64_t target = s->enq;
    while (s->done < target) pthread_cond_wait(&s->done_cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

static long copy_delay_us(void)
{
    long d = atomic_load(&g_delay_override);
    return d >= 0 ? d : env_long("FAKE_CUDA_COPY_DELAY_US", 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Version, devices, errors                                                                     */

EXPORT cudaError_t cudaRuntimeGetVersion(int *v)
{
    ENTER(cudaRuntimeGetVersion);
    if (!v) return fail(cudaErrorInvalidValue, "runtimeVersion is NULL");
    *v = runtime_version();
    return cudaSuccess;
}

EXPORT cudaError_t cudaDriverGetVersion(int *v)
{
    ENTER(cudaDriverGetVersion);
    if (!v) return fail(cudaErrorInvalidValue, "driverVersion is NULL");
    *v = env_long("FAKE_CUDA_NO_DRIVER", 0) == 1 ? 0 : runtime_version();
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetDeviceCount(int *count)
{
    ENTER(cudaGetDeviceCount);
    if (!count) return fail(cudaErrorInvalidValue, "count is NULL");
    *count = 0;
    if (env_long("FAKE_CUDA_NO_DRIVER", 0) == 1)
        return fail(cudaErrorInsufficientDriver, "no NVIDIA driver (FAKE_CUDA_NO_DRIVER=1)");
    int n = device_count();
    if (n == 0) return fail(cudaErrorNoDevice, "no device (FAKE_CUDA_DEVICE_COUNT=0)");
    *count = n;
    return cudaSuccess;
}

EXPORT cudaError_t cudaSetDevice(int device)
{
    ENTER(cudaSetDevice);
    int n = device_count();
    if (env_long("FAKE_CUDA_NO_DRIVER", 0) == 1)
        return fail(cudaErrorInsufficientDriver, "no NVIDIA driver (FAKE_CUDA_NO_DRIVER=1)");
    if (n == 0) return fail(cudaErrorNoDevice, "no device");
    if (device < 0 || device >= n)
        return fail(cudaErrorInvalidDevice, "device %d out of range [0, %d)", device, n);
    t_device = device;
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetDevice(int *device)
{
    ENTER(cudaGetDevice);
    if (!device) return fail(cudaErrorInvalidValue, "device is NULL");
    *device = t_device;
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetLastError(void)
{
    atomic_fetch_add(&g_calls[API_cudaGetLastError], 1);
    int sticky = atomic_load(&g_sticky);
    if (sticky) return sticky;
    int e = t_last;
    t_last = 0;
    return e;
}

EXPORT cudaError_t cudaPeekAtLastError(void)
{
    atomic_fetch_add(&g_calls[API_cudaPeekAtLastError], 1);
    int sticky = atomic_load(&g_sticky);
    return sticky ? sticky : t_last;
}

EXPORT const char *cudaGetErrorString(cudaError_t error)
{
    for (size_t i = 0; i < sizeof g_errors / sizeof g_errors[0]; i++)
        if (g_errors[i].code == error) return g_errors[i].text;
    return "unrecognized error code";
}

EXPORT const char *cudaGetErrorName(cudaError_t error)
{
    for (size_t i = 0; i < sizeof g_errors / sizeof g_errors[0]; i++)
        if (g_errors[i].code == error) return g_errors[i].name;
    return "cudaErrorUnknown";
}

/* ------------------------------------------------------------------------------------------ */
/* Streams                                                                                      */

static cudaError_t create_stream(cudaStream_t *stream, unsigned int flags)
{
    if (!stream) return fail(cudaErrorInvalidValue, "pStream is NULL");
    if (flags & ~STREAM_NON_BLOCKING) return fail(cudaErrorInvalidValue, "unknown stream flags 0x%x", flags);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_new_locked(t_device, 0, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    *stream = s;
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags)
{
    ENTER(cudaStreamCreateWithFlags);
    return create_stream(stream, flags);
}

EXPORT cudaError_t cudaStreamCreate(cudaStream_t *stream)
{
    ENTER(cudaStreamCreate);
    return create_stream(stream, 0);
}

/* Destroying a stream with queued work is allowed: the work completes first (the call waits). */
EXPORT cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    ENTER(cudaStreamDestroy);
    if (!stream) return fail(cudaErrorInvalidResourceHandle, "cannot destroy the default stream");
    pthread_mutex_lock(&g_mu);
    if (!reg_has(&g_streams, stream)) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle, "unknown or destroyed stream %p", stream);
    }
    struct stream *s = stream;
    reg_del(&g_streams, s);
    pthread_mutex_unlock(&g_mu);
    stream_drain(s);
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
    stream_put(s);
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    ENTER(cudaStreamSynchronize);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    stream_drain(s);
    stream_put(s);
    int sticky = atomic_load(&g_sticky);
    return sticky ? fail(sticky, "a kernel on the stream faulted") : cudaSuccess;
}

EXPORT cudaError_t cudaStreamQuery(cudaStream_t stream)
{
    ENTER(cudaStreamQuery);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    pthread_mutex_lock(&s->mu);
    int busy = s->done < s->enq;
    pthread_mutex_unlock(&s->mu);
    stream_put(s);
    return busy ? cudaErrorNotReady : cudaSuccess;
}

EXPORT cudaError_t cudaDeviceSynchronize(void)
{
    ENTER(cudaDeviceSynchronize);
    pthread_mutex_lock(&g_mu);
    size_t n = g_streams.n;
    struct stream **v = calloc(n ? n : 1, sizeof *v);
    size_t k = 0;
    for (size_t i = 0; v && i < n; i++) {
        struct stream *s = g_streams.v[i];
        if (s->device == t_device) {
            s->refs++;
            v[k++] = s;
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (!v) return fail(cudaErrorMemoryAllocation, "out of host memory");
    for (size_t i = 0; i < k; i++) {
        stream_drain(v[i]);
        stream_put(v[i]);
    }
    free(v);
    int sticky = atomic_load(&g_sticky);
    return sticky ? fail(sticky, "a kernel faulted") : cudaSuccess;
}

EXPORT cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags)
{
    ENTER(cudaStreamWaitEvent);
    if (flags != 0) return fail(cudaErrorInvalidValue, "flags must be 0, got 0x%x", flags);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, &err);
    struct event *e = s ? event_get_locked(event, &err) : NULL;
    if (!e) {
        if (s) stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    pthread_mutex_lock(&g_ev_mu);
    uint64_t target = e->rec_seq;
    int done = e->done_seq >= target;
    pthread_mutex_unlock(&g_ev_mu);
    if (!done) {
        struct op *o = calloc(1, sizeof *o);
        if (!o) {
            event_put_locked(e);
            stream_put_locked(s);
            pthread_mutex_unlock(&g_mu);
            return fail(cudaErrorMemoryAllocation, "out of host memory");
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
    return cudaSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

static cudaError_t create_event(cudaEvent_t *event, unsigned int flags)
{
    if (!event) return fail(cudaErrorInvalidValue, "event is NULL");
    if (flags & ~(EVENT_BLOCKING_SYNC | EVENT_DISABLE_TIMING | EVENT_INTERPROCESS))
        return fail(cudaErrorInvalidValue, "unknown event flags 0x%x", flags);
    if ((flags & EVENT_INTERPROCESS) && !(flags & EVENT_DISABLE_TIMING))
        return fail(cudaErrorInvalidValue, "an interprocess event needs cudaEventDisableTiming");
    struct event *e = calloc(1, sizeof *e);
    pthread_mutex_lock(&g_mu);
    if (!e || reg_add(&g_events, e) != 0) {
        pthread_mutex_unlock(&g_mu);
        free(e);
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
    e->device = t_device;
    e->flags = flags;
    e->refs = 1;
    pthread_mutex_unlock(&g_mu);
    *event = e;
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags)
{
    ENTER(cudaEventCreateWithFlags);
    return create_event(event, flags);
}

EXPORT cudaError_t cudaEventCreate(cudaEvent_t *event)
{
    ENTER(cudaEventCreate);
    return create_event(event, 0);
}

EXPORT cudaError_t cudaEventDestroy(cudaEvent_t event)
{
    ENTER(cudaEventDestroy);
    pthread_mutex_lock(&g_mu);
    if (!event || !reg_has(&g_events, event)) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle, "unknown or destroyed event %p", event);
    }
    reg_del(&g_events, event);
    event_put_locked(event); /* queued records/waits keep it alive */
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
{
    ENTER(cudaEventRecord);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(event, &err);
    struct stream *s = e ? stream_get_locked(stream, &err) : NULL;
    if (!s) {
        if (e) event_put_locked(e);
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    if (e->device != s->device) {
        int ed = e->device, sd = s->device;
        event_put_locked(e);
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle,
                    "event of device %d recorded on a stream of device %d", ed, sd);
    }
    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        event_put_locked(e);
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
    pthread_mutex_lock(&g_ev_mu);
    o->seq = ++e->rec_seq;
    pthread_mutex_unlock(&g_ev_mu);
    o->type = OP_RECORD;
    o->ev = e; /* keeps the lookup ref */
    stream_push_locked(s, o);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

/* 0 when the last record completed (or there was none), else 600. */
EXPORT cudaError_t cudaEventQuery(cudaEvent_t event)
{
    ENTER(cudaEventQuery);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(event, &err);
    pthread_mutex_unlock(&g_mu);
    if (!e) return err;
    pthread_mutex_lock(&g_ev_mu);
    int done = e->done_seq >= e->rec_seq;
    pthread_mutex_unlock(&g_ev_mu);
    event_put(e);
    return done ? cudaSuccess : cudaErrorNotReady;
}

EXPORT cudaError_t cudaEventSynchronize(cudaEvent_t event)
{
    ENTER(cudaEventSynchronize);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(event, &err);
    pthread_mutex_unlock(&g_mu);
    if (!e) return err;
    pthread_mutex_lock(&g_ev_mu);
    uint64_t target = e->rec_seq;
    while (e->done_seq < target) pthread_cond_wait(&g_ev_cv, &g_ev_mu);
    pthread_mutex_unlock(&g_ev_mu);
    event_put(e);
    int sticky = atomic_load(&g_sticky);
    return sticky ? fail(sticky, "a kernel faulted") : cudaSuccess;
}

EXPORT cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
    ENTER(cudaEventElapsedTime);
    if (!ms) return fail(cudaErrorInvalidValue, "ms is NULL");
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *a = event_get_locked(start, &err);
    struct event *b = a ? event_get_locked(end, &err) : NULL;
    if (a && !b) event_put_locked(a);
    pthread_mutex_unlock(&g_mu);
    if (!b) return err;
    cudaError_t rc = cudaSuccess;
    if ((a->flags | b->flags) & EVENT_DISABLE_TIMING) {
        rc = fail(cudaErrorInvalidResourceHandle, "an event was created with cudaEventDisableTiming");
    } else {
        pthread_mutex_lock(&g_ev_mu);
        if (a->rec_seq == 0 || b->rec_seq == 0)
            rc = fail(cudaErrorInvalidResourceHandle, "event never recorded");
        else if (a->done_seq < a->rec_seq || b->done_seq < b->rec_seq)
            rc = fail(cudaErrorNotReady, "event not complete yet");
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

EXPORT cudaError_t cudaMalloc(void **devPtr, size_t size)
{
    ENTER(cudaMalloc);
    if (!devPtr) return fail(cudaErrorInvalidValue, "devPtr is NULL");
    if (size == 0) {
        *devPtr = NULL; /* as the real runtime: success, no memory */
        return cudaSuccess;
    }
    int dev = t_device;
    char why[256];
    struct alloc *a = device_alloc(dev, size, "fakecuda-device", why, sizeof why);
    if (!a) return fail(cudaErrorMemoryAllocation, "%s", why);
    pthread_mutex_lock(&g_mu);
    a->import_id = ++g_alloc_serial;
    pthread_mutex_unlock(&g_mu);
    *devPtr = a->raw;
    return cudaSuccess;
}

/* cudaFree synchronizes: it waits until no queued operation uses the allocation. Caller holds
 * g_mu; returns 0 or an error (message set), with the allocation out of the table on success. */
static int take_for_free_locked(void *p, int kind, const char *what, struct alloc **out)
{
    struct alloc *a;
    for (;;) {
        a = tab_find(p);
        if (!a || a->base != (uintptr_t)p)
            return fail(cudaErrorInvalidValue, "%p is not the start of a live %s allocation", p, what);
        if (a->kind != kind)
            return fail(cudaErrorInvalidValue, "%p is %s memory, not %s memory", p,
                        a->kind == A_DEVICE ? "device" : "page-locked host", what);
        if (a->imported)
            return fail(cudaErrorInvalidValue,
                        "%p was mapped by cudaIpcOpenMemHandle: close it with cudaIpcCloseMemHandle", p);
        if (!a->pending) break;
        pthread_cond_wait(&g_pending_cv, &g_mu);
    }
    tab_remove(a);
    *out = a;
    return 0;
}

EXPORT cudaError_t cudaFree(void *devPtr)
{
    ENTER(cudaFree);
    if (!devPtr) return cudaSuccess;
    struct alloc *a = NULL;
    pthread_mutex_lock(&g_mu);
    int rc = take_for_free_locked(devPtr, A_DEVICE, "device", &a);
    if (!rc) g_dev_used[a->device] -= a->size;
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    munmap(a->raw, a->maplen);
    if (a->fd >= 0) close(a->fd);
    free(a);
    return cudaSuccess;
}

EXPORT cudaError_t cudaMallocHost(void **ptr, size_t size)
{
    ENTER(cudaMallocHost);
    if (!ptr) return fail(cudaErrorInvalidValue, "ptr is NULL");
    if (size == 0) {
        *ptr = NULL;
        return cudaSuccess;
    }
    void *p = NULL;
    if (posix_memalign(&p, page_size(), size) != 0)
        return fail(cudaErrorMemoryAllocation, "cannot allocate %zu bytes", size);
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
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
    pthread_mutex_unlock(&g_mu);
    *ptr = p;
    return cudaSuccess;
}

EXPORT cudaError_t cudaFreeHost(void *ptr)
{
    ENTER(cudaFreeHost);
    if (!ptr) return cudaSuccess;
    struct alloc *a = NULL;
    pthread_mutex_lock(&g_mu);
    int rc = take_for_free_locked(ptr, A_HOST_PINNED, "page-locked host", &a);
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    free(a->raw);
    free(a);
    return cudaSuccess;
}

EXPORT cudaError_t cudaMemGetInfo(size_t *freeBytes, size_t *totalBytes)
{
    ENTER(cudaMemGetInfo);
    if (!freeBytes || !totalBytes) return fail(cudaErrorInvalidValue, "NULL output pointer");
    size_t total = device_capacity();
    pthread_mutex_lock(&g_mu);
    size_t used = g_dev_used[t_device];
    pthread_mutex_unlock(&g_mu);
    *freeBytes = used < total ? total - used : 0;
    *totalBytes = total;
    return cudaSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Copies                                                                                       */

static const char *const g_kind_names[] = {"HostToHost", "HostToDevice", "DeviceToHost",
                                           "DeviceToDevice", "Default"};

/* Check one end of a copy. want: 1 device, 0 host (page-locked or pageable). Device ends must
 * stay inside their allocation. *out: the allocation (NULL for pageable memory). */
static int check_end_locked(const char *role, const void *p, size_t n, int want_dev, int kind,
                            struct alloc **out)
{
    struct alloc *a = tab_find(p);
    *out = a;
    int is_dev = a && a->kind == A_DEVICE;
    if (want_dev != is_dev)
        return fail(cudaErrorInvalidValue, "%s %p is %s memory but the copy kind %s says %s", role,
                    p, is_dev ? "device" : (a ? "page-locked host" : "pageable host"),
                    g_kind_names[kind], want_dev ? "device" : "host");
    if (a && !inside(a, (uintptr_t)p, n))
        return fail(cudaErrorInvalidValue, "%s range [%p, +%zu) leaves its allocation [%p, +%zu)",
                    role, p, n, (void *)a->base, a->size);
    return 0;
}

/* Validate one copy into g. Caller holds g_mu. */
static int check_copy_locked(struct seg *g, void *dst, const void *src, size_t n, int kind)
{
    if (kind < K_H2H || kind > K_DEFAULT)
        return fail(cudaErrorInvalidMemcpyDirection, "bad copy kind %d", kind);
    int dd, sd;
    if (kind == K_DEFAULT) {
        struct alloc *a = tab_find(dst), *b = tab_find(src);
        dd = a && a->kind == A_DEVICE;
        sd = b && b->kind == A_DEVICE;
    } else {
        dd = kind == K_H2D || kind == K_D2D;
        sd = kind == K_D2H || kind == K_D2D;
    }
    int rc;
    if ((rc = check_end_locked("dst", dst, n, dd, kind, &g->da))) return rc;
    if ((rc = check_end_locked("src", src, n, sd, kind, &g->sa))) return rc;
    g->dst = dst;
    g->src = src;
    g->n = n;
    return 0;
}

/* Queue n checked copies on s (ownership of segs passes), or, when one of them touches pageable
 * host memory, drain s and copy them here, as the real runtime stages pageable memory.
 * Caller holds g_mu (released and retaken around a synchronous copy). */
static int enqueue_copies_locked(struct stream *s, struct seg *segs, size_t n)
{
    int pageable = 0;
    for (size_t i = 0; i < n; i++) {
        if (segs[i].da) pin_locked(segs[i].da, 1);
        if (segs[i].sa) pin_locked(segs[i].sa, 1);
        int dhost = !segs[i].da, shost = !segs[i].sa;
        pageable |= dhost || shost;
    }
    if (pageable) {
        pthread_mutex_unlock(&g_mu);
        stream_drain(s);
        long d = copy_delay_us();
        if (d > 0) usleep((useconds_t)d);
        for (size_t i = 0; i < n; i++) memmove(segs[i].dst, segs[i].src, segs[i].n);
        pthread_mutex_lock(&g_mu);
        for (size_t i = 0; i < n; i++) {
            pin_locked(segs[i].da, -1);
            pin_locked(segs[i].sa, -1);
        }
        free(segs);
        return 0;
    }
    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        for (size_t i = 0; i < n; i++) {
            pin_locked(segs[i].da, -1);
            pin_locked(segs[i].sa, -1);
        }
        free(segs);
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
    o->type = OP_COPY;
    o->delay_us = copy_delay_us();
    o->segs = segs;
    o->nseg = n;
    stream_push_locked(s, o);
    return 0;
}

EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, int kind,
                                   cudaStream_t stream)
{
    ENTER(cudaMemcpyAsync);
    if (kind < K_H2H || kind > K_DEFAULT)
        return fail(cudaErrorInvalidMemcpyDirection, "bad copy kind %d", kind);
    if (count == 0) return cudaSuccess;
    if (!dst || !src) return fail(cudaErrorInvalidValue, "NULL dst or src");
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, &err);
    struct seg *g = NULL;
    if (s && !(g = malloc(sizeof *g))) err = fail(cudaErrorMemoryAllocation, "out of host memory");
    if (g && (err = check_copy_locked(g, dst, src, count, kind))) {
        free(g);
        g = NULL;
    }
    if (g) err = enqueue_copies_locked(s, g, 1);
    if (s) stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, int kind)
{
    ENTER(cudaMemcpy);
    if (kind < K_H2H || kind > K_DEFAULT)
        return fail(cudaErrorInvalidMemcpyDirection, "bad copy kind %d", kind);
    if (count == 0) return cudaSuccess;
    if (!dst || !src) return fail(cudaErrorInvalidValue, "NULL dst or src");
    struct seg g;
    pthread_mutex_lock(&g_mu);
    int rc = check_copy_locked(&g, dst, src, count, kind);
    if (!rc) {
        pin_locked(g.da, 1);
        pin_locked(g.sa, 1);
    }
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    memmove(dst, src, count);
    pthread_mutex_lock(&g_mu);
    pin_locked(g.da, -1);
    pin_locked(g.sa, -1);
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

/* The location an attribute claims vs what the pointer is. Caller holds g_mu. */
static int check_loc_locked(const char *role, size_t i, const cudaMemLocation *loc,
                            const struct alloc *a)
{
    int is_dev = a && a->kind == A_DEVICE;
    if (loc->type == LOC_DEVICE && !is_dev)
        return fail(cudaErrorInvalidValue, "entry %zu: %sLocHint says device, the pointer is host memory", i, role);
    if (loc->type == LOC_HOST && is_dev)
        return fail(cudaErrorInvalidValue, "entry %zu: %sLocHint says host, the pointer is device memory", i, role);
    if (loc->type != LOC_DEVICE && loc->type != LOC_HOST && loc->type != 0)
        return fail(cudaErrorInvalidValue, "entry %zu: bad %sLocHint.type %d", i, role, loc->type);
    return 0;
}

/* One symbol for both prototypes: 12.8/12.9 pass (failIdx, stream) as the last two arguments,
 * 13.0 passes (stream) alone; which one applies follows the version this library reports. */
EXPORT cudaError_t cudaMemcpyBatchAsync(void **dsts, void **srcs, size_t *sizes, size_t count,
                                        cudaMemcpyAttributes *attrs, size_t *attrsIdxs,
                                        size_t numAttrs, void *arg8, void *arg9)
{
    ENTER(cudaMemcpyBatchAsync);
    int v13 = runtime_version() >= 13000;
    size_t *failIdx = v13 ? NULL : (size_t *)arg8;
    cudaStream_t stream = v13 ? arg8 : arg9;
    if (failIdx) *failIdx = SIZE_MAX;
    if (env_long("FAKE_CUDA_NO_BATCH", 0) == 1)
        return fail(cudaErrorNotSupported, "cudaMemcpyBatchAsync is not supported here");
    if (!dsts || !srcs || !sizes || !attrs || !attrsIdxs)
        return fail(cudaErrorInvalidValue, "NULL array argument");
    if (count == 0) return fail(cudaErrorInvalidValue, "count is 0");
    if (numAttrs == 0 || numAttrs > count)
        return fail(cudaErrorInvalidValue, "numAttrs %zu not in [1, count=%zu]", numAttrs, count);
    if (attrsIdxs[0] != 0) return fail(cudaErrorInvalidValue, "attrsIdxs[0] must be 0");
    for (size_t j = 1; j < numAttrs; j++)
        if (attrsIdxs[j] <= attrsIdxs[j - 1] || attrsIdxs[j] >= count)
            return fail(cudaErrorInvalidValue, "attrsIdxs must increase and stay below count");
    for (size_t j = 0; j < numAttrs; j++)
        if (attrs[j].srcAccessOrder < ORDER_STREAM || attrs[j].srcAccessOrder > ORDER_ANY)
            return fail(cudaErrorInvalidValue, "attrs[%zu].srcAccessOrder %d is invalid", j,
                        attrs[j].srcAccessOrder);
    if (!stream)
        return fail(cudaErrorInvalidValue, "the legacy default stream cannot take a batch copy");
    struct seg *segs = calloc(count, sizeof *segs);
    if (!segs) return fail(cudaErrorMemoryAllocation, "out of host memory");
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(stream, &err);
    size_t nseg = 0, ai = 0;
    for (size_t i = 0; s && i < count && !err; i++) {
        while (ai + 1 < numAttrs && attrsIdxs[ai + 1] <= i) ai++;
        if (sizes[i] == 0) continue;
        if (!dsts[i] || !srcs[i]) {
            err = fail(cudaErrorInvalidValue, "entry %zu: NULL dst or src", i);
        } else {
            struct seg *g = &segs[nseg];
            err = check_copy_locked(g, dsts[i], srcs[i], sizes[i], K_DEFAULT);
            if (!err) err = check_loc_locked("dst", i, &attrs[ai].dstLocHint, g->da);
            if (!err) err = check_loc_locked("src", i, &attrs[ai].srcLocHint, g->sa);
            if (!err) nseg++;
        }
        if (err && failIdx) *failIdx = i;
    }
    if (s && !err && nseg)
        err = enqueue_copies_locked(s, segs, nseg);
    else
        free(segs);
    if (s) stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

/* ------------------------------------------------------------------------------------------ */
/* IPC: a handle names the exporter's allocation by its pid and memfd, which an importer opens
 * through /proc/<pid>/fd (same user, as for ptrace reads).                                     */

#define IPC_MAGIC "FAKECUDA"

struct ipc_handle { /* inside cudaIpcMemHandle_t */
    char magic[8];
    int32_t pid;
    int32_t memfd;
    uint64_t serial;
    uint64_t size;
    uint64_t maplen;
    int32_t device;
};

EXPORT cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t *handle, void *devPtr)
{
    ENTER(cudaIpcGetMemHandle);
    if (!handle || !devPtr) return fail(cudaErrorInvalidValue, "NULL handle or devPtr");
    pthread_mutex_lock(&g_mu);
    struct alloc *a = tab_find(devPtr);
    int rc = 0;
    if (!a || a->kind != A_DEVICE || !inside(a, (uintptr_t)devPtr, 0))
        rc = fail(cudaErrorInvalidValue, "%p is not device memory from cudaMalloc", devPtr);
    else if (a->imported)
        rc = fail(cudaErrorInvalidValue, "%p was itself mapped from another process", devPtr);
    else if (a->fd < 0)
        rc = fail(cudaErrorMapBufferObjectFailed, "the allocation of %p is not shareable", devPtr);
    if (!rc) {
        struct ipc_handle h;
        memset(&h, 0, sizeof h);
        memcpy(h.magic, IPC_MAGIC, 8);
        h.pid = (int32_t)getpid();
        h.memfd = a->fd;
        h.serial = a->import_id;
        h.size = a->size;
        h.maplen = a->maplen;
        h.device = a->device;
        memset(handle, 0, sizeof *handle);
        memcpy(handle, &h, sizeof h);
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

EXPORT cudaError_t cudaIpcOpenMemHandle(void **devPtr, cudaIpcMemHandle_t handle, unsigned int flags)
{
    ENTER(cudaIpcOpenMemHandle);
    if (!devPtr) return fail(cudaErrorInvalidValue, "devPtr is NULL");
    if (flags != IPC_LAZY_ENABLE_PEER_ACCESS)
        return fail(cudaErrorInvalidValue, "flags must be cudaIpcMemLazyEnablePeerAccess (1), got %u", flags);
    struct ipc_handle h;
    memcpy(&h, &handle, sizeof h);
    if (memcmp(h.magic, IPC_MAGIC, 8) != 0 || h.pid <= 0 || h.memfd < 0 || h.maplen == 0)
        return fail(cudaErrorInvalidValue, "not an IPC memory handle");
    if (h.pid == (int32_t)getpid())
        return fail(cudaErrorDeviceUninitialized,
                    "a handle cannot be opened in the process that exported it");
    uint64_t id = ((uint64_t)(uint32_t)h.pid << 32) | (h.serial & 0xffffffffu);
    pthread_mutex_lock(&g_mu);
    for (size_t i = 0; i < g_ntab; i++) /* opened before: the same mapping */
        if (g_tab[i]->imported && g_tab[i]->import_id == id) {
            g_tab[i]->import_refs++;
            *devPtr = g_tab[i]->raw;
            pthread_mutex_unlock(&g_mu);
            return cudaSuccess;
        }
    pthread_mutex_unlock(&g_mu);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)h.pid, (int)h.memfd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail(cudaErrorInvalidValue, "the exporting allocation is gone (%s: %s)", path,
                    strerror(errno));
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size >= h.maplen)
        p = mmap(NULL, h.maplen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return fail(cudaErrorMapBufferObjectFailed, "cannot map the exported allocation");
    struct alloc *a = calloc(1, sizeof *a);
    if (a) {
        a->base = (uintptr_t)p;
        a->size = h.size;
        a->maplen = h.maplen;
        a->kind = A_DEVICE;
        a->device = h.device;
        a->imported = 1;
        a->import_refs = 1;
        a->import_id = id;
        a->fd = -1;
        a->raw = p;
    }
    pthread_mutex_lock(&g_mu);
    if (!a || tab_insert(a) != 0) {
        pthread_mutex_unlock(&g_mu);
        munmap(p, h.maplen);
        free(a);
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
    pthread_mutex_unlock(&g_mu);
    *devPtr = p;
    return cudaSuccess;
}

EXPORT cudaError_t cudaIpcCloseMemHandle(void *devPtr)
{
    ENTER(cudaIpcCloseMemHandle);
    pthread_mutex_lock(&g_mu);
    struct alloc *a = tab_find(devPtr);
    int rc = 0;
    if (!a || !a->imported || a->base != (uintptr_t)devPtr)
        rc = fail(cudaErrorInvalidValue, "%p was not returned by cudaIpcOpenMemHandle", devPtr);
    else if (a->pending)
        rc = fail(cudaErrorInvalidValue, "%p is still used by %ld queued operation(s)", devPtr,
                  a->pending);
    else if (--a->import_refs > 0)
        a = NULL; /* still open */
    else
        tab_remove(a);
    pthread_mutex_unlock(&g_mu);
    if (rc || !a) return rc;
    munmap(a->raw, a->maplen);
    free(a);
    return cudaSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* The driver's view of an address (libcuda): build.sh links libcuda.so.1 to this library, so a
 * process that opens both gets one allocation table. cuMemGetAddressRange_v2 gives the
 * allocation holding an address (an imported one: the mapping); a VMM allocation
 * (fake_cuda_malloc_vmm) is known to the driver but cannot be exported by an IPC handle.      */

#define CUDA_DRIVER_ERROR_INVALID_VALUE 1
#define CUDA_DRIVER_ERROR_NOT_FOUND 500

EXPORT int cuMemGetAddressRange_v2(unsigned long long *pbase, size_t *psize,
                                   unsigned long long dptr)
{
    pthread_mutex_lock(&g_mu);
    struct alloc *a = tab_find((void *)(uintptr_t)dptr);
    int rc = !a || a->kind != A_DEVICE || !inside(a, (uintptr_t)dptr, 0)
                 ? CUDA_DRIVER_ERROR_NOT_FOUND : 0;
    if (!rc) {
        if (pbase) *pbase = a->base;
        if (psize) *psize = a->size;
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

/* Test hook: device memory as cuMemCreate + cuMemMap make it (PyTorch's expandable segments):
 * usable by copies, known to cuMemGetAddressRange, refused by cudaIpcGetMemHandle. Free it with
 * cudaFree. */
EXPORT cudaError_t fake_cuda_malloc_vmm(void **devPtr, size_t size)
{
    cudaError_t rc = cudaMalloc(devPtr, size);
    if (rc || !*devPtr) return rc;
    pthread_mutex_lock(&g_mu);
    struct alloc *a = tab_find(*devPtr);
    if (a->fd >= 0) close(a->fd);
    a->fd = -1;
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Loading PTX and launching kernels                                                            */

static void library_put_locked(struct library *l)
{
    if (--l->refs) return;
    for (int i = 0; i < l->nentries; i++) free(l->entries[i]);
    free(l->entries);
    free(l->copy_kernel);
    free(l);
}

/* The parameter list of the entry starting at p: 1 when it is the copy kernel's
 * (u64, u32, u64, u32, see include/llmdist/copy_kernel.h). */
static int has_copy_params(const char *p)
{
    const char *open = strchr(p, '('), *close = open ? strchr(open, ')') : NULL;
    if (!open || !close) return 0;
    static const char *const want[] = {".u64", ".u32", ".u64", ".u32"};
    int n = 0;
    for (const char *q = open; q && q < close; q = strstr(q + 1, ".param")) {
        if (q == open) continue;
        const char *t = q + strlen(".param");
        while (*t == ' ' || *t == '\t') t++;
        if (n >= 4 || strncmp(t, want[n], 4) != 0) return 0;
        n++;
    }
    return n == 4;
}

EXPORT cudaError_t cudaLibraryLoadData(cudaLibrary_t *library, const void *code, void *jitOptions,
                                       void **jitOptionsValues, unsigned int numJitOptions,
                                       void *libraryOptions, void **libraryOptionValues,
                                       unsigned int numLibraryOptions)
{
    ENTER(cudaLibraryLoadData);
    if (!library || !code) return fail(cudaErrorInvalidValue, "NULL library or code");
    if ((numJitOptions && (!jitOptions || !jitOptionsValues)) ||
        (numLibraryOptions && (!libraryOptions || !libraryOptionValues)))
        return fail(cudaErrorInvalidValue, "options counted but not given");
    const char *text = code;
    if (memcmp(text, "\177ELF", 4) == 0)
        return fail(cudaErrorInvalidKernelImage, "the fake runtime loads PTX text only");
    const char *ver = strstr(text, "\n.version ");
    const char *tgt = strstr(text, "\n.target sm_");
    int maj = 0, min = 0, sm = 0;
    if (!ver || sscanf(ver, "\n.version %d.%d", &maj, &min) != 2 || !tgt ||
        sscanf(tgt, "\n.target sm_%d", &sm) != 1)
        return fail(cudaErrorInvalidPtx, "no .version/.target directive: not PTX");
    const char *maxs = getenv("FAKE_CUDA_MAX_PTX_ISA");
    int xmaj = 8, xmin = 8;
    if (maxs && *maxs) sscanf(maxs, "%d.%d", &xmaj, &xmin);
    if (maj > xmaj || (maj == xmaj && min > xmin))
        return fail(cudaErrorUnsupportedPtxVersion,
                    "PTX ISA %d.%d is newer than this driver's %d.%d", maj, min, xmaj, xmin);
    int dev_sm = (int)env_long("FAKE_CUDA_SM", 90);
    if (sm > dev_sm)
        return fail(cudaErrorNoKernelImageForDevice, "PTX for sm_%d cannot run on sm_%d", sm, dev_sm);
    struct library *l = calloc(1, sizeof *l);
    if (!l) return fail(cudaErrorMemoryAllocation, "out of host memory");
    for (const char *p = strstr(text, ".entry "); p; p = strstr(p + 1, ".entry ")) {
        const char *name = p + strlen(".entry ");
        size_t n = strcspn(name, "( \t\n");
        char **e = realloc(l->entries, (size_t)(l->nentries + 1) * sizeof *e);
        int *c = realloc(l->copy_kernel, (size_t)(l->nentries + 1) * sizeof *c);
        if (e) l->entries = e;
        if (c) l->copy_kernel = c;
        if (!e || !c || !(l->entries[l->nentries] = strndup(name, n))) {
            l->refs = 1;
            library_put_locked(l);
            return fail(cudaErrorMemoryAllocation, "out of host memory");
        }
        l->copy_kernel[l->nentries] = has_copy_params(name);
        l->nentries++;
    }
    const char *mt = strstr(text, ".maxntid ");
    if (mt) sscanf(mt, ".maxntid %d", &l->maxntid);
    if (l->nentries == 0) {
        l->refs = 1;
        library_put_locked(l);
        return fail(cudaErrorInvalidPtx, "the PTX has no .entry");
    }
    l->refs = 1;
    pthread_mutex_lock(&g_mu);
    int rc = reg_add(&g_libs, l);
    if (rc) library_put_locked(l);
    pthread_mutex_unlock(&g_mu);
    if (rc) return fail(cudaErrorMemoryAllocation, "out of host memory");
    *library = l;
    return cudaSuccess;
}

EXPORT cudaError_t cudaLibraryGetKernel(cudaKernel_t *kernel, cudaLibrary_t library, const char *name)
{
    ENTER(cudaLibraryGetKernel);
    if (!kernel || !name) return fail(cudaErrorInvalidValue, "NULL kernel or name");
    pthread_mutex_lock(&g_mu);
    if (!reg_has(&g_libs, library)) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle, "unknown or unloaded library %p", library);
    }
    struct library *l = library;
    int entry = -1;
    for (int i = 0; i < l->nentries; i++)
        if (strcmp(l->entries[i], name) == 0) entry = i;
    struct kernel *k = entry >= 0 ? calloc(1, sizeof *k) : NULL;
    int rc = 0;
    if (entry < 0)
        rc = fail(cudaErrorSymbolNotFound, "no kernel named %s in the library", name);
    else if (!k || reg_add(&g_kernels, k) != 0)
        rc = fail(cudaErrorMemoryAllocation, "out of host memory");
    if (!rc) {
        k->lib = l;
        k->entry = entry;
        l->refs++;
        *kernel = k;
    } else {
        free(k);
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

EXPORT cudaError_t cudaLibraryUnload(cudaLibrary_t library)
{
    ENTER(cudaLibraryUnload);
    pthread_mutex_lock(&g_mu);
    if (!reg_has(&g_libs, library)) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle, "unknown or unloaded library %p", library);
    }
    reg_del(&g_libs, library);
    for (size_t i = g_kernels.n; i-- > 0;) { /* its kernels become invalid */
        struct kernel *k = g_kernels.v[i];
        if (k->lib == library) {
            reg_del(&g_kernels, k);
            library_put_locked(k->lib);
            free(k);
        }
    }
    library_put_locked(library);
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

EXPORT cudaError_t cudaLaunchKernel(const void *func, dim3 grid, dim3 block, void **args,
                                    size_t sharedMem, cudaStream_t stream)
{
    ENTER(cudaLaunchKernel);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
        grid.x > 0x7fffffffu)
        return fail(cudaErrorInvalidConfiguration, "grid (%u, %u, %u) is invalid", grid.x, grid.y, grid.z);
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
        block.z > 64 || (unsigned long)block.x * block.y * block.z > 1024)
        return fail(cudaErrorInvalidConfiguration, "block (%u, %u, %u) is invalid", block.x,
                    block.y, block.z);
    if (sharedMem > 48 * 1024)
        return fail(cudaErrorInvalidValue, "%zu bytes of dynamic shared memory", sharedMem);
    int err = 0;
    pthread_mutex_lock(&g_mu);
    if (!reg_has(&g_kernels, func)) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidDeviceFunction, "%p is not a kernel of a loaded library", func);
    }
    const struct kernel *k = func;
    if (!k->lib->copy_kernel[k->entry]) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorNotSupported, "the fake runtime runs only %s (u64, u32, u64, u32)",
                    LLMD_COPY_KERNEL_NAME);
    }
    unsigned long threads = (unsigned long)block.x * block.y * block.z;
    if (k->lib->maxntid && threads > (unsigned long)k->lib->maxntid) {
        int m = k->lib->maxntid;
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorLaunchOutOfResources, "%lu threads per block, the kernel allows %d",
                    threads, m);
    }
    if (!args || !args[0] || !args[1] || !args[2] || !args[3]) {
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidValue, "kernel arguments missing");
    }
    struct stream *s = stream_get_locked(stream, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    if (s->device != t_device) {
        int sd = s->device;
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorInvalidResourceHandle,
                    "stream of device %d used while device %d is current", sd, t_device);
    }
    struct op *o = calloc(1, sizeof *o);
    if (!o) {
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
    o->type = OP_KERNEL;
    o->delay_us = copy_delay_us();
    memcpy(&o->kernel.pieces, args[0], sizeof(uint64_t));
    memcpy(&o->kernel.npieces, args[1], sizeof(unsigned));
    memcpy(&o->kernel.pairs, args[2], sizeof(uint64_t));
    memcpy(&o->kernel.npairs, args[3], sizeof(unsigned));
    o->kernel.grid = grid;
    o->kernel.device = s->device;
    o->kernel.pa = tab_find((const void *)o->kernel.pieces);
    o->kernel.qa = tab_find((const void *)o->kernel.pairs);
    pin_locked(o->kernel.pa, 1);
    pin_locked(o->kernel.qa, 1);
    stream_push_locked(s, o);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return cudaSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Test hooks                                                                                   */

EXPORT int fake_cuda_inject(const char *api, int after, int code)
{
    return injection_arm(api_lookup(api), after, code);
}

EXPORT long fake_cuda_calls(const char *api) { return calls_of(api); }

EXPORT long fake_cuda_kernel_bytes(void) { return atomic_load(&g_kernel_bytes); }

EXPORT void fake_cuda_reset(void)
{
    counters_reset();
    atomic_store(&g_kernel_bytes, 0);
    atomic_store(&g_delay_override, -1);
}

EXPORT void fake_cuda_set_copy_delay_us(long us) { atomic_store(&g_delay_override, us < 0 ? -1 : us); }

EXPORT const char *fake_cuda_last_message(void) { return t_msg; }

EXPORT long fake_cuda_live(const char *what)
{
    if (!what) return -1;
    long n = 0;
    pthread_mutex_lock(&g_mu);
    if (strcmp(what, "device") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->kind == A_DEVICE && !g_tab[i]->imported;
    } else if (strcmp(what, "host") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->kind == A_HOST_PINNED;
    } else if (strcmp(what, "ipc_import") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->imported;
    } else if (strcmp(what, "stream") == 0) {
        for (size_t i = 0; i < g_streams.n; i++) n += !((struct stream *)g_streams.v[i])->is_default;
    } else if (strcmp(what, "event") == 0) {
        n = (long)g_events.n;
    } else if (strcmp(what, "library") == 0) {
        n = (long)g_libs.n;
    } else if (strcmp(what, "pending") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->pending;
    } else {
        n = -1;
    }
    pthread_mutex_unlock(&g_mu);
    return n;
}
