/* The CUDA runtime (libcudart.so.12 / .13): the subset llmdist calls, declared from the public
 * documentation, and its loader. llmdist never links it: LLMD_CUDA_SYMBOLS, written once, makes
 * the llmd_cuda_api table, the dlsym loop and the missing-symbol report (src/cuda_runtime.c).
 * tests/vendor_headers checks every signature and layout here against the vendor's header. */
#ifndef LLMDIST_CUDA_H
#define LLMDIST_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "llmdist/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLMD_CUDA_SUCCESS 0
#define LLMD_CUDA_ERROR_INVALID_VALUE 1
#define LLMD_CUDA_ERROR_MEMORY_ALLOCATION 2
#define LLMD_CUDA_ERROR_NOT_READY 600
#define LLMD_CUDA_ERROR_NOT_SUPPORTED 801
#define LLMD_CUDA_STREAM_NON_BLOCKING 0x01u
#define LLMD_CUDA_EVENT_DISABLE_TIMING 0x02u
#define LLMD_CUDA_MEM_LOCATION_DEVICE 1
#define LLMD_CUDA_MEM_LOCATION_HOST 2
#define LLMD_CUDA_ACCESS_ORDER_STREAM 1
#define LLMD_CUDA_IPC_HANDLE_SIZE 64
#define LLMD_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS 0x01u
/* cudaMemcpyBatchAsync exists from 12.8; its prototype changed in 13.0. */
#define LLMD_CUDA_BATCH_MIN_VERSION 12080
#define LLMD_CUDA_BATCH_V13_VERSION 13000

/* cudaIpcMemHandle_t: 64 opaque bytes, passed by value to cudaIpcOpenMemHandle. */
struct llmd_cuda_ipc_mem_handle {
    char reserved[LLMD_CUDA_IPC_HANDLE_SIZE];
};
struct llmd_cuda_mem_location {
    int type;
    int id;
};
/* dim3: three unsigned ints, passed by value to cudaLaunchKernel. */
struct llmd_cuda_dim3 {
    unsigned int x, y, z;
};
struct llmd_cuda_memcpy_attributes {
    int srcAccessOrder;
    struct llmd_cuda_mem_location srcLocHint;
    struct llmd_cuda_mem_location dstLocHint;
    unsigned int flags;
};

/* The types in the signatures below. Enums are ints here; the header check defines
 * LLMD_CUDA_VENDOR_TYPES and maps these names to the vendor's own types. */
#ifndef LLMD_CUDA_VENDOR_TYPES
typedef int llmd_cudaError_t;
typedef void *llmd_cudaStream_t;
typedef void *llmd_cudaEvent_t;
typedef int llmd_cudaMemcpyKind;
typedef struct llmd_cuda_ipc_mem_handle llmd_cudaIpcMemHandle_t;
typedef struct llmd_cuda_memcpy_attributes llmd_cudaMemcpyAttributes;
typedef void *llmd_cudaLibrary_t;
typedef void *llmd_cudaKernel_t;
typedef int llmd_cudaJitOption;
typedef int llmd_cudaLibraryOption;
typedef struct llmd_cuda_dim3 llmd_dim3;
#endif

/* X(group, return type, name, parameters). REQUIRED: loading fails without it; OPTIONAL: used
 * when present; IPC: device IPC, reported by ipc_unavailable when missing; KERNEL: loading and
 * launching the copy kernel (CUDA 12.0+), DMA copies without them. */
