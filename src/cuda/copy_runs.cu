// The device copy kernel: the runs of a run table applied to many (source, destination) tensor
// pairs in one launch. Parameters and launch shape: include/llmdist/copy_kernel.h.
// Compiled to PTX by tools/build_ptx.py (NVRTC, no CUDA toolkit needed); the PTX ships in the
// wheel and is JIT-compiled by the driver for the GPU at hand.
#include "llmdist/copy_kernel.h"

// Each thread copies every blockDim.x-th word of type T, reading through the read-only data
// cache (the source is never written by the same launch). The caller checked that both ends and
// the length are multiples of sizeof(T).
template <typename T>
__device__ __forceinline__ void copy_words(char *__restrict__ dst, const char *__restrict__ src,
                                           unsigned long long nbytes)
{
    T *d = reinterpret_cast<T *>(dst);
    const T *s = reinterpret_cast<const T *>(src);
    unsigned long long n = nbytes / sizeof(T);
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x)
        d[i] = __ldg(s + i);
}

extern "C" __global__ void __launch_bounds__(LLMD_COPY_THREADS)
llmd_copy_runs(const llmd_copy_piece *__restrict__ pieces, unsigned int npieces,
               const llmd_copy_pair *__restrict__ pairs, unsigned int npairs)
{
    if (blockIdx.x >= npieces)
        return;
    const llmd_copy_piece piece = pieces[blockIdx.x];
    for (unsigned int q = blockIdx.y; q < npairs; q += gridDim.y) {
        char *dst = reinterpret_cast<char *>(pairs[q].dst + piece.dst_off);
        const char *src = reinterpret_cast<const char *>(pairs[q].src + piece.src_off);
        // The widest word that both ends and the length are aligned to.
        unsigned long long a = pairs[q].dst + piece.dst_off;
        a |= pairs[q].src + piece.src_off;
        a |= piece.nbytes;
        if ((a & 15) == 0)
            copy_words<uint4>(dst, src, piece.nbytes);
        else if ((a & 7) == 0)
            copy_words<uint2>(dst, src, piece.nbytes);
        else if ((a & 3) == 0)
            copy_words<unsigned int>(dst, src, piece.nbytes);
        else
            copy_words<unsigned char>(dst, src, piece.nbytes);
    }
}
