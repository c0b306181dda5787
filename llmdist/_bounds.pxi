# Destination bounds: which registered region holds each destination tensor range.

cdef Py_ssize_t last_at_or_before(list keys, uint64_t x) except -2:
    """Position of the last of the sorted ints keys that is <= x, or -1."""
    cdef Py_ssize_t a = 0, b = len(keys), m
    while a < b:
        m = (a + b) // 2
        if <uint64_t>keys[m] <= x:
            a = m + 1
        else:
            b = m
    return a - 1


def locate(list firsts, list starts, list lasts, list regions, list addrs, uint64_t lo,
           uint64_t hi):
    """For each base address a, the region holding [a+lo, a+hi), in regions kept as sorted
    chunks (MemoryRegistry: firsts holds each chunk's first start; starts, lasts (last byte)
    and regions hold each chunk's disjoint regions in order). Returns (region per address,
    position of the first address that fits none, or -1)."""
    cdef Py_ssize_t n = len(addrs), i, c, k
    cdef uint64_t base, first, last, rlast
    cdef list cs
    out = [None] * n
    for i in range(n):
        base = addrs[i]
        first = base + lo
        last = base + hi
        if first < base or last < first:
            return out, i
        c = last_at_or_before(firsts, first)
        if c < 0:
            return out, i
        cs = starts[c]
        k = last_at_or_before(cs, first)
        rlast = (<list>lasts[c])[k]
        if first > rlast or (last != first and last - 1 > rlast):
            return out, i
        out[i] = (<list>regions[c])[k]
    return out, -1
