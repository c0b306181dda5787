/* The CUDA copy kernel path: the kernel (src/cuda/copy_runs.cu, shipped as PTX) loaded at run
 * time and JIT-compiled by the driver, and per call a run table in device memory that each
 * layer's one launch applies to that layer's tensor pairs. Used by the CUDA runtime adapter for
 * device-to-device copies; anything it cannot do stays with DMA copies. */
#ifndef LLMDIST_CUDA_COPY_H
#define LLMDIST_CUDA_COPY_H

#include <stddef.h>
#include <stdint.h>

#include "llmdist/copy_kernel.h"
#include "llmdist/cuda.h"
#include "llmdist/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The loaded kernel. */
typedef struct llmd_cuda_copy_kernel {
    const llmd_cuda_api *api;
    void *library; /* cudaLibrary_t */
    void *kernel;  /* cudaKernel_t */
} llmd_cuda_copy_kernel;

/* A call's runs in device memory, and room for the tensor pairs of all its launches. The pieces
 * (runs split at LLMD_COPY_PIECE_BYTES) reach the device with the first launch, on its stream;
 * each launch stages its pairs in page-locked memory and copies them after the pieces, so
 * nothing is synchronized and nothing is allocated per layer. */
typedef struct llmd_cuda_copy_table {
    size_t npieces;
    size_t pair_capacity, pairs_used;
    uint64_t dst_extent; /* the highest dst_off + nbytes of the runs */
    int uploaded;        /* the pieces were queued to the device */
    size_t bytes;        /* of each buffer below that the table uses */
    size_t capacity;     /* of each buffer below */
    char *host;          /* page-locked: pieces, then pairs */
    char *device;        /* the same layout in device memory */
} llmd_cuda_copy_table;

/* Load ptx (NUL-terminated text) and find the kernel. Returns 0, or the CUDA error code with a
 * sentence in why (the step that failed and the runtime's text). */
int llmd_cuda_copy_kernel_load(llmd_cuda_copy_kernel *k, const llmd_cuda_api *api, const char *ptx,
                               char *why, size_t why_len);

/* A table for runs[0..count) and pair_capacity pairs in all, on the calling thread's current
 * device. */
int llmd_cuda_copy_table_create(const llmd_cuda_copy_kernel *k, const llmd_run *runs, size_t count,
                                size_t pair_capacity, llmd_cuda_copy_table **out);
/* Free a table once every stream that used it has been synchronized. */
void llmd_cuda_copy_table_destroy(const llmd_cuda_copy_kernel *k, llmd_cuda_copy_table *t);

/* One launch on stream: every run for each of pairs[0..npairs); no run may write past a pair's
 * dst_end. On failure *fail_pair names the pair (0 when the launch itself failed). */
int llmd_cuda_copy_launch(const llmd_cuda_copy_kernel *k, llmd_cuda_copy_table *t,
                          const llmd_tensor_pair *pairs, size_t npairs, void *stream,
                          size_t *fail_pair);

#ifdef __cplusplus
}
#endif
#endif
