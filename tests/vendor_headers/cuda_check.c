/* Checks include/llmdist/cuda.h against the vendor's CUDA runtime headers (from the
 * nvidia-cuda-runtime wheels): every function of our symbol list is assigned to its member of
 * our table with the vendor's types in place of our names for them (a signature mismatch is a
 * compile error), cudaMemcpyBatchAsync to the prototype this header's version calls for, and
 * struct layouts and constants are compared. Built and run by tests/test_vendor_headers.py. */
#include <stddef.h>
#include <stdio.h>

#include <cuda_runtime_api.h>

#define LLMD_CUDA_VENDOR_TYPES
typedef cudaError_t llmd_cudaError_t;
typedef cudaStream_t llmd_cudaStream_t;
typedef cudaEvent_t llmd_cudaEvent_t;
typedef enum cudaMemcpyKind llmd_cudaMemcpyKind;
typedef cudaIpcMemHandle_t llmd_cudaIpcMemHandle_t;
typedef struct cudaMemcpyAttributes llmd_cudaMemcpyAttributes;
typedef cudaLibrary_t llmd_cudaLibrary_t;
typedef cudaKernel_t llmd_cudaKernel_t;
typedef enum cudaJitOption llmd_cudaJitOption;
typedef enum cudaLibraryOption llmd_cudaLibraryOption;
typedef dim3 llmd_dim3;
#include "llmdist/cuda.h"

#define SAME(a, b) _Static_assert((long long)(a) == (long long)(b), #a " != " #b)
/* Our declarations pass enums as int and handles as void *: same sizes, same convention. */
#define INT_ENUM(e) _Static_assert(sizeof(e) == sizeof(int), #e " is not int-sized")

INT_ENUM(cudaError_t);
INT_ENUM(enum cudaMemcpyKind);
INT_ENUM(enum cudaMemLocationType);
INT_ENUM(enum cudaMemcpySrcAccessOrder);
SAME(sizeof(cudaStream_t), sizeof(void *));
SAME(sizeof(cudaEvent_t), sizeof(void *));

SAME(sizeof(struct llmd_cuda_ipc_mem_handle), sizeof(cudaIpcMemHandle_t));
SAME(sizeof(struct llmd_cuda_dim3), sizeof(dim3));
SAME(offsetof(struct llmd_cuda_dim3, x), offsetof(dim3, x));
SAME(offsetof(struct llmd_cuda_dim3, y), offsetof(dim3, y));
SAME(offsetof(struct llmd_cuda_dim3, z), offsetof(dim3, z));
SAME(sizeof(struct llmd_cuda_mem_location), sizeof(struct cudaMemLocation));
SAME(offsetof(struct llmd_cuda_mem_location, type), offsetof(struct cudaMemLocation, type));
SAME(offsetof(struct llmd_cuda_mem_location, id), offsetof(struct cudaMemLocation, id));
SAME(sizeof(struct llmd_cuda_memcpy_attributes), sizeof(struct cudaMemcpyAttributes));
SAME(offsetof(struct llmd_cuda_memcpy_attributes, srcAccessOrder),
     offsetof(struct cudaMemcpyAttributes, srcAccessOrder));
SAME(offsetof(struct llmd_cuda_memcpy_attributes, srcLocHint),
     offsetof(struct cudaMemcpyAttributes, srcLocHint));
SAME(offsetof(struct llmd_cuda_memcpy_attributes, dstLocHint),
     offsetof(struct cudaMemcpyAttributes, dstLocHint));
SAME(offsetof(struct llmd_cuda_memcpy_attributes, flags), offsetof(struct cudaMemcpyAttributes, flags));

SAME(LLMD_MEMCPY_H2H, cudaMemcpyHostToHost);
SAME(LLMD_MEMCPY_H2D, cudaMemcpyHostToDevice);
SAME(LLMD_MEMCPY_D2H, cudaMemcpyDeviceToHost);
SAME(LLMD_MEMCPY_D2D, cudaMemcpyDeviceToDevice);
SAME(LLMD_MEMCPY_DEFAULT, cudaMemcpyDefault);
SAME(LLMD_CUDA_SUCCESS, cudaSuccess);
SAME(LLMD_CUDA_ERROR_INVALID_VALUE, cudaErrorInvalidValue);
SAME(LLMD_CUDA_ERROR_MEMORY_ALLOCATION, cudaErrorMemoryAllocation);
SAME(LLMD_CUDA_ERROR_NOT_READY, cudaErrorNotReady);
SAME(LLMD_CUDA_ERROR_NOT_SUPPORTED, cudaErrorNotSupported);
SAME(LLMD_CUDA_STREAM_NON_BLOCKING, cudaStreamNonBlocking);
SAME(LLMD_CUDA_EVENT_DISABLE_TIMING, cudaEventDisableTiming);
SAME(LLMD_CUDA_MEM_LOCATION_DEVICE, cudaMemLocationTypeDevice);
SAME(LLMD_CUDA_MEM_LOCATION_HOST, cudaMemLocationTypeHost);
SAME(LLMD_CUDA_ACCESS_ORDER_STREAM, cudaMemcpySrcAccessOrderStream);
SAME(LLMD_CUDA_IPC_HANDLE_SIZE, CUDA_IPC_HANDLE_SIZE);
SAME(LLMD_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS, cudaIpcMemLazyEnablePeerAccess);

/* Each vendor function into our table's member of the same name. The references are weak:
 * nothing is linked, the program only runs the checks in main. */
#define PRAGMA(text) _Pragma(#text)
#define WEAK(group, ret, name, params) PRAGMA(weak name)
LLMD_CUDA_SYMBOLS(WEAK)
#pragma weak cudaMemcpyBatchAsync

void llmd_cuda_check(llmd_cuda_api *api)
{
#define ASSIGN(group, ret, name, params) api->name = name;
    LLMD_CUDA_SYMBOLS(ASSIGN)
#if CUDART_VERSION >= LLMD_CUDA_BATCH_V13_VERSION
    llmd_cudaMemcpyBatchAsync13_t batch = cudaMemcpyBatchAsync;
#else
    llmd_cudaMemcpyBatchAsync12_t batch = cudaMemcpyBatchAsync;
#endif
    api->cudaMemcpyBatchAsync = (void *)batch;
}

int main(void)
{
    printf("ok %d\n", CUDART_VERSION);
    return 0;
}
