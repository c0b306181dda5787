# Index lists: validated uint64 block indices held as C arrays.

cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF


cdef class Indices:
    """A validated list of uint64 indices held as a C array."""

    def __cinit__(self):
        self.data = NULL
        self.size = 0

    def __dealloc__(self):
        free(self.data)

    def __len__(self):
        return self.size

    def tolist(self):
        return [self.data[i] for i in range(self.size)]


cdef extern from "Python.h":
    # The list's or tuple's item array (borrowed references), and the conversion without
    # Cython's exception check, so that the loop below needs no try block per element.
    PyObject **PySequence_Fast_ITEMS(object seq)
    unsigned long long int_to_u64 "PyLong_AsUnsignedLongLong"(PyObject *item) noexcept
    PyObject *PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept
    PyTypeObject *type_of "Py_TYPE"(PyObject *item) noexcept
    PyTypeObject PyLong_Type


def parse_indices(str name, object seq):
    """Check that seq is a list/tuple of uint64 and copy it into an Indices.

    TypeError for a wrong container or element type (bool included), ValueError for a value
    outside [0, 2**64-1]; messages name the parameter and the element."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{name} only support [list, tuple], but got {type(seq)}")
    cdef Py_ssize_t n = len(seq), i
    cdef Indices out = Indices.__new__(Indices)
    cdef uint64_t v, vmax = 0
    cdef PyObject **items = PySequence_Fast_ITEMS(seq)
    cdef PyObject *item
    out.data = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
    if out.data == NULL:
        raise MemoryError()
    out.size = n
    for i in range(n):
        item = items[i]
        # C type checks (Cython's isinstance on int and bool reads no __class__): no Python
        # code runs in this loop, so items stays valid
        if type_of(item) != &PyLong_Type:
            if not isinstance(<object>item, int) or isinstance(<object>item, bool):
                raise TypeError(f"{name}[{i}] only support [int], but got {type(<object>item)}")
        v = int_to_u64(item)    # checks the range itself and calls no Python code
        if v == U64_MAX and PyErr_Occurred() != NULL:  # negative, or above 2**64-1
            PyErr_Clear()
            raise ValueError(f"{name}[{i}] must be in [0, {U64_MAX}], but got {<object>item}")
        out.data[i] = v
        if v > vmax:
            vmax = v
    out.max_value = vmax if n else None
    out.max_value_c = vmax
    return out


ctypedef struct IndexAt:
    uint64_t value
    Py_ssize_t pos


cdef int cmp_index_at(const void *a, const void *b) noexcept nogil:
    cdef const IndexAt *x = <const IndexAt *>a
    cdef const IndexAt *y = <const IndexAt *>b
    if x.value != y.value:
        return -1 if x.value < y.value else 1
    return -1 if x.pos < y.pos else (1 if x.pos > y.pos else 0)


cdef Py_ssize_t first_repeat_sorted(const uint64_t *data, Py_ssize_t n) except -2:
    # Sorted by (value, position): in each run of one value, the second position is where that
    # value first repeats; the earliest of those is the answer.
    cdef IndexAt *at = <IndexAt *>malloc(max(n, 1) * sizeof(IndexAt))
    cdef Py_ssize_t i, best = -1
    if at == NULL:
        raise MemoryError()
    for i in range(n):
        at[i].value = data[i]
        at[i].pos = i
    qsort(at, n, sizeof(IndexAt), cmp_index_at)
    for i in range(1, n):
        if at[i].value == at[i - 1].value and (i < 2 or at[i - 1].value != at[i - 2].value):
            if best < 0 or at[i].pos < best:
                best = at[i].pos
    free(at)
    return best


def repeated_index(Indices idx not None):
    """The first index of idx equal to an earlier one (in list order), or None when all differ:
    one bitmap pass when the largest index is small against the count, else a sort."""
    cdef Py_ssize_t n = idx.size, i, at = -1
    cdef uint64_t v, nbytes
    cdef unsigned char *seen
    if n < 2:
        return None
    nbytes = (idx.max_value_c >> 3) + 1
    if nbytes <= <uint64_t>n * 64 + 4096:
        seen = <unsigned char *>calloc(nbytes, 1)
        if seen == NULL:
            raise MemoryError()
        for i in range(n):
            v = idx.data[i]
            if seen[v >> 3] & (1 << (v & 7)):
                at = i
                break
            seen[v >> 3] |= <unsigned char>(1 << (v & 7))
        free(seen)
    else:
        at = first_repeat_sorted(idx.data, n)
    return None if at < 0 else idx.data[at]
