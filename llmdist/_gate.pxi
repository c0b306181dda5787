# Layer gates: event-based layer readiness, marked by the model and waited on without the GIL.

cdef class LayerGate:
    """Per-layer 'event recorded' marks, waited on without the GIL."""

    def __cinit__(self, int num_layers):
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        self.gate = llmd_gate_create(num_layers)
        if self.gate == NULL:
            raise MemoryError()
        self.num_layers = num_layers

    def __dealloc__(self):
        llmd_gate_destroy(self.gate)

    def mark(self, int layer):
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer_index must be in [0, {self.num_layers}), got {layer}")
        llmd_gate_mark(self.gate, layer)

    def reset(self):
        llmd_gate_reset(self.gate)

    def wait(self, int layer, int timeout_ms=-1):
        """True once layer is marked, False after timeout_ms (>= 0)."""
        cdef int rc
        with nogil:
            rc = llmd_gate_wait(self.gate, layer, timeout_ms, NULL)
        return rc == LLMD_GATE_OK
