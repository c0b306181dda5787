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
 * This file is the CUDA skin over the engine it shares with tests/fake_acl (../fake_runtime):
 * call counters and fault injection, the allocation table, frees and imported mappings
 * (fake_engine.h), streams and events (fake_streams.h) and the copy checks and queueing
 * (fake_copies.h). Here are the vendor's names, error codes (struct fake_rules), signatures and
 * the checks only this runtime makes.
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
#define FAKE_HOOK(name) fake_cuda_##name
#define FAKE_ALLOC_FIELDS                                                                     \
    int import_refs;    /* opens of one handle share a mapping */                             \
    uint64_t import_id; /* (exporter pid << 32) | serial, for a second open of one handle */
#define FAKE_RULES                                                                            \
    {                                                                                         \
        .bad_value = cudaErrorInvalidValue, .bad_handle = cudaErrorInvalidResourceHandle,     \
        .bad_range = cudaErrorInvalidValue, .no_memory = cudaErrorMemoryAllocation,           \
        .no_stream = cudaErrorMemoryAllocation, .no_event = cudaErrorMemoryAllocation,        \
        .stream_device = 0, .event_device = cudaErrorInvalidResourceHandle,                   \
        .stream_timeout = 0, .event_timeout = 0, .timing = cudaErrorInvalidResourceHandle,    \
        .not_ready = cudaErrorNotReady, .busy_destroy = 0, .busy_free = 0, .same_stream = 0,  \
        .wait_flag = 0, .wait_flag_name = "", .import_name = "cudaIpcOpenMemHandle",          \
        .close_name = "cudaIpcCloseMemHandle",                                                \
    }
#include "fake_engine.h"

static atomic_long g_kernel_bytes;

static int runtime_version(void) { return (int)env_long("FAKE_CUDA_VERSION", 12090); }

static _Thread_local int t_device; /* device 0 until cudaSetDevice, as the real runtime */

static uint64_t g_alloc_serial;

/* [p, p + n) inside a's requested size */
static int inside(const struct alloc *a, uintptr_t p, size_t n)
{
    return a && p >= a->base && p - a->base <= a->size && n <= a->size - (p - a->base);
}

/* A launch of the copy kernel: the argument values, captured at launch as the GPU does. The
 * op's held allocations are the tables', pinned while queued. */
struct launch {
    uintptr_t pieces, pairs;
    unsigned npieces, npairs;
    dim3 grid;
    int device;
};

static void run_copy_kernel(const struct launch *k);

#define FAKE_STREAM_FIELDS
#define FAKE_OP_FIELDS struct launch kernel;
#define FAKE_RUN_KERNEL(o) run_copy_kernel(&(o)->kernel)
#include "fake_streams.h"
#include "fake_copies.h"

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
    return stream_create(stream, t_device, -1);
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
    return stream_destroy(stream, t_device);
}

/* The sticky fault of a kernel that ran before a synchronization returned (message: what
 * faulted), or 0. */
static cudaError_t after_sync(const char *msg)
{
    int sticky = atomic_load(&g_sticky);
    return sticky ? fail(sticky, "%s", msg) : cudaSuccess;
}

EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    ENTER(cudaStreamSynchronize);
    int rc = stream_sync(stream, t_device, -1);
    return rc ? rc : after_sync("a kernel on the stream faulted");
}

EXPORT cudaError_t cudaStreamQuery(cudaStream_t stream)
{
    ENTER(cudaStreamQuery);
    int busy = 0;
    int rc = stream_busy(stream, t_device, &busy);
    return rc ? rc : busy ? cudaErrorNotReady : cudaSuccess;
}

EXPORT cudaError_t cudaDeviceSynchronize(void)
{
    ENTER(cudaDeviceSynchronize);
    int rc = device_sync(t_device);
    return rc ? rc : after_sync("a kernel faulted");
}

