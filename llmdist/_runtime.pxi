# Runtime objects: a loaded runtime (its table of nogil functions and the device this
# process drives), streams and events.

cpdef enum CopyKind:
    COPY_H2H = LLMD_MEMCPY_H2H
    COPY_H2D = LLMD_MEMCPY_H2D
    COPY_D2H = LLMD_MEMCPY_D2H
    COPY_D2D = LLMD_MEMCPY_D2D
    COPY_DEFAULT = LLMD_MEMCPY_DEFAULT      # the runtime infers the direction from the addresses


# Runtimes with a copy kernel (select_device_copy): how device-to-device copies run in this
# process (llmdist.device_copy; the last LLMDataDist.init decides), and why they are DMA copies
# when they are.
cdef dict g_device_copy = {"mode": "dma", "reason": "no mode chosen yet"}


cdef bytes copy_kernel_ptx():
    """The copy kernel's PTX shipped in the package, NUL-terminated; None when missing."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "copy_runs.ptx")
    try:
        with open(path, "rb") as f:
            return f.read() + b"\0"
    except OSError:
        return None


cdef class Runtime:
    """A loaded runtime: a table of nogil functions plus the device this process drives."""

    def __cinit__(self):
        self.rt = NULL

    @staticmethod
    cdef Runtime wrap(const llmd_runtime *rt, int device_id, str version, str library):
        cdef Runtime r = Runtime.__new__(Runtime)
        r.rt = rt
        r.name = rt.name.decode()
        r.device_id = device_id
        r.version = version
        r.library = library
        return r

    @staticmethod
    def host(int device_id=0):
        """The embedded host runtime (always available)."""
        return Runtime.wrap(llmd_host_runtime(), device_id, "1", "(built in)")

    @staticmethod
    def acl(int device_id, list paths, bint try_loaded=True):
        """The ACL runtime from the first of paths that loads (RuntimeError says why not)."""
        return Runtime.load(paths, device_id, True, try_loaded)

    @staticmethod
    def cuda(int device_id, list paths):
        """The CUDA runtime from the first of paths that loads (RuntimeError says why not)."""
        return Runtime.load(paths, device_id, False, False)

    @staticmethod
    cdef Runtime load(list paths, int device_id, bint acl, bint try_loaded):
        """Run a device runtime's loader (src/acl_runtime.c, src/cuda_runtime.c)."""
        cdef llmd_load_report report
        cdef const llmd_runtime *rt
        cdef list encoded = [p.encode() for p in paths]
        cdef const char **cpaths = <const char **>malloc(max(len(paths), 1) * sizeof(char *))
        cdef Py_ssize_t i
        if cpaths == NULL:
            raise MemoryError()
        try:
            for i in range(len(encoded)):
                cpaths[i] = <const char *>encoded[i]
            memset(&report, 0, sizeof(report))
            if acl:
                rt = llmd_acl_load(cpaths, len(paths), try_loaded, device_id, &report)
            else:
                rt = llmd_cuda_load(cpaths, len(paths), device_id, &report)
        finally:
            free(cpaths)
        if rt == NULL:
            raise RuntimeError(report.error.decode("utf-8", "replace"))
        return Runtime.wrap(rt, device_id, report.version.decode("utf-8", "replace"),
                            report.library.decode("utf-8", "replace"))

    def select_device_copy(self, str mode):
        """How device-to-device copies of transfers run, on a runtime with a copy kernel (CUDA).
        "kernel": one launch of the copy kernel per layer (LLMException when it cannot be
        loaded); "dma": DMA copies; "auto": the kernel when it loads, else DMA with the reason
        in device_copy_reason. Other runtimes ignore it."""
        cdef char why[512]
        cdef bytes ptx
        cdef const char *text = NULL
        cdef int rc, cmode
        if mode not in ("auto", "kernel", "dma"):
            raise LLMException(f"llmdist.device_copy must be auto, kernel or dma, got {mode!r}",
                               status_code=LLMStatusCode.LLM_PARAM_INVALID)
        if self.rt.select_device_copy == NULL:
            return
        cmode = {"auto": LLMD_DEVICE_COPY_AUTO, "kernel": LLMD_DEVICE_COPY_KERNEL,
                 "dma": LLMD_DEVICE_COPY_DMA}[mode]
        ptx = copy_kernel_ptx() if mode != "dma" else None
        if ptx is not None:
            text = ptx
        why[0] = 0
        with nogil:
            rc = self.rt.select_device_copy(self.rt.ctx, cmode, text, why, sizeof(why))
        reason = (<bytes>why).decode("utf-8", "replace")
        if rc < 0:
            g_device_copy.update(mode="dma", reason=reason)
            raise LLMException(f"llmdist.device_copy=kernel, but the copy kernel cannot be "
                               f"used: {reason}", status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        g_device_copy.update(mode="kernel" if rc == 1 else "dma", reason=None if rc == 1 else reason)

    @property
    def device_copy(self):
        """"kernel" or "dma", how device-to-device copies run on a runtime with a copy kernel
        (CUDA); None on the others."""
        return g_device_copy["mode"] if self.rt.select_device_copy != NULL else None

    @property
    def device_copy_reason(self):
        """Why device-to-device copies are DMA copies on a runtime with a copy kernel (None when
        the kernel runs them, and on the others)."""
        return g_device_copy["reason"] if self.rt.select_device_copy != NULL else None

    @property
    def framework_device(self):
        """The device type frameworks name this runtime's devices by (torch: "cuda", "npu");
        None for host memory."""
        return self.rt.framework_device.decode() if self.rt.framework_device != NULL else None

    @property
    def is_host(self):
        """True when "device" memory is host RAM (the host runtime)."""
        return bool(self.rt.device_is_host)

    def error(self, int code, str op):
        """The LLMException for a failed call op (see _errors.pxi)."""
        return runtime_error(self.rt, code, op)

    cdef int check(self, int code, str op) except -1:
        if code != 0:
            raise runtime_error(self.rt, code, op)
        return 0

    def bind_device(self):
        """Make this thread issue work to the process's device (runtimes keep it per thread)."""
        cdef int rc
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
        self.check(rc, f"set_device({self.device_id})")

    def malloc(self, size_t size, bint device):
        """Allocate device memory, or page-locked host memory when device is False."""
        cdef void *p = NULL
        cdef int rc
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc != 0:
                pass
            elif device:
                rc = self.rt.malloc_device(self.rt.ctx, &p, size)
            else:
                rc = self.rt.malloc_host(self.rt.ctx, &p, size)
        self.check(rc, f"{'device' if device else 'host'} allocation of {size} bytes")
        return <uintptr_t>p

    def free(self, uintptr_t ptr, bint device):
        """Free memory from malloc."""
        cdef int rc
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc != 0:
                pass
            elif device:
                rc = self.rt.free_device(self.rt.ctx, <void *>ptr)
            else:
                rc = self.rt.free_host(self.rt.ctx, <void *>ptr)
        self.check(rc, "free")

    def mem_info(self):
        """(free, total) bytes of this process's device, or None when the runtime cannot tell
        (the host runtime: ask the system)."""
        cdef size_t free_bytes = 0, total_bytes = 0
        cdef int rc
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc == 0:
                rc = self.rt.mem_info(self.rt.ctx, &free_bytes, &total_bytes)
        if rc != 0 and self.rt.error_class(self.rt.ctx, rc) == LLMD_ERROR_NOT_SUPPORTED:
            return None
        self.check(rc, "mem_info")
        return free_bytes, total_bytes

    # -- device IPC (_ipc.pxi): device memory shared with another process of this host

    @property
    def ipc_kind(self):
        """How peers reach this runtime's exported device memory ("acl_ipc", "cuda_ipc"), or
        None (the host runtime, whose memory is shared as POSIX shared memory)."""
        return self.rt.ipc_kind.decode() if self.rt.ipc_kind != NULL else None

    @property
    def ipc_align(self):
        """An export starts on a multiple of this many bytes (1: the start of an allocation,
        which the export then covers whole)."""
        return self.rt.ipc_align

    @property
    def ipc_unavailable(self):
        """Why device IPC cannot be used with this runtime, or None when it can."""
        return ipc_unavailable_of(self)

    def bare_tgid(self):
        """The pid an exporter allows (ipc_allow) so that this process may import its memory."""
        return bare_tgid_of(self)

    def ipc_export(self, uintptr_t ptr, size_t size, bint check_pid=True):
        """Export device memory to other processes of this host; returns its id."""
        return ipc_export_of(self, ptr, size, check_pid)

    def ipc_allow(self, str ident, pids):
        """Let the processes pids import the export ident."""
        return ipc_allow_of(self, ident, pids)

    def ipc_import(self, str ident):
        """Map a peer's exported device memory into this process; returns its local address."""
        return ipc_import_of(self, ident)

    def ipc_close_import(self, str ident, uintptr_t ptr):
        """Unmap memory from ipc_import."""
        return ipc_close_import_of(self, ident, ptr)

    def ipc_close_export(self, str ident):
        """Withdraw an export."""
        return ipc_close_export_of(self, ident)

    def ipc_range(self, uintptr_t ptr, size_t size):
        """(base, length) of the exportable region holding [ptr, ptr + size) of memory this
        runtime did not allocate for llmdist (a framework's tensor); raises when there is none."""
        return ipc_range_of(self, ptr, size)

    def memcpy(self, uintptr_t dst, uintptr_t src, size_t n, Stream stream):
        """Queue one copy on a stream (a plain helper for tools and tests)."""
        cdef int rc
        with nogil:
            rc = self.rt.memcpy_async(self.rt.ctx, <void *>dst, n, <const void *>src, n,
                                      LLMD_MEMCPY_DEFAULT, stream.handle)
        self.check(rc, "memcpy_async")


cdef class Stream:
    """Stream(runtime)
--

A runtime stream: operations on it run in order, asynchronously to the caller."""

    @property
    def handle(self):
        """The runtime's stream handle as an int."""
        return <uintptr_t>self.handle

    def __cinit__(self, Runtime runtime not None):
        cdef int rc
        self.runtime = runtime
        self.handle = NULL
        with nogil:
            rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
            if rc == 0:
                rc = runtime.rt.stream_create(runtime.rt.ctx, &self.handle)
        runtime.check(rc, "stream_create")

    def synchronize(self):
        """Block (without the GIL) until everything queued so far has run."""
        cdef int rc
        with nogil:
            rc = self.runtime.rt.stream_synchronize(self.runtime.rt.ctx, self.handle)
        self.runtime.check(rc, "stream_synchronize")

    def wait_event(self, Event event not None):
        """Make later work on this stream wait until the event's last record completes."""
        cdef int rc
        with nogil:
            rc = self.runtime.rt.stream_wait_event(self.runtime.rt.ctx, self.handle, event.handle)
        self.runtime.check(rc, "stream_wait_event")

    def close(self):
        """Drain and destroy the stream (idempotent)."""
        cdef int rc
        if self.handle != NULL:
            with nogil:
                rc = self.runtime.rt.stream_destroy(self.runtime.rt.ctx, self.handle)
            self.handle = NULL
            self.runtime.check(rc, "stream_destroy")

    def __dealloc__(self):
        if self.handle != NULL and self.runtime is not None:
            with nogil:
                self.runtime.rt.stream_destroy(self.runtime.rt.ctx, self.handle)


cdef class Event:
    """Event(runtime, handle=None)
--

A runtime event: a marker recorded on a stream, complete once the stream passes it.

    Event(runtime) creates one; Event(runtime, handle) wraps a framework's event handle (e.g.
    torch.cuda.Event().cuda_event) without taking ownership."""

    @property
    def handle(self):
        """The runtime's event handle as an int."""
        return <uintptr_t>self.handle

    def __cinit__(self, Runtime runtime not None, handle=None):
        cdef int rc
        self.runtime = runtime
        self.handle = NULL
        self.owned = handle is None
        if handle is not None:
            if type(handle) is not int or handle <= 0:
                raise TypeError(f"handle only support [int], a nonzero event handle, but got {handle!r}")
            self.handle = <llmd_event><uintptr_t>handle
            return
        with nogil:
            rc = runtime.rt.set_device(runtime.rt.ctx, runtime.device_id)
            if rc == 0:
                rc = runtime.rt.event_create(runtime.rt.ctx, &self.handle)
        runtime.check(rc, "event_create")

    def record(self, Stream stream not None):
        """Record the event at the current end of the stream."""
        cdef int rc
        with nogil:
            rc = self.runtime.rt.event_record(self.runtime.rt.ctx, self.handle, stream.handle)
        self.runtime.check(rc, "event_record")

    def record_on(self, uintptr_t stream_handle):
        """Record the event at the current end of a stream given by its raw handle: a stream
        this runtime did not create, e.g. torch.cuda.current_stream().cuda_stream."""
        cdef int rc
        with nogil:
            rc = self.runtime.rt.event_record(self.runtime.rt.ctx, self.handle,
                                              <llmd_stream>stream_handle)
        self.runtime.check(rc, "event_record")

    def query(self):
        """True when the work captured by the last record has completed."""
        cdef int rc, done = 0
        rc = self.runtime.rt.event_query(self.runtime.rt.ctx, self.handle, &done)
        self.runtime.check(rc, "event_query")
        return bool(done)

    def synchronize(self, int timeout_ms=-1):
        """Wait for the last record; returns False when timeout_ms (>= 0) passed first."""
        cdef int rc
        with nogil:
            rc = self.runtime.rt.event_synchronize(self.runtime.rt.ctx, self.handle, timeout_ms)
        if is_timeout(self.runtime.rt, rc):
            return False
        self.runtime.check(rc, "event_synchronize")
        return True

    def __dealloc__(self):
        if self.owned and self.handle != NULL and self.runtime is not None:
            self.runtime.rt.event_destroy(self.runtime.rt.ctx, self.handle)
