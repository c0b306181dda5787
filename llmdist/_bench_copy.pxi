# The benchmarks' copy-per-block baseline (llmdist.bench): one runtime copy per block, queued
# from a C loop (what a hand-written loop or vLLM's swap_blocks amounts to).

def bench_copy_each(Runtime runtime not None, list dsts, list srcs, size_t n,
                    Stream stream not None):
    """Queue one async copy of n bytes per (dst, src) pair on stream, from a C loop."""
    cdef Py_ssize_t i, count = len(dsts)
    cdef uintptr_t *d = <uintptr_t *>malloc(max(count, 1) * sizeof(uintptr_t))
    cdef uintptr_t *s = <uintptr_t *>malloc(max(count, 1) * sizeof(uintptr_t))
    cdef int rc = 0
    if d == NULL or s == NULL:
        free(d); free(s)
        raise MemoryError()
    try:
        for i in range(count):
            d[i] = dsts[i]
            s[i] = srcs[i]
        with nogil:
            for i in range(count):
                rc = runtime.rt.memcpy_async(runtime.rt.ctx, <void *>d[i], n,
                                             <const void *>s[i], n, LLMD_MEMCPY_DEFAULT,
                                             stream.handle)
                if rc != 0:
                    break
    finally:
        free(d)
        free(s)
    runtime.check(rc, "memcpy_async")
