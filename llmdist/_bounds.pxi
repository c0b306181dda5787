# Destination bounds: which registered region holds each destination tensor range.

def locate(const uint64_t[::1] starts, const uint64_t[::1] ends, list addrs,
           size_t lo, size_t hi):
    """For each base address a, find the region (sorted, disjoint [starts, ends)) holding
    [a+lo, a+hi). Returns (region index per address, position of the first address that fits
    none or -1)."""
    cdef Py_ssize_t n = len(addrs), nreg = starts.shape[0], i, a, b, m
    cdef uint64_t base, first, last
    out = [None] * n
    for i in range(n):
        base = addrs[i]
        first = base + lo
        last = base + hi
        if first < base or last < first:
            return out, i
        a = 0
        b = nreg
        while a < b:                       # the last region starting at or before first
            m = (a + b) // 2
            if starts[m] <= first:
                a = m + 1
            else:
                b = m
        if a == 0 or last > ends[a - 1] or first >= ends[a - 1]:
            return out, i
        out[i] = a - 1
    return out, -1
