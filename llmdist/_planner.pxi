# The planner: one call's run template, (src_off, dst_off, nbytes) per tensor, consecutive
# pieces merged, shared by every layer and config.

# The planner

cdef class Plan:
    """The run template of one call: (src_offset, dst_offset, nbytes) per tensor, consecutive
    pieces merged. Offsets are from the tensor bases; every layer and config reuses it."""

    def __cinit__(self):
        self.runs = NULL
        self.count = 0

    def __dealloc__(self):
        free(self.runs)

    cdef int reserve(self, Py_ssize_t n) except -1:
        self.runs = <Run *>malloc(max(n, 1) * sizeof(Run))
        if self.runs == NULL:
            raise MemoryError()
        return 0

    cdef void add(self, size_t src_off, size_t dst_off, size_t nbytes) noexcept nogil:
        cdef Run *last
        if nbytes == 0:
            return
        if self.count > 0:
            last = &self.runs[self.count - 1]
            if last.src_off + last.nbytes == src_off and last.dst_off + last.nbytes == dst_off:
                last.nbytes += nbytes
                return
        self.runs[self.count].src_off = src_off
        self.runs[self.count].dst_off = dst_off
        self.runs[self.count].nbytes = nbytes
        self.count += 1

    cdef void finish(self) noexcept nogil:
        cdef Py_ssize_t i
        self.dst_lo = self.src_lo = <size_t>-1
        self.dst_hi = self.src_hi = 0
        self.nbytes = 0
        for i in range(self.count):
            self.nbytes += self.runs[i].nbytes
            self.dst_lo = min(self.dst_lo, self.runs[i].dst_off)
            self.dst_hi = max(self.dst_hi, self.runs[i].dst_off + self.runs[i].nbytes)
            self.src_lo = min(self.src_lo, self.runs[i].src_off)
            self.src_hi = max(self.src_hi, self.runs[i].src_off + self.runs[i].nbytes)
        if self.count == 0:
            self.dst_lo = self.src_lo = 0

    @property
    def runs(self):
        """The runs as a list of (src_offset, dst_offset, nbytes), for tests and tools."""
        return [(self.runs[i].src_off, self.runs[i].dst_off, self.runs[i].nbytes)
                for i in range(self.count)]


def plan_c2c(size_t nbytes):
    """Contiguous to contiguous: one row of nbytes (the source row offset is per config)."""
    cdef Plan p = Plan.__new__(Plan)
    p.reserve(1)
    p.add(0, 0, nbytes)
    p.finish()
    return p


cdef inline bint block_fits(uint64_t index, size_t block_bytes) noexcept nogil:
    """True when block index's byte range [index*B, index*B + B) fits in 64 bits."""
    return block_bytes == 0 or index <= (U64_MAX - block_bytes) // block_bytes


# Plans of fewer pairs are made holding the GIL: they take microseconds, and a GIL given up
# goes to any busy Python thread for its whole switch interval (5 ms by default) before this
# one gets it back.
cdef Py_ssize_t PLAN_RELEASE_GIL_PAIRS = 1 << 16


cdef object overflow_error(str name, Indices idx, size_t block_bytes):
    return LLMException(f"{name} holds block {idx.max_value}: at {block_bytes} bytes per block "
                        f"its offset does not fit the address space",
                        status_code=LLMStatusCode.LLM_PARAM_INVALID)


cdef void fill_c2b(Plan p, Indices dst_blocks, size_t row_bytes,
                   size_t block_bytes) noexcept nogil:
    cdef Py_ssize_t j
    cdef size_t off, n
    # every block fits when the largest does (one division, not one per block)
    if not block_fits(dst_blocks.max_value_c, block_bytes):
        p.overflow = True
        p.finish()
        return
    for j in range(dst_blocks.size):
        off = <size_t>j * block_bytes
        n = min(block_bytes, row_bytes - off)
        p.add(off, <size_t>dst_blocks.data[j] * block_bytes, n)
    p.finish()


def plan_c2b(Indices dst_blocks not None, size_t row_bytes, size_t block_bytes):
    """Contiguous row to blocks: chunk j of the row (block_bytes each, the last may be
    shorter) goes to destination block dst_blocks[j]."""
    cdef Plan p = Plan.__new__(Plan)
    p.reserve(dst_blocks.size)
    if dst_blocks.size >= PLAN_RELEASE_GIL_PAIRS:
        with nogil:
            fill_c2b(p, dst_blocks, row_bytes, block_bytes)
    else:
        fill_c2b(p, dst_blocks, row_bytes, block_bytes)
    if p.overflow:
        raise overflow_error("dst_block_indices", dst_blocks, block_bytes)
    return p


cdef struct Pair:
    uint64_t src
    uint64_t dst


cdef int cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0], y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef void sort_by_src(Pair *a, Pair *tmp, Py_ssize_t n) noexcept nogil:
    """Stable sort of a[0:n] by src (tmp: scratch for n pairs): least significant byte first,
    one counting pass per byte that some src has set (two for pools under 65536 blocks). A
    comparison sort mispredicts about every other branch on shuffled block indices."""
    cdef size_t count[256]
    cdef size_t total, c
    cdef uint64_t all_bits = 0
    cdef unsigned int shift = 0
    cdef Py_ssize_t j, b
    cdef Pair *src = a
    cdef Pair *dst = tmp
    cdef Pair *swap
    for j in range(n):
        all_bits |= a[j].src
    while shift < 64 and (all_bits >> shift) != 0:
        memset(count, 0, sizeof(count))
        for j in range(n):
            count[(src[j].src >> shift) & 0xFF] += 1
        total = 0
        for b in range(256):
            c = count[b]
            count[b] = total
            total += c
        for j in range(n):
            b = (src[j].src >> shift) & 0xFF
            dst[count[b]] = src[j]
            count[b] += 1
        swap = src
        src = dst
        dst = swap
        shift += 8
    if src != a:
        memcpy(a, src, n * sizeof(Pair))


