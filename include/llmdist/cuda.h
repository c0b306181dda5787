/* The subset of the CUDA runtime (libcudart.so.12 / .13) that llmdist calls, declared from the
 * public documentation. llmdist never links it: the symbols are looked up with dlsym into an
 * llmd_cuda_api table. Enum parameters are plain ints. */
#ifndef LLMDIST_CUDA_H
#define LLMDIST_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void *cudaStream_t;
typedef void *cudaEvent_t;

#define LLMD_CUDA_SUCCESS 0
#define LLMD_CUDA_ERROR_INVALID_VALUE 1
#define LLMD_CUDA_ERROR_MEMORY_ALLOCATION 2
#define LLMD_CUDA_ERROR_INSUFFICIENT_DRIVER 35
#define LLMD_CUDA_ERROR_NO_DEVICE 100
#define LLMD_CUDA_ERROR_NOT_READY 600
#define LLMD_CUDA_ERROR_NOT_SUPPORTED 801
#define LLMD_CUDA_STREAM_NON_BLOCKING 1u
#define LLMD_CUDA_EVENT_DISABLE_TIMING 2u
#define LLMD_CUDA_MEM_LOCATION_DEVICE 1
#define LLMD_CUDA_MEM_LOCATION_HOST 2
#define LLMD_CUDA_ACCESS_ORDER_STREAM 1
#define LLMD_CUDA_IPC_HANDLE_SIZE 64
#define LLMD_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS 1u

/* cudaIpcMemHandle_t: 64 opaque bytes, passed by value to cudaIpcOpenMemHandle. */
typedef struct { char reserved[LLMD_CUDA_IPC_HANDLE_SIZE]; } llmd_cudaIpcMemHandle_t;

typedef struct { int type; int id; } llmd_cudaMemLocation;

/* dim3: three unsigned ints, passed by value to cudaLaunchKernel. */
typedef struct { unsigned int x, y, z; } llmd_cuda_dim3;
typedef struct {
    int srcAccessOrder;
    llmd_cudaMemLocation srcLocHint;
    llmd_cudaMemLocation dstLocHint;
    unsigned int flags;
} llmd_cudaMemcpyAttributes;

/* cudaMemcpyBatchAsync changed in 13.0: the failIdx parameter went away. */
typedef int (*llmd_cudaMemcpyBatchAsync12_t)(void **dsts, void **srcs, size_t *sizes, size_t count,
                                            llmd_cudaMemcpyAttributes *attrs, size_t *attrsIdxs,
                                            size_t numAttrs, size_t *failIdx, cudaStream_t stream);
typedef int (*llmd_cudaMemcpyBatchAsync13_t)(void *const *dsts, const void *const *srcs,
                                            const size_t *sizes, size_t count,
                                            llmd_cudaMemcpyAttributes *attrs, size_t *attrsIdxs,
                                            size_t numAttrs, cudaStream_t stream);

typedef struct llmd_cuda_api {
    int (*cudaRuntimeGetVersion)(int *version);
    int (*cudaGetDeviceCount)(int *count);
    int (*cudaSetDevice)(int device);
    int (*cudaStreamCreateWithFlags)(cudaStream_t *stream, unsigned int flags);
    int (*cudaStreamDestroy)(cudaStream_t stream);
    int (*cudaStreamSynchronize)(cudaStream_t stream);
    int (*cudaStreamWaitEvent)(cudaStream_t stream, cudaEvent_t event, unsigned int flags);
    int (*cudaEventCreateWithFlags)(cudaEvent_t *event, unsigned int flags);
    int (*cudaEventDestroy)(cudaEvent_t event);
    int (*cudaEventRecord)(cudaEvent_t event, cudaStream_t stream);
    int (*cudaEventQuery)(cudaEvent_t event);
    int (*cudaEventSynchronize)(cudaEvent_t event);
    int (*cudaMalloc)(void **ptr, size_t size);
    int (*cudaFree)(void *ptr);
    int (*cudaMallocHost)(void **ptr, size_t size);
    int (*cudaFreeHost)(void *ptr);
    int (*cudaMemcpyAsync)(void *dst, const void *src, size_t count, int kind, cudaStream_t stream);
    const char *(*cudaGetErrorString)(int error);
    /* Optional (CUDA 12.8+); which prototype applies depends on the runtime version. */
    void *cudaMemcpyBatchAsync;
    /* Optional: device IPC (the exporter's handle covers its whole cudaMalloc allocation; the
     * importer opens it once and closes it before the exporter frees). */
    int (*cudaIpcGetMemHandle)(llmd_cudaIpcMemHandle_t *handle, void *devPtr);
    int (*cudaIpcOpenMemHandle)(void **devPtr, llmd_cudaIpcMemHandle_t handle, unsigned int flags);
    int (*cudaIpcCloseMemHandle)(void *devPtr);
    /* Optional (CUDA 12.0+): loading and launching the copy kernel. */
    int (*cudaLibraryLoadData)(void **library, const void *code, void *jitOptions,
                               void **jitOptionsValues, unsigned int numJitOptions,
                               void *libraryOptions, void **libraryOptionValues,
                               unsigned int numLibraryOptions);
    int (*cudaLibraryGetKernel)(void **kernel, void *library, const char *name);
    int (*cudaLibraryUnload)(void *library);
    int (*cudaLaunchKernel)(const void *func, llmd_cuda_dim3 gridDim, llmd_cuda_dim3 blockDim,
                            void **args, size_t sharedMem, cudaStream_t stream);
} llmd_cuda_api;

#ifdef __cplusplus
}
#endif
#endif
