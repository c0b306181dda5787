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


def parse_indices(str name, object seq):
    """Check that seq is a list/tuple of uint64 and copy it into an Indices.

    TypeError for a wrong container or element type (bool included), ValueError for a value
    outside [0, 2**64-1]; messages name the parameter and the element."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{name} only support [list, tuple], but got {type(seq)}")
    cdef Py_ssize_t n = len(seq), i
    cdef Indices out = Indices.__new__(Indices)
    cdef uint64_t v, vmax = 0
    out.data = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
    if out.data == NULL:
        raise MemoryError()
    out.size = n
    for i in range(n):
        item = seq[i]
        if type(item) is not int:
            if not isinstance(item, int) or isinstance(item, bool):
                raise TypeError(f"{name}[{i}] only support [int], but got {type(item)}")
        try:    # the conversion itself checks the range, with no Python int compared
            v = PyLong_AsUnsignedLongLong(item)
        except OverflowError:   # negative, or above 2**64-1
            raise ValueError(f"{name}[{i}] must be in [0, {U64_MAX}], but got {item}") from None
        out.data[i] = v
        if v > vmax:
            vmax = v
    out.max_value = vmax if n else None
    out.max_value_c = vmax
    return out
