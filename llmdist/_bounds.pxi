# Destination bounds: which registered region holds each destination tensor range.

from cpython cimport array


cdef inline Py_ssize_t last_at_or_before(const unsigned long long *keys, Py_ssize_t n,
                                         uint64_t x) noexcept nogil:
    """Position of the last of the n sorted keys that is <= x, or -1."""
    cdef Py_ssize_t a = 0, b = n, m
    while a < b:
        m = (a + b) // 2
        if keys[m] <= x:
            a = m + 1
        else:
            b = m
    return a - 1


def locate(array.array firsts not None, list starts, list lasts, list regions, list addrs,
           uint64_t lo, uint64_t hi):
    """For each base address a, the region holding [a+lo, a+hi), in regions kept as sorted
    chunks (MemoryRegistry: firsts holds each chunk's first start; starts, lasts (last byte)
    and regions hold each chunk's disjoint regions in order; firsts, starts and lasts are
    array('Q'), so that the searches read C integers). Returns (region per address, position
    of the first address that fits none, or -1)."""
    cdef Py_ssize_t n = len(addrs), i, c, k
    cdef uint64_t base, first, last, rlast
    cdef array.array cs, cl
    out = [None] * n
    for i in range(n):
        base = addrs[i]
        first = base + lo
        last = base + hi
        if first < base or last < first:
            return out, i
        c = last_at_or_before(firsts.data.as_ulonglongs, len(firsts), first)
        if c < 0:
            return out, i
        cs = <array.array>starts[c]
        cl = <array.array>lasts[c]
        k = last_at_or_before(cs.data.as_ulonglongs, len(cs), first)
        rlast = cl.data.as_ulonglongs[k]
        if first > rlast or (last != first and last - 1 > rlast):
            return out, i
        out[i] = (<list>regions[c])[k]
    return out, -1