#define LLMD_CUDA_SYMBOLS(X)                                                                      \
    X(REQUIRED, llmd_cudaError_t, cudaRuntimeGetVersion, (int *runtimeVersion))                   \
    X(REQUIRED, llmd_cudaError_t, cudaGetDeviceCount, (int *count))                               \
    X(REQUIRED, llmd_cudaError_t, cudaSetDevice, (int device))                                    \
    X(REQUIRED, llmd_cudaError_t, cudaStreamCreateWithFlags,                                      \
      (llmd_cudaStream_t *pStream, unsigned int flags))                                           \
    X(REQUIRED, llmd_cudaError_t, cudaStreamDestroy, (llmd_cudaStream_t stream))                  \
    X(REQUIRED, llmd_cudaError_t, cudaStreamSynchronize, (llmd_cudaStream_t stream))              \
    X(REQUIRED, llmd_cudaError_t, cudaStreamWaitEvent,                                            \
      (llmd_cudaStream_t stream, llmd_cudaEvent_t event, unsigned int flags))                     \
    X(REQUIRED, llmd_cudaError_t, cudaEventCreateWithFlags,                                       \
      (llmd_cudaEvent_t *event, unsigned int flags))                                              \
    X(REQUIRED, llmd_cudaError_t, cudaEventDestroy, (llmd_cudaEvent_t event))                     \
    X(REQUIRED, llmd_cudaError_t, cudaEventRecord, (llmd_cudaEvent_t event, llmd_cudaStream_t stream)) \
    X(REQUIRED, llmd_cudaError_t, cudaEventQuery, (llmd_cudaEvent_t event))                       \
    X(REQUIRED, llmd_cudaError_t, cudaEventSynchronize, (llmd_cudaEvent_t event))                 \
    X(REQUIRED, llmd_cudaError_t, cudaMalloc, (void **devPtr, size_t size))                       \
    X(REQUIRED, llmd_cudaError_t, cudaFree, (void *devPtr))                                       \
    X(REQUIRED, llmd_cudaError_t, cudaMallocHost, (void **ptr, size_t size))                      \
    X(REQUIRED, llmd_cudaError_t, cudaFreeHost, (void *ptr))                                      \
    X(REQUIRED, llmd_cudaError_t, cudaMemcpyAsync,                                                \
      (void *dst, const void *src, size_t count, llmd_cudaMemcpyKind kind,                        \
       llmd_cudaStream_t stream))                                                                 \
    X(REQUIRED, const char *, cudaGetErrorString, (llmd_cudaError_t error))                       \
    X(OPTIONAL, llmd_cudaError_t, cudaMemGetInfo, (size_t *free, size_t *total))                  \
    X(IPC, llmd_cudaError_t, cudaIpcGetMemHandle, (llmd_cudaIpcMemHandle_t *handle, void *devPtr)) \
    X(IPC, llmd_cudaError_t, cudaIpcOpenMemHandle,                                                \
      (void **devPtr, llmd_cudaIpcMemHandle_t handle, unsigned int flags))                        \
    X(IPC, llmd_cudaError_t, cudaIpcCloseMemHandle, (void *devPtr))                               \
    X(KERNEL, llmd_cudaError_t, cudaLibraryLoadData,                                              \
      (llmd_cudaLibrary_t *library, const void *code, llmd_cudaJitOption *jitOptions,             \
       void **jitOptionsValues, unsigned int numJitOptions,                                       \
       llmd_cudaLibraryOption *libraryOptions, void **libraryOptionValues,                        \
       unsigned int numLibraryOptions))                                                           \
    X(KERNEL, llmd_cudaError_t, cudaLibraryGetKernel,                                             \
      (llmd_cudaKernel_t *pKernel, llmd_cudaLibrary_t library, const char *name))                 \
    X(KERNEL, llmd_cudaError_t, cudaLibraryUnload, (llmd_cudaLibrary_t library))                  \
    X(KERNEL, llmd_cudaError_t, cudaLaunchKernel,                                                 \
      (const void *func, llmd_dim3 gridDim, llmd_dim3 blockDim, void **args, size_t sharedMem,    \
       llmd_cudaStream_t stream))

/* cudaMemcpyBatchAsync (optional, looked up by version): 12.8/12.9, then 13.0 without failIdx. */
typedef llmd_cudaError_t (*llmd_cudaMemcpyBatchAsync12_t)(
    void **dsts, void **srcs, size_t *sizes, size_t count, llmd_cudaMemcpyAttributes *attrs,
    size_t *attrsIdxs, size_t numAttrs, size_t *failIdx, llmd_cudaStream_t stream);
typedef llmd_cudaError_t (*llmd_cudaMemcpyBatchAsync13_t)(
    void *const *dsts, const void *const *srcs, const size_t *sizes, size_t count,
    llmd_cudaMemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs,
    llmd_cudaStream_t stream);

#define LLMD_CUDA_API_MEMBER(group, ret, name, params) ret (*name) params;
typedef struct llmd_cuda_api {
    LLMD_CUDA_SYMBOLS(LLMD_CUDA_API_MEMBER)
    void *cudaMemcpyBatchAsync;     /* one of the two prototypes above, or NULL */
} llmd_cuda_api;

/* Open libcudart from the first of paths that loads and check that device_id exists. The
 * library is loaded once per process; the device check runs on every call. NULL with
 * report->error saying why. */
const llmd_runtime *llmd_cuda_load(const char *const *paths, size_t count, int32_t device_id,
                                   llmd_load_report *report);

#ifdef __cplusplus
}
#endif
#endif
