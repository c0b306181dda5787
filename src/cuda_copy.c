/* The CUDA copy kernel path (see include/llmdist/cuda_copy.h). */
#include "llmdist/cuda_copy.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

/* Buffers of finished calls, kept for the next ones: cudaMallocHost is slow and cudaFree may
 * wait for the whole device, neither of which belongs on a transfer's path. A process drives
 * one device, so the buffers are that device's. */
#define POOL_SLOTS 8
struct buffers {
    size_t bytes;
    char *host, *device;
};
static pthread_mutex_t g_pool_mu = PTHREAD_MUTEX_INITIALIZER;
static struct buffers g_pool[POOL_SLOTS];

/* Page-locked and device buffers of at least bytes: from the pool, else new. */
static int buffers_take(const llmd_cuda_api *api, size_t bytes, struct buffers *out)
{
    int best = -1;
    pthread_mutex_lock(&g_pool_mu);
    for (int i = 0; i < POOL_SLOTS; i++)
        if (g_pool[i].bytes >= bytes && (best < 0 || g_pool[i].bytes < g_pool[best].bytes))
            best = i;
    if (best >= 0) {
        *out = g_pool[best];
        memset(&g_pool[best], 0, sizeof g_pool[best]);
    }
    pthread_mutex_unlock(&g_pool_mu);
    if (best >= 0) return 0;
    size_t n = 64 * 1024;
    while (n < bytes) n *= 2;
    memset(out, 0, sizeof *out);
    int rc = api->cudaMallocHost((void **)&out->host, n);
    if (rc == 0) rc = api->cudaMalloc((void **)&out->device, n);
    if (rc != 0) {
        if (out->host) api->cudaFreeHost(out->host);
        memset(out, 0, sizeof *out);
        return rc;
    }
    out->bytes = n;
    return 0;
}

/* Back to the pool (no queued work may use them any more); the smallest are freed when full. */
static void buffers_give(const llmd_cuda_api *api, struct buffers b)
{
    pthread_mutex_lock(&g_pool_mu);
    int slot = 0; /* an empty slot, else the one holding the smallest buffers */
    for (int i = 0; i < POOL_SLOTS; i++) {
        if (!g_pool[i].bytes) {
            slot = i;
            break;
        }
        if (g_pool[i].bytes < g_pool[slot].bytes) slot = i;
    }
    struct buffers out = {0, NULL, NULL};
    if (g_pool[slot].bytes) { /* full: keep the bigger of the two */
        if (g_pool[slot].bytes < b.bytes) {
            out = g_pool[slot];
            g_pool[slot] = b;
        } else {
            out = b;
        }
    } else {
        g_pool[slot] = b;
    }
    pthread_mutex_unlock(&g_pool_mu);
    if (out.bytes) {
        api->cudaFree(out.device);
        api->cudaFreeHost(out.host);
    }
}

int llmd_cuda_copy_kernel_load(llmd_cuda_copy_kernel *k, const llmd_cuda_api *api, const char *ptx,
                               char *why, size_t why_len)
{
    memset(k, 0, sizeof *k);
    k->api = api;
    if (!api->cudaLibraryLoadData || !api->cudaLibraryGetKernel || !api->cudaLibraryUnload ||
        !api->cudaLaunchKernel) {
        snprintf(why, why_len, "the loaded libcudart has no cudaLibraryLoadData/cudaLaunchKernel "
                               "(CUDA 12.0 or newer is needed)");
        return LLMD_CUDA_ERROR_NOT_SUPPORTED;
    }
    int rc = api->cudaLibraryLoadData(&k->library, ptx, NULL, NULL, 0, NULL, NULL, 0);
    if (rc != 0) {
        snprintf(why, why_len, "cudaLibraryLoadData of the copy kernel's PTX failed: error %d: %s",
                 rc, api->cudaGetErrorString(rc));
        k->library = NULL;
        return rc;
    }
    rc = api->cudaLibraryGetKernel(&k->kernel, k->library, LLMD_COPY_KERNEL_NAME);
    if (rc != 0) {
        snprintf(why, why_len, "cudaLibraryGetKernel(%s) failed: error %d: %s",
                 LLMD_COPY_KERNEL_NAME, rc, api->cudaGetErrorString(rc));
        api->cudaLibraryUnload(k->library);
        k->library = k->kernel = NULL;
        return rc;
    }
    return 0;
}

