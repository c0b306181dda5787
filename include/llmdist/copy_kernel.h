/* The CUDA copy kernel's parameters: written once, read by the kernel source
 * (src/cuda/copy_runs.cu, compiled to PTX by NVRTC), by the CUDA runtime adapter that launches
 * it, and by the fake libcudart of the tests that runs its semantics on host memory.
 * Plain C without includes, since NVRTC has no standard headers.
 *
 * Kernel: llmd_copy_runs(const llmd_copy_piece *pieces, unsigned int npieces,
 *                        const llmd_copy_pair *pairs, unsigned int npairs)
 * Thread block (x, y) copies piece x for the pairs y, y + gridDim.y, y + 2 * gridDim.y, ...:
 * nbytes from pairs[q].src + src_off to pairs[q].dst + dst_off. Launch it with
 * gridDim = (npieces, min(npairs, LLMD_COPY_MAX_GRID_Y), 1) and
 * blockDim = (LLMD_COPY_THREADS, 1, 1). */
#ifndef LLMDIST_COPY_KERNEL_H
#define LLMDIST_COPY_KERNEL_H

#define LLMD_COPY_KERNEL_NAME "llmd_copy_runs"
#define LLMD_COPY_THREADS 256
/* Runs longer than this are split into pieces, one thread block each, so that one long run is
 * spread over several multiprocessors. */
#define LLMD_COPY_PIECE_BYTES 8192
/* The most thread blocks along y that a launch may ask for. */
#define LLMD_COPY_MAX_GRID_Y 65535

/* One piece of a run: offsets from the pair's base addresses. */
typedef struct llmd_copy_piece {
    unsigned long long src_off;
    unsigned long long dst_off;
    unsigned long long nbytes;
} llmd_copy_piece;

/* One tensor pair: the source and destination base addresses. */
typedef struct llmd_copy_pair {
    unsigned long long src;
    unsigned long long dst;
} llmd_copy_pair;

#endif