EXPORT cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags)
{
    ENTER(cudaStreamWaitEvent);
    if (flags != 0) return fail(cudaErrorInvalidValue, "flags must be 0, got 0x%x", flags);
    return stream_wait_event(stream, event, t_device);
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

static const char *event_untimed(const struct event *e)
{
    return e->flags & EVENT_DISABLE_TIMING ? "an event was created with cudaEventDisableTiming"
                                           : NULL;
}

static cudaError_t create_event(cudaEvent_t *event, unsigned int flags)
{
    if (!event) return fail(cudaErrorInvalidValue, "event is NULL");
    if (flags & ~(EVENT_BLOCKING_SYNC | EVENT_DISABLE_TIMING | EVENT_INTERPROCESS))
        return fail(cudaErrorInvalidValue, "unknown event flags 0x%x", flags);
    if ((flags & EVENT_INTERPROCESS) && !(flags & EVENT_DISABLE_TIMING))
        return fail(cudaErrorInvalidValue, "an interprocess event needs cudaEventDisableTiming");
    return event_create(event, t_device, flags, NULL, 0);
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
    return event_destroy(event);
}

EXPORT cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
{
    ENTER(cudaEventRecord);
    return event_record(event, stream, t_device);
}

/* 0 when the last record completed (or there was none), else 600. */
EXPORT cudaError_t cudaEventQuery(cudaEvent_t event)
{
    ENTER(cudaEventQuery);
    int done = 0;
    int rc = event_query(event, &done);
    return rc ? rc : done ? cudaSuccess : cudaErrorNotReady;
}

EXPORT cudaError_t cudaEventSynchronize(cudaEvent_t event)
{
    ENTER(cudaEventSynchronize);
    int rc = event_sync(event, -1);
    return rc ? rc : after_sync("a kernel faulted");
}

EXPORT cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
    ENTER(cudaEventElapsedTime);
    if (!ms) return fail(cudaErrorInvalidValue, "ms is NULL");
    return event_elapsed(ms, start, end);
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

/* cudaFree synchronizes: it waits until no queued operation uses the allocation. */
static int free_refused_locked(const struct alloc *a, const void *p) { return 0; }

EXPORT cudaError_t cudaFree(void *devPtr)
{
    ENTER(cudaFree);
    return devPtr ? alloc_free(devPtr, A_DEVICE, "device") : cudaSuccess;
}

EXPORT cudaError_t cudaMallocHost(void **ptr, size_t size)
{
    ENTER(cudaMallocHost);
    if (!ptr) return fail(cudaErrorInvalidValue, "ptr is NULL");
    if (size == 0) {
        *ptr = NULL;
        return cudaSuccess;
    }
    return host_alloc(size, ptr);
}

EXPORT cudaError_t cudaFreeHost(void *ptr)
{
    ENTER(cudaFreeHost);
    return ptr ? alloc_free(ptr, A_HOST_PINNED, "page-locked host") : cudaSuccess;
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

/* Validate one copy into g (kind checked by the caller). Caller holds g_mu. */
static int check_copy_locked(struct seg *g, const struct copy_args *c)
{
    int dd, sd;
    copy_sides_locked(c, &dd, &sd);
    int rc = check_end_locked("dst", c->dst, copy_extent(c, c->dpitch), dd, c->kind, &g->da);
    if (!rc) rc = check_end_locked("src", c->src, copy_extent(c, c->spitch), sd, c->kind, &g->sa);
    if (!rc) seg_set(g, c);
    return rc;
}

/* The error of a copy's kind and pointers, or 0. */
static int check_copy_args(void *dst, const void *src, size_t count, int kind)
{
    if (kind < K_H2H || kind > K_DEFAULT)
        return fail(cudaErrorInvalidMemcpyDirection, "bad copy kind %d", kind);
    if (count && (!dst || !src)) return fail(cudaErrorInvalidValue, "NULL dst or src");
    return 0;
}

/* Pageable host memory in an async copy is copied synchronously (the real runtime stages it). */
EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, int kind,
                                   cudaStream_t stream)
{
    ENTER(cudaMemcpyAsync);
    int rc = check_copy_args(dst, src, count, kind);
    if (rc || count == 0) return rc;
    return copy_async(stream, copy_line(dst, src, count, kind, 1, t_device), 0);
}

EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, int kind)
{
    ENTER(cudaMemcpy);
    int rc = check_copy_args(dst, src, count, kind);
    if (rc || count == 0) return rc;
    return copy_sync(copy_line(dst, src, count, kind, 0, t_device));
}