int llmd_cuda_copy_table_create(const llmd_cuda_copy_kernel *k, const llmd_run *runs, size_t count,
                                size_t pair_capacity, llmd_cuda_copy_table **out)
{
    const llmd_cuda_api *api = k->api;
    size_t npieces = 0;
    uint64_t extent = 0;
    for (size_t r = 0; r < count; r++) {
        uint64_t n = runs[r].nbytes;
        npieces += (size_t)((n + LLMD_COPY_PIECE_BYTES - 1) / LLMD_COPY_PIECE_BYTES);
        if (runs[r].dst_off + n > extent) extent = runs[r].dst_off + n;
    }
    size_t pieces_bytes = round_up(npieces * sizeof(llmd_copy_piece), 256);
    size_t bytes = pieces_bytes + (pair_capacity ? pair_capacity : 1) * sizeof(llmd_copy_pair);
    llmd_cuda_copy_table *t = calloc(1, sizeof *t);
    if (!t) return LLMD_CUDA_ERROR_MEMORY_ALLOCATION;
    struct buffers b;
    int rc = buffers_take(api, bytes, &b);
    if (rc != 0) {
        free(t);
        return rc;
    }
    t->host = b.host;
    t->device = b.device;
    t->capacity = b.bytes;
    llmd_copy_piece *p = (llmd_copy_piece *)t->host;
    for (size_t r = 0; r < count; r++) {
        uint64_t s = runs[r].src_off, d = runs[r].dst_off, n = runs[r].nbytes;
        for (uint64_t off = 0; off < n; off += LLMD_COPY_PIECE_BYTES, p++) {
            p->src_off = s + off;
            p->dst_off = d + off;
            p->nbytes = n - off < LLMD_COPY_PIECE_BYTES ? n - off : LLMD_COPY_PIECE_BYTES;
        }
    }
    t->npieces = npieces;
    t->pair_capacity = pair_capacity;
    t->dst_extent = extent;
    t->bytes = bytes;
    *out = t;
    return 0;
}

void llmd_cuda_copy_table_destroy(const llmd_cuda_copy_kernel *k, llmd_cuda_copy_table *t)
{
    if (!t) return;
    struct buffers b = {t->capacity, t->host, t->device};
    buffers_give(k->api, b);
    free(t);
}

int llmd_cuda_copy_launch(const llmd_cuda_copy_kernel *k, llmd_cuda_copy_table *t,
                          const llmd_tensor_pair *pairs, size_t npairs, void *stream,
                          size_t *fail_pair)
{
    const llmd_cuda_api *api = k->api;
    *fail_pair = 0;
    if (npairs == 0 || t->npieces == 0) return 0;
    if (npairs > t->pair_capacity - t->pairs_used || npairs > 0xffffffffu ||
        t->npieces > 0x7fffffffu)
        return LLMD_CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < npairs; i++)
        if (pairs[i].dst + t->dst_extent > pairs[i].dst_end || pairs[i].dst + t->dst_extent < pairs[i].dst) {
            *fail_pair = i;
            return LLMD_CUDA_ERROR_INVALID_VALUE;
        }
    size_t pieces_bytes = t->bytes - t->pair_capacity * sizeof(llmd_copy_pair);
    int rc;
    if (!t->uploaded) {
        rc = api->cudaMemcpyAsync(t->device, t->host, pieces_bytes, LLMD_MEMCPY_H2D, stream);
        if (rc != 0) return rc;
        t->uploaded = 1;
    }
    /* this launch's share of the pair area: never reused within the call */
    size_t off = pieces_bytes + t->pairs_used * sizeof(llmd_copy_pair);
    llmd_copy_pair *hp = (llmd_copy_pair *)(t->host + off);
    for (size_t i = 0; i < npairs; i++) {
        hp[i].src = pairs[i].src;
        hp[i].dst = pairs[i].dst;
    }
    rc = api->cudaMemcpyAsync(t->device + off, hp, npairs * sizeof(llmd_copy_pair), LLMD_MEMCPY_H2D,
                              stream);
    if (rc != 0) return rc;
    t->pairs_used += npairs;
    unsigned long long pieces_arg = (unsigned long long)(uintptr_t)t->device;
    unsigned int npieces_arg = (unsigned int)t->npieces;
    unsigned long long pairs_arg = (unsigned long long)(uintptr_t)(t->device + off);
    unsigned int npairs_arg = (unsigned int)npairs;
    void *args[4] = {&pieces_arg, &npieces_arg, &pairs_arg, &npairs_arg};
    llmd_dim3 grid = {(unsigned)t->npieces,
                           (unsigned)(npairs < LLMD_COPY_MAX_GRID_Y ? npairs : LLMD_COPY_MAX_GRID_Y), 1};
    llmd_dim3 block = {LLMD_COPY_THREADS, 1, 1};
    return api->cudaLaunchKernel(k->kernel, grid, block, args, 0, stream);
}