cdef inline int popcount64(uint64_t x) noexcept nogil:
    """The set bits of x, inline: the builtin is a library call where the baseline x86-64
    target the wheels build for has no popcnt instruction."""
    x = x - ((x >> 1) & 0x5555555555555555ULL)
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL
    return <int>((x * 0x0101010101010101ULL) >> 56)


# Index sets at most this many times denser than their largest value use a bitmap (one bit per
# possible index, so at most 8 bytes per index) instead of a radix sort.
cdef uint64_t BITMAP_SPREAD = 64


cdef int by_bitmap(Pair *a, Pair *out, Py_ssize_t n, uint64_t max_value,
                   bint key_is_src) noexcept nogil:
    """Order a[0:n] by their src (key_is_src) or only check their dst for repeats, with a bitmap
    of the keys: 1 when the keys are distinct (and, for src, a is sorted by it through out,
    scratch for n pairs), 0 when some key repeats (a untouched), -1 when memory ran out."""
    cdef Py_ssize_t j, words = <Py_ssize_t>(max_value >> 6) + 1
    cdef uint64_t *bits = <uint64_t *>calloc(words, sizeof(uint64_t))
    cdef size_t *rank = NULL
    cdef uint64_t k, m
    cdef size_t total = 0
    if bits == NULL:
        return -1
    for j in range(n):
        k = a[j].src if key_is_src else a[j].dst
        m = (<uint64_t>1) << (k & 63)
        if bits[k >> 6] & m:
            free(bits)
            return 0
        bits[k >> 6] |= m
    if key_is_src:
        rank = <size_t *>malloc(words * sizeof(size_t))
        if rank == NULL:
            free(bits)
            return -1
        for j in range(words):
            rank[j] = total
            total += popcount64(bits[j])
        for j in range(n):
            k = a[j].src
            out[rank[k >> 6] + popcount64(bits[k >> 6] & (((<uint64_t>1) << (k & 63)) - 1))] = a[j]
        memcpy(a, out, n * sizeof(Pair))
        free(rank)
    free(bits)
    return 1


cdef bint all_distinct(const uint64_t *values, Py_ssize_t n, Pair *work) noexcept nogil:
    """True when no value repeats: sorted in work (scratch for 2n pairs), then compared."""
    cdef Py_ssize_t j
    for j in range(n):
        work[j].src = values[j]
        work[j].dst = 0
    sort_by_src(work, work + n, n)
    for j in range(1, n):
        if work[j].src == work[j - 1].src:
            return False
    return True


cdef void fill_b2b(Plan p, Pair *pairs, Pair *work, Indices src_blocks, Indices dst_blocks,
                   Py_ssize_t n, size_t block_bytes) noexcept nogil:
    cdef Py_ssize_t j
    cdef int distinct, ordered
    # every block fits when the largest of each list does (one division each, not two per pair)
    if not (block_fits(src_blocks.max_value_c, block_bytes)
            and block_fits(dst_blocks.max_value_c, block_bytes)):
        p.overflow = True
        p.finish()
        return
    for j in range(n):
        pairs[j].src = src_blocks.data[j]
        pairs[j].dst = dst_blocks.data[j]
    p.dst_distinct = True
    if n > 1:
        # distinct destinations: take the pairs in source order (a bitmap of the indices
        # when they are dense enough, else radix sorts)
        distinct = -1
        if dst_blocks.max_value_c <= BITMAP_SPREAD * <uint64_t>n:
            distinct = by_bitmap(pairs, work, n, dst_blocks.max_value_c, False)
        if distinct < 0:
            distinct = all_distinct(dst_blocks.data, n, work)
        p.dst_distinct = distinct == 1
        if distinct:
            ordered = 0
            if src_blocks.max_value_c <= BITMAP_SPREAD * <uint64_t>n:
                ordered = by_bitmap(pairs, work, n, src_blocks.max_value_c, True)
            if ordered != 1:
                sort_by_src(pairs, work, n)
    for j in range(n):
        p.add(<size_t>pairs[j].src * block_bytes, <size_t>pairs[j].dst * block_bytes,
              block_bytes)
    p.finish()


def plan_b2b(Indices src_blocks not None, Indices dst_blocks not None, size_t block_bytes):
    """Blocks to blocks: source block s[j] goes to destination block d[j]; runs where both
    advance by one become one copy. When no destination block repeats, the pairs are taken in
    source order, which reads memory more sequentially (and the order of copies to distinct
    blocks does not matter)."""
    cdef Plan p = Plan.__new__(Plan)
    cdef Py_ssize_t n = src_blocks.size
    cdef Pair *pairs = <Pair *>malloc(max(3 * n, 1) * sizeof(Pair))     # the pairs, then scratch
    cdef Pair *work = pairs + n
    if pairs == NULL:
        raise MemoryError()
    p.reserve(n)
    if n >= PLAN_RELEASE_GIL_PAIRS:
        with nogil:
            fill_b2b(p, pairs, work, src_blocks, dst_blocks, n, block_bytes)
    else:
        fill_b2b(p, pairs, work, src_blocks, dst_blocks, n, block_bytes)
    free(pairs)
    if p.overflow:
        raise overflow_error("dst_block_indices", dst_blocks, block_bytes)
    return p