/* The location an attribute claims vs what the pointer is. Caller holds g_mu. */
static int check_loc_locked(const char *role, size_t i, const void *at,
                            const struct alloc *a)
{
    const cudaMemLocation *loc = at;
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
    struct batch_args b = {.dsts = dsts, .srcs = srcs, .sizes = sizes, .dest_maxs = NULL,
                           .count = count, .attrs = attrs, .attr_size = sizeof *attrs,
                           .dst_loc_at = offsetof(cudaMemcpyAttributes, dstLocHint),
                           .src_loc_at = offsetof(cudaMemcpyAttributes, srcLocHint),
                           .attr_idxs = attrsIdxs, .nattrs = numAttrs, .fail_index = failIdx,
                           .count_name = "count", .idxs_name = "attrsIdxs"};
    int rc = check_batch_args(&b);
    if (rc) return rc;
    for (size_t j = 0; j < numAttrs; j++)
        if (attrs[j].srcAccessOrder < ORDER_STREAM || attrs[j].srcAccessOrder > ORDER_ANY)
            return fail(cudaErrorInvalidValue, "attrs[%zu].srcAccessOrder %d is invalid", j,
                        attrs[j].srcAccessOrder);
    if (!stream)
        return fail(cudaErrorInvalidValue, "the legacy default stream cannot take a batch copy");
    return copy_batch(stream, t_device, &b);
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
    int opened;
    void *p = map_foreign_fd(h.pid, h.memfd, h.maplen, 0, h.maplen, &opened);
    if (!opened)
        return fail(cudaErrorInvalidValue, "the exporting allocation is gone (%s)", strerror(errno));
    if (p == MAP_FAILED)
        return fail(cudaErrorMapBufferObjectFailed, "cannot map the exported allocation");
    pthread_mutex_lock(&g_mu);
    struct alloc *a = import_insert_locked(p, h.size, h.maplen, h.device);
    if (a) {
        a->import_refs = 1;
        a->import_id = id;
    }
    pthread_mutex_unlock(&g_mu);
    if (!a) {
        munmap(p, h.maplen);
        return fail(cudaErrorMemoryAllocation, "out of host memory");
    }
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
    struct stream *s = stream_get_locked(stream, t_device, &err);
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
    struct op *o = op_new(OP_KERNEL);
    if (!o) {
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return cudaErrorMemoryAllocation;
    }
    o->delay_us = copy_delay_us();
    memcpy(&o->kernel.pieces, args[0], sizeof(uint64_t));
    memcpy(&o->kernel.npieces, args[1], sizeof(unsigned));
    memcpy(&o->kernel.pairs, args[2], sizeof(uint64_t));
    memcpy(&o->kernel.npairs, args[3], sizeof(unsigned));
    o->kernel.grid = grid;
    o->kernel.device = s->device;
    o->held[0] = tab_find((const void *)o->kernel.pieces);
    o->held[1] = tab_find((const void *)o->kernel.pairs);
    pin_locked(o->held[0], 1);
    pin_locked(o->held[1], 1);
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

EXPORT long fake_cuda_kernel_bytes(void) { return atomic_load(&g_kernel_bytes); }

EXPORT void fake_cuda_reset(void)
{
    counters_reset();
    atomic_store(&g_kernel_bytes, 0);
    atomic_store(&g_delay_override, -1);
}

EXPORT const char *fake_cuda_last_message(void) { return t_msg; }

EXPORT long fake_cuda_live(const char *what)
{
    if (!what) return -1;
    long n = 0;
    pthread_mutex_lock(&g_mu);
    if (strcmp(what, "device") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->kind == A_DEVICE && !g_tab[i]->imported;
    } else if (strcmp(what, "ipc_import") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->imported;
    } else if (strcmp(what, "library") == 0) {
        n = (long)g_libs.n;
    } else {
        n = live_count_locked(what);
    }
    pthread_mutex_unlock(&g_mu);
    return n;
}
