# Synchronous local copies: the engine behind copy_blocks, copy_cache and swap_blocks.
# A plan's runs are applied to pairs of tensor bases (source i -> destination i), queued on a
# stream of the runtime that owns the memory and waited for. Host memory a device runtime
# cannot copy asynchronously (pageable memory the caller owns) goes through a page-locked
# staging buffer.


def plan_one(size_t src_off, size_t dst_off, size_t nbytes):
    """One run: nbytes from src_off to dst_off of each tensor (copy_cache's row copy)."""
    cdef Plan p = Plan.__new__(Plan)
    p.reserve(1)
    p.add(src_off, dst_off, nbytes)
    p.finish()
    return p


cdef int fill_pairs(Plan plan, list src_bases, list dst_bases, void **d, void **s,
                    size_t *n) except -1:
    """Descriptors of every run of every pair, pair by pair."""
    cdef Py_ssize_t i, r, k = 0
    cdef uintptr_t sb, db
    for i in range(len(src_bases)):
        sb = src_bases[i]
        db = dst_bases[i]
        for r in range(plan.count):
            s[k] = <void *>(sb + plan.runs[r].src_off)
            d[k] = <void *>(db + plan.runs[r].dst_off)
            n[k] = plan.runs[r].nbytes
            k += 1
    return 0


cdef int run_and_wait(const llmd_runtime *rt, const llmd_run *runs, size_t nruns,
                      const llmd_tensor_pair *pairs, size_t npairs, int kind,
                      llmd_stream stream) noexcept nogil:
    """Queue runs over pairs on stream (copy_runs, with a run table made for this call), wait
    for them, and return the first failure's code."""
    cdef llmd_run_table *table = NULL
    cdef size_t fail = 0
    cdef int rc, rc_sync
    if nruns == 0 or npairs == 0:
        return 0
    rc = rt.run_table_create(rt.ctx, runs, nruns, npairs, &table)
    if rc != 0:
        return rc
    rc = rt.copy_runs(rt.ctx, table, pairs, npairs, kind, 0, stream, &fail)
    rc_sync = rt.stream_synchronize(rt.ctx, stream)
    rt.run_table_destroy(rt.ctx, table)
    return rc if rc != 0 else rc_sync


def copy_pairs(Runtime runtime not None, Stream stream not None, Plan plan not None,
               list src_bases, list dst_bases, CopyKind kind, str op):
    """Copy plan's runs from each src_bases[i] to dst_bases[i] on stream and wait until they
    have landed. The single place the block operations issue copies from. Raises the
    runtime's error (named after op) after waiting for whatever was queued."""
    cdef Py_ssize_t i, npairs = len(src_bases)
    cdef llmd_tensor_pair *pairs
    cdef const llmd_runtime *rt = runtime.rt
    cdef llmd_stream h = stream.handle
    cdef int rc = 0
    if len(dst_bases) != npairs:
        raise ValueError("copy_pairs needs as many destination bases as source bases")
    pairs = <llmd_tensor_pair *>malloc(max(npairs, 1) * sizeof(llmd_tensor_pair))
    if pairs == NULL:
        raise MemoryError()
    try:
        for i in range(npairs):
            pairs[i].src = src_bases[i]
            pairs[i].dst = dst_bases[i]
            pairs[i].dst_end = pairs[i].dst + plan.dst_hi    # the caller checked the bounds
        with nogil:
            rc = run_and_wait(rt, plan.runs, plan.count, pairs, npairs, kind, h)
    finally:
        free(pairs)
    runtime.check(rc, op)


def copy_pairs_staged(Runtime runtime not None, Stream stream not None, Plan plan not None,
                      list src_bases, list dst_bases, bint to_device, uintptr_t staging,
                      size_t staging_size, str op):
    """copy_pairs between device memory and host memory the runtime cannot copy to or from
    asynchronously: pieces of at most staging_size bytes go through the page-locked buffer at
    staging (host -> staging -> device, or device -> staging -> host), one round at a time."""
    cdef Py_ssize_t total = len(src_bases) * plan.count, k, j
    cdef void **d = <void **>malloc(max(total, 1) * sizeof(void *))
    cdef void **s = <void **>malloc(max(total, 1) * sizeof(void *))
    cdef size_t *n = <size_t *>malloc(max(total, 1) * sizeof(size_t))
    # per round: one piece descriptor per run piece (at most total + pieces of split runs)
    cdef void **pd = NULL
    cdef void **ps = NULL
    cdef size_t *pn = NULL
    cdef size_t *hoff = NULL     # where each piece sits in the staging buffer
    cdef llmd_run *pieces = NULL # the round's pieces as runs from address 0 (one pair of bases 0)
    cdef llmd_tensor_pair whole
    cdef void **hptr = NULL      # the host end of each piece
    cdef const llmd_runtime *rt = runtime.rt
    cdef llmd_stream h = stream.handle
    cdef int rc = 0
    cdef int kind = COPY_H2D if to_device else COPY_D2H
    cdef size_t done, used, piece
    cdef Py_ssize_t np
    if staging_size == 0:
        raise ValueError("staging buffer is empty")
    try:
        if d == NULL or s == NULL or n == NULL:
            raise MemoryError()
        fill_pairs(plan, src_bases, dst_bases, d, s, n)
        pd = <void **>malloc(max(total, 1) * sizeof(void *))
        ps = <void **>malloc(max(total, 1) * sizeof(void *))
        pn = <size_t *>malloc(max(total, 1) * sizeof(size_t))
        hoff = <size_t *>malloc(max(total, 1) * sizeof(size_t))
        hptr = <void **>malloc(max(total, 1) * sizeof(void *))
        pieces = <llmd_run *>malloc(max(total, 1) * sizeof(llmd_run))
        if (pd == NULL or ps == NULL or pn == NULL or hoff == NULL or hptr == NULL
                or pieces == NULL):
            raise MemoryError()
        whole.src = whole.dst = 0
        whole.dst_end = <uint64_t>-1
        with nogil:
            k = 0
            done = 0                 # bytes of run k already moved
            while k < total and rc == 0:
                # gather pieces until the staging buffer is full
                np = 0
                used = 0
                while k < total and used < staging_size:
                    piece = min(n[k] - done, staging_size - used)
                    if to_device:
                        hptr[np] = <char *>s[k] + done
                        pd[np] = <char *>d[k] + done
                    else:
                        hptr[np] = <char *>d[k] + done
                        ps[np] = <char *>s[k] + done
                    hoff[np] = used
                    pn[np] = piece
                    used += piece
                    done += piece
                    np += 1
                    if done == n[k]:
                        k += 1
                        done = 0
                if to_device:
                    for j in range(np):
                        llmd_host_copy(<char *>staging + hoff[j], hptr[j], pn[j])
                        ps[j] = <char *>staging + hoff[j]
                else:
                    for j in range(np):
                        pd[j] = <char *>staging + hoff[j]
                for j in range(np):
                    pieces[j].src_off = <uintptr_t>ps[j]
                    pieces[j].dst_off = <uintptr_t>pd[j]
                    pieces[j].nbytes = pn[j]
                rc = run_and_wait(rt, pieces, np, &whole, 1, kind, h)
                if rc == 0 and not to_device:
                    for j in range(np):
                        llmd_host_copy(hptr[j], <char *>staging + hoff[j], pn[j])
    finally:
        free(d); free(s); free(n)
        free(pd); free(ps); free(pn); free(hoff); free(hptr); free(pieces)
    runtime.check(rc, op)


cdef struct Span:
    uint64_t lo
    uint64_t hi
    int is_dst


cdef int cmp_span(const void *a, const void *b) noexcept nogil:
    return cmp_u64(&(<const Span *>a).lo, &(<const Span *>b).lo)


def find_overlap(Plan plan not None, list src_bases, list dst_bases):
    """Whether the copies of plan over these pairs read and write overlapping bytes: None when
    they do not, "source" when a destination range overlaps a source range, "destination" when
    two destination ranges overlap (their result would depend on the copy order)."""
    cdef Py_ssize_t npairs = len(src_bases), total = 2 * npairs * plan.count, i, r, k = 0
    cdef Span *spans = <Span *>malloc(max(total, 1) * sizeof(Span))
    cdef uint64_t sb, db, max_src = 0, max_dst = 0
    cdef int found = 0
    if spans == NULL:
        raise MemoryError()
    try:
        for i in range(npairs):
            sb = src_bases[i]
            db = dst_bases[i]
            for r in range(plan.count):
                spans[k].lo = sb + plan.runs[r].src_off
                spans[k].hi = spans[k].lo + plan.runs[r].nbytes
                spans[k].is_dst = 0
                spans[k + 1].lo = db + plan.runs[r].dst_off
                spans[k + 1].hi = spans[k + 1].lo + plan.runs[r].nbytes
                spans[k + 1].is_dst = 1
                k += 2
        with nogil:
            qsort(spans, total, sizeof(Span), cmp_span)
            # sorted by start: a span overlaps an earlier one exactly when some earlier span
            # of that kind ends after this one starts
            for k in range(total):
                if spans[k].is_dst:
                    if max_src > spans[k].lo:
                        found = 1
                        break
                    if max_dst > spans[k].lo:
                        found = 2
                        break
                    max_dst = max(max_dst, spans[k].hi)
                else:
                    if max_dst > spans[k].lo:
                        found = 1
                        break
                    max_src = max(max_src, spans[k].hi)
    finally:
        free(spans)
    return (None, "source", "destination")[found]
