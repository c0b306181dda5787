# cython: language_level=3
"""llmdist's compiled core: the runtime table, streams and events, the planner and the layer loop.

Everything here that touches memory runs without the GIL; Python is entered only to call a
user's LayerSynchronizer and to publish a task's results.
"""

include "_decl.pxi"

from cpython.long cimport PyLong_AsUnsignedLongLong
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memcpy, memset

import os
import threading

from llmdist.status import LLMException, LLMStatusCode

cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF

# ------------------------------------------------------------------------------------------
# Runtime errors: the one place where a runtime's code becomes an exception or a status.

# The status each error class (llmd_runtime.error_class) stands for.
ERROR_STATUS = {
    LLMD_ERROR_OTHER: LLMStatusCode.LLM_FAILED,
    LLMD_ERROR_HOST_OUT_OF_MEMORY: LLMStatusCode.LLM_OUT_OF_MEMORY,
    LLMD_ERROR_DEVICE_OUT_OF_MEMORY: LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY,
    LLMD_ERROR_DEVICE_MEMORY: LLMStatusCode.LLM_DEVICE_MEM_ERROR,
    LLMD_ERROR_TIMEOUT: LLMStatusCode.LLM_TIMEOUT,
    LLMD_ERROR_NOT_SUPPORTED: LLMStatusCode.LLM_FAILED,
}


cdef class Runtime:
    """A loaded runtime: a table of nogil functions plus the device this process drives."""
    cdef const llmd_runtime *rt
    cdef readonly str name
    cdef readonly int device_id
    cdef readonly str version
    cdef readonly str library

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

    @property
    def is_host(self):
        """True when "device" memory is host RAM (the host runtime)."""
        return bool(self.rt.device_is_host)

    cdef str text(self, int code):
        cdef const char *s = self.rt.error_string(self.rt.ctx, code)
        return s.decode("utf-8", "replace") if s != NULL else "no message"

    cdef int error_class(self, int code) noexcept:
        return self.rt.error_class(self.rt.ctx, code)

    def error(self, int code, str op):
        """The LLMException for a failed call op, with the runtime's own message and the status
        the code's error class stands for."""
        return LLMException(f"{op} failed on the {self.name} runtime: error {code}: {self.text(code)}",
                            status_code=ERROR_STATUS[self.error_class(code)])

    cdef int check(self, int code, str op) except -1:
        if code != 0:
            raise self.error(code, op)
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

    # -- device IPC: device memory shared with another process of this host -----------------

    @property
    def ipc_kind(self):
        """How peers reach this runtime's exported device memory ("acl_ipc", "cuda_ipc"), or
        None (the host runtime, whose memory is shared as POSIX shared memory)."""
        return self.rt.ipc_kind.decode() if self.rt.ipc_kind != NULL else None

    @property
    def ipc_align(self):
        """An export starts on a multiple of this many bytes (1: the start of an allocation,
        which the export covers whole)."""
        return self.rt.ipc_align

    @property
    def ipc_unavailable(self):
        """Why device IPC cannot be used with this runtime, or None when it can."""
        cdef const char *why = self.rt.ipc_unavailable(self.rt.ctx)
        return why.decode("utf-8", "replace") if why != NULL else None

    cdef int need_ipc(self) except -1:
        why = self.ipc_unavailable
        if why is not None:
            raise LLMException(f"device IPC is not available on the {self.name} runtime: {why}",
                               status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        return 0

    def bare_tgid(self):
        """The pid an exporter lets import (ipc_allow) so that this process may import its
        device memory (ACL: the host's pid, also inside a container)."""
        cdef int32_t pid = 0
        cdef int rc
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc == 0:
                rc = self.rt.ipc_self_pid(self.rt.ctx, &pid)
        self.check(rc, "ipc_self_pid")
        return pid

    def ipc_export(self, uintptr_t ptr, size_t size, bint check_pid=True):
        """Export [ptr, ptr + size) (ptr a multiple of ipc_align) to other processes of this
        host; returns its id. With check_pid, importers must be allowed with ipc_allow."""
        cdef char ident[LLMD_IPC_ID_MAX]
        cdef int rc
        self.need_ipc()
        memset(ident, 0, sizeof(ident))
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc == 0:
                rc = self.rt.ipc_export(self.rt.ctx, <void *>ptr, size, check_pid, ident,
                                        LLMD_IPC_ID_MAX)
        self.check(rc, f"ipc_export({ptr:#x}, {size})")
        ident[LLMD_IPC_ID_MAX - 1] = 0
        return (<bytes>ident).decode("ascii", "replace")

    def ipc_allow(self, str ident, pids):
        """Let the processes pids import the export ident (pass every pid that should have
        access; runtimes without a whitelist accept and ignore them)."""
        cdef Py_ssize_t i, n = len(pids)
        cdef int32_t *arr
        cdef bytes k = ident.encode()
        cdef const char *kp = k
        cdef int rc
        if n == 0:
            return
        self.need_ipc()
        arr = <int32_t *>malloc(n * sizeof(int32_t))
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                arr[i] = pids[i]
            with nogil:
                rc = self.rt.set_device(self.rt.ctx, self.device_id)
                if rc == 0:
                    rc = self.rt.ipc_allow(self.rt.ctx, kp, arr, n)
        finally:
            free(arr)
        self.check(rc, f"ipc_allow({ident}, {list(pids)})")

    def ipc_import(self, str ident):
        """Map a peer's export into this process, with peer access enabled; returns the local
        address of the exported region's start."""
        cdef void *p = NULL
        cdef bytes k = ident.encode()
        cdef const char *kp = k
        cdef int rc
        self.need_ipc()
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc == 0:
                rc = self.rt.ipc_import(self.rt.ctx, kp, &p)
        self.check(rc, f"ipc_import({ident})")
        return <uintptr_t>p

    def ipc_close_import(self, str ident, uintptr_t ptr):
        """Unmap memory from ipc_import (after every copy into it has completed)."""
        cdef bytes k = ident.encode()
        cdef const char *kp = k
        cdef int rc
        self.need_ipc()
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc == 0:
                rc = self.rt.ipc_close_import(self.rt.ctx, kp, <void *>ptr)
        self.check(rc, f"ipc_close_import({ident}, {ptr:#x})")

    def ipc_close_export(self, str ident):
        """Withdraw an export (after the importers closed theirs, before freeing the memory)."""
        cdef bytes k = ident.encode()
        cdef const char *kp = k
        cdef int rc
        self.need_ipc()
        with nogil:
            rc = self.rt.set_device(self.rt.ctx, self.device_id)
            if rc == 0:
                rc = self.rt.ipc_close_export(self.rt.ctx, kp)
        self.check(rc, f"ipc_close_export({ident})")

    def memcpy_each(self, list dsts, list srcs, size_t n, Stream stream):
        """Queue one async copy of n bytes per (dst, src) pair from a C loop: the
        copy-per-block baseline (as vLLM's swap_blocks does) for benchmarks."""
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
                    rc = self.rt.memcpy_async(self.rt.ctx, <void *>d[i], n, <const void *>s[i], n,
                                              LLMD_MEMCPY_DEFAULT, stream.handle)
                    if rc != 0:
                        break
        finally:
            free(d)
            free(s)
        self.check(rc, "memcpy_async")

    def memcpy(self, uintptr_t dst, uintptr_t src, size_t n, Stream stream):
        """Queue one copy on a stream (a plain helper for tools and tests)."""
        cdef int rc
        with nogil:
            rc = self.rt.memcpy_async(self.rt.ctx, <void *>dst, n, <const void *>src, n,
                                      LLMD_MEMCPY_DEFAULT, stream.handle)
        self.check(rc, "memcpy_async")


cdef class Stream:
    """A runtime stream: operations on it run in order, asynchronously to the caller."""
    cdef readonly Runtime runtime
    cdef llmd_stream handle

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
    """A runtime event: a marker recorded on a stream, complete once the stream passes it.

    Event(runtime) creates one; Event(runtime, handle) wraps a framework's event handle (e.g.
    torch.cuda.Event().cuda_event) without taking ownership."""
    cdef readonly Runtime runtime
    cdef llmd_event handle
    cdef bint owned

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
        if rc != 0 and self.runtime.error_class(rc) == LLMD_ERROR_TIMEOUT:
            return False
        self.runtime.check(rc, "event_synchronize")
        return True

    def __dealloc__(self):
        if self.owned and self.handle != NULL and self.runtime is not None:
            self.runtime.rt.event_destroy(self.runtime.rt.ctx, self.handle)


# ------------------------------------------------------------------------------------------
# Host-runtime tuning knobs

def host_tuning():
    """The host copy engine's knobs as a dict."""
    cdef llmd_host_tuning *t = llmd_host_tuning_get()
    return {"copy_threads": t.copy_threads, "split_min_bytes": t.split_min_bytes,
            "stream_store_min_bytes": t.stream_store_min_bytes}


def set_host_tuning(copy_threads=None, split_min_bytes=None, stream_store_min_bytes=None):
    """Set the host copy engine's knobs: threads sharing a batch, the smallest batch worth
    splitting, and the smallest run copied with streaming stores (0 disables them)."""
    cdef llmd_host_tuning *t = llmd_host_tuning_get()
    if copy_threads is not None:
        if type(copy_threads) is not int or not 1 <= copy_threads <= 64:
            raise ValueError(f"copy_threads must be an int in [1, 64], got {copy_threads!r}")
        t.copy_threads = copy_threads
    if split_min_bytes is not None:
        if type(split_min_bytes) is not int or split_min_bytes < 0:
            raise ValueError(f"split_min_bytes must be an int >= 0, got {split_min_bytes!r}")
        t.split_min_bytes = split_min_bytes
    if stream_store_min_bytes is not None:
        if type(stream_store_min_bytes) is not int or stream_store_min_bytes < 0:
            raise ValueError(f"stream_store_min_bytes must be an int >= 0, got {stream_store_min_bytes!r}")
        t.stream_store_min_bytes = stream_store_min_bytes


def host_copy(uintptr_t dst, uintptr_t src, size_t n):
    """Copy n bytes with the host copy engine on the calling thread (GIL released)."""
    with nogil:
        llmd_host_copy(<void *>dst, <const void *>src, n)


# ------------------------------------------------------------------------------------------
# Shared host memory (peers on this host map host-runtime memory by name)

def shm_create(str name, size_t size):
    """Create and map a shared memory object; returns its address."""
    cdef void *p = NULL
    cdef bytes b = name.encode()
    if llmd_host_shm_create(b, size, &p) != 0:
        raise LLMException(f"could not create shared memory {name} of {size} bytes",
                           status_code=LLMStatusCode.LLM_OUT_OF_MEMORY)
    return <uintptr_t>p


def shm_map(str name, size_t size):
    """Map a peer's shared memory object; returns the local address."""
    cdef void *p = NULL
    cdef bytes b = name.encode()
    if llmd_host_shm_map(b, size, &p) != 0:
        raise LLMException(f"could not map shared memory {name} ({size} bytes)",
                           status_code=LLMStatusCode.LLM_LINK_FAILED)
    return <uintptr_t>p


def shm_unmap(uintptr_t addr, size_t size):
    llmd_host_shm_unmap(<void *>addr, size)


def shm_unlink(str name):
    cdef bytes b = name.encode()
    llmd_host_shm_unlink(b)


cdef class LinkFlag:
    """Whether a link to a peer is up; read by the layer loop without the GIL. pid names the
    peer's process when it is on this host (0 otherwise), so that a transfer ending before the
    control connection noticed a killed peer is not reported delivered."""
    cdef volatile int up
    cdef public int pid

    def __cinit__(self, int pid=0):
        self.up = 1
        self.pid = pid

    def peer_alive(self):
        """False once the link is down or the peer's process on this host is gone."""
        if not self.up:
            return False
        if self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except OSError:
                pass
        return True

    def down(self):
        self.up = 0

    @property
    def is_up(self):
        return bool(self.up)


# ------------------------------------------------------------------------------------------
# Index lists

cdef class Indices:
    """A validated list of uint64 indices held as a C array."""
    cdef uint64_t *data
    cdef readonly Py_ssize_t size
    cdef readonly object max_value

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
        if item < 0 or item > U64_MAX:
            raise ValueError(f"{name}[{i}] must be in [0, {U64_MAX}], but got {item}")
        v = PyLong_AsUnsignedLongLong(item)
        out.data[i] = v
        if v > vmax:
            vmax = v
    out.max_value = vmax if n else None
    return out


# ------------------------------------------------------------------------------------------
# The planner

ctypedef llmd_run Run


cdef class Plan:
    """The run template of one call: (src_offset, dst_offset, nbytes) per tensor, consecutive
    pieces merged. Offsets are from the tensor bases; every layer and config reuses it."""
    cdef Run *runs
    cdef readonly Py_ssize_t count
    cdef readonly size_t dst_lo, dst_hi, src_lo, src_hi, total_bytes
    cdef bint overflow          # some block offset does not fit the address space

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
        self.dst_hi = self.src_hi = self.total_bytes = 0
        for i in range(self.count):
            self.dst_lo = min(self.dst_lo, self.runs[i].dst_off)
            self.src_lo = min(self.src_lo, self.runs[i].src_off)
            self.dst_hi = max(self.dst_hi, self.runs[i].dst_off + self.runs[i].nbytes)
            self.src_hi = max(self.src_hi, self.runs[i].src_off + self.runs[i].nbytes)
            self.total_bytes += self.runs[i].nbytes
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


cdef object overflow_error(str name, Indices idx, size_t block_bytes):
    return LLMException(f"{name} holds block {idx.max_value}: at {block_bytes} bytes per block "
                        f"its offset does not fit the address space",
                        status_code=LLMStatusCode.LLM_PARAM_INVALID)


def plan_c2b(Indices dst_blocks not None, size_t row_bytes, size_t block_bytes):
    """Contiguous row to blocks: chunk j of the row (block_bytes each, the last may be
    shorter) goes to destination block dst_blocks[j]."""
    cdef Plan p = Plan.__new__(Plan)
    cdef Py_ssize_t j
    cdef size_t off, n
    p.reserve(dst_blocks.size)
    with nogil:
        for j in range(dst_blocks.size):
            if not block_fits(dst_blocks.data[j], block_bytes):
                p.overflow = True
                break
            off = <size_t>j * block_bytes
            n = min(block_bytes, row_bytes - off)
            p.add(off, <size_t>dst_blocks.data[j] * block_bytes, n)
        p.finish()
    if p.overflow:
        raise overflow_error("dst_block_indices", dst_blocks, block_bytes)
    return p


cdef struct Pair:
    uint64_t src
    uint64_t dst


cdef int cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0], y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef int cmp_pair_src(const void *a, const void *b) noexcept nogil:
    return cmp_u64(&(<const Pair *>a).src, &(<const Pair *>b).src)


cdef bint all_distinct(const uint64_t *values, Py_ssize_t n) noexcept nogil:
    """True when no value repeats (n log n on a copy)."""
    cdef uint64_t *tmp = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
    cdef Py_ssize_t j
    cdef bint ok = True
    if tmp == NULL:
        return False
    memcpy(tmp, values, n * sizeof(uint64_t))
    qsort(tmp, n, sizeof(uint64_t), cmp_u64)
    for j in range(1, n):
        if tmp[j] == tmp[j - 1]:
            ok = False
            break
    free(tmp)
    return ok


def plan_b2b(Indices src_blocks not None, Indices dst_blocks not None, size_t block_bytes):
    """Blocks to blocks: source block s[j] goes to destination block d[j]; runs where both
    advance by one become one copy. When no destination block repeats, the pairs are taken in
    source order, which reads memory more sequentially (and the order of copies to distinct
    blocks does not matter)."""
    cdef Plan p = Plan.__new__(Plan)
    cdef Py_ssize_t j, n = src_blocks.size
    cdef Pair *pairs = <Pair *>malloc(max(n, 1) * sizeof(Pair))
    if pairs == NULL:
        raise MemoryError()
    p.reserve(n)
    with nogil:
        for j in range(n):
            pairs[j].src = src_blocks.data[j]
            pairs[j].dst = dst_blocks.data[j]
        if n > 1 and all_distinct(dst_blocks.data, n):
            qsort(pairs, n, sizeof(Pair), cmp_pair_src)
        for j in range(n):
            if not (block_fits(pairs[j].src, block_bytes) and block_fits(pairs[j].dst, block_bytes)):
                p.overflow = True
                break
            p.add(<size_t>pairs[j].src * block_bytes, <size_t>pairs[j].dst * block_bytes,
                  block_bytes)
        p.finish()
    free(pairs)
    if p.overflow:
        raise overflow_error("dst_block_indices", dst_blocks, block_bytes)
    return p


# ------------------------------------------------------------------------------------------
# Destination bounds

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


# ------------------------------------------------------------------------------------------
# Layer gates (event-based layer readiness)

cdef extern from "llmdist/layer_gate.h" nogil:
    ctypedef struct llmd_gate:
        pass
    enum:
        LLMD_GATE_OK
        LLMD_GATE_TIMEOUT
        LLMD_GATE_STOPPED
    llmd_gate *llmd_gate_create(int32_t num_layers)
    void llmd_gate_destroy(llmd_gate *g)
    void llmd_gate_mark(llmd_gate *g, int32_t layer)
    void llmd_gate_reset(llmd_gate *g)
    int llmd_gate_is_marked(llmd_gate *g, int32_t layer)
    int llmd_gate_wait(llmd_gate *g, int32_t layer, int32_t timeout_ms, const volatile int *stop)


cdef class LayerGate:
    """Per-layer 'event recorded' marks, waited on without the GIL."""
    cdef llmd_gate *gate
    cdef readonly int num_layers

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

    def is_marked(self, int layer):
        return bool(llmd_gate_is_marked(self.gate, layer))

    def wait(self, int layer, int timeout_ms=-1):
        """True once layer is marked, False after timeout_ms (>= 0)."""
        cdef int rc
        with nogil:
            rc = llmd_gate_wait(self.gate, layer, timeout_ms, NULL)
        return rc == LLMD_GATE_OK


# ------------------------------------------------------------------------------------------
# The layer loop

cdef struct CfgState:
    int lo, hi              # source layers [lo, hi)
    size_t src_shift        # bytes added to each source tensor base (the source row)
    int kind                # copy kind
    int lane                # 0: the runtime's stream; 1: the host copy engine (host-to-host);
                            # 2: writes into another process (process_vm_writev) on the host stream;
                            # 3: batched writes through a transfer engine (another host)
    int pid                 # lane 2: the destination process
    int single              # lane 0: copy run by run, never in a batch call (the destination is
                            # another device's memory, which a batch's one location cannot name)
    int async_code          # lane 2: errno of a failed write, set by the host stream
    const volatile int *link_up  # the link to the destination cluster (NULL: this process)
    int code                # runtime error code, 0 while fine
    int failed              # ST_* once the config has failed
    int attempted           # some layer's copies were issued
    size_t fail_index
    Py_ssize_t desc_base    # first descriptor slot of this config


# Most runs one config keeps queued in a transfer engine at once (below Mooncake's per-peer
# queue of 1024 writes).
ENGINE_MAX_QUEUED = 512

# Why a config failed; turned into LLMStatusCode when results are published.
cdef enum:
    ST_NONE = 0
    ST_RUNTIME = 1          # a runtime call failed: the code says which
    ST_SYNC_FALSE = 2
    ST_SYNC_RAISED = 3
    ST_CANCELLED = 4
    ST_SYNC_TIMEOUT = 5
    ST_LINK = 6             # the link to the destination went down
    ST_PROCESS = 7          # a write into another process failed: async_code is the errno
    ST_ENGINE = 8           # the transfer engine refused or failed a write


cdef class TransferJob:
    """One transfer_cache_async call: the plan, every config's addresses and the progress.

    run() is the layer loop, called on a transfer worker thread with that worker's streams.
    cancel() stops it between layers and waits until the copies it issued have landed."""
    cdef Runtime runtime
    cdef Runtime host
    cdef Plan plan
    cdef int ncfg, first_layer, last_layer
    cdef CfgState *cfg
    cdef uint64_t *src_addrs          # 2 per source layer
    cdef uint64_t *dst_addrs          # per config: 2 per covered layer
    cdef uint64_t *dst_limits         # the end of the region holding each destination tensor
    cdef Py_ssize_t *dst_index        # where each config's entries start in dst_addrs
    cdef llmd_run_table *tables[2]    # the plan's runs on the runtime (lane 0) and the host (lane 1)
    cdef const llmd_runtime *table_rts[2]   # the runtime that made each table
    cdef void **d_dsts                # lanes 2 and 3: per-run descriptors
    cdef void **d_srcs
    cdef size_t *d_sizes
    cdef PyThread_type_lock lock
    cdef llmd_stream stream           # the runtime stream of the worker running the job
    cdef llmd_stream host_stream      # its host-engine stream (lane 1), or NULL
    cdef volatile int cancelled
    cdef int finished, use_batch
    cdef int issued_upto              # every layer below this has had its copies queued
    cdef llmd_event *events           # event-based readiness: one event per source layer
    cdef int nevents
    cdef LayerGate gate
    cdef int32_t wait_ms
    cdef readonly object synchronizer
    cdef readonly object sync_timeout
    cdef readonly object done
    cdef readonly list results
    cdef readonly list errors
    cdef readonly object exception
    cdef readonly object cancel_code
    cdef str sync_error
    cdef list links                   # each config's LinkFlag, or None
    cdef list cancel_codes            # per config, the status a cancellation gave it
    cdef list engines                 # per config: None, or [transport, session, handles]
    cdef double engine_wait_s
    cdef public object on_finish

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, Runtime runtime not None, Plan plan not None, list src_addrs,
                 list configs, synchronizer, sync_timeout=None, bint use_batch=True,
                 events=None, LayerGate gate=None):
        """configs: (first_layer, stop_layer, src_shift, kind, lane, dst_addrs, dst_limits, pid,
        link, engine, single) per config, with 2 destination addresses and limits per covered
        layer; pid is the destination process for lane 2, link the LinkFlag of a peer or None,
        engine (transport, session) for lane 3, single true to copy run by run. events (a list of
        Event, one per source layer) with gate switch to event-based readiness."""
        cdef Py_ssize_t i, j, total = 0, nl = len(src_addrs), slots = 0
        cdef CfgState *c
        cdef Event ev
        self.runtime = runtime
        self.host = runtime if runtime.is_host else Runtime.host(runtime.device_id)
        self.plan = plan
        self.synchronizer = synchronizer
        self.sync_timeout = sync_timeout
        self.wait_ms = -1 if sync_timeout is None else sync_timeout
        self.use_batch = use_batch
        self.done = threading.Event()
        self.results = None
        self.errors = [None] * len(configs)
        self.cancel_codes = [None] * len(configs)
        self.engines = [None] * len(configs)
        self.engine_wait_s = 30.0 if sync_timeout is None else max(sync_timeout / 1000.0, 1.0)
        self.links = [None] * len(configs)
        self.ncfg = len(configs)
        self.cfg = <CfgState *>calloc(max(self.ncfg, 1), sizeof(CfgState))
        self.dst_index = <Py_ssize_t *>calloc(max(self.ncfg, 1), sizeof(Py_ssize_t))
        self.src_addrs = <uint64_t *>malloc(max(nl, 1) * sizeof(uint64_t))
        if self.cfg == NULL or self.dst_index == NULL or self.src_addrs == NULL:
            raise MemoryError()
        for i in range(nl):
            self.src_addrs[i] = src_addrs[i]
        self.first_layer = 1 << 30
        self.last_layer = 0
        for i, spec in enumerate(configs):
            c = &self.cfg[i]
            c.lo, c.hi, c.src_shift, c.kind, c.lane = spec[0], spec[1], spec[2], spec[3], spec[4]
            c.pid = spec[7]
            if spec[9] is not None:
                self.engines[i] = [spec[9][0], spec[9][1], []]
            if spec[10]:
                c.single = 1
            if spec[8] is not None:
                link = <LinkFlag>spec[8]
                self.links[i] = link
                c.link_up = &link.up
            c.desc_base = slots
            if c.lane >= 2:
                slots += <Py_ssize_t>(c.hi - c.lo) * 2 * plan.count
            self.dst_index[i] = total
            total += len(spec[5])
            self.first_layer = min(self.first_layer, c.lo)
            self.last_layer = max(self.last_layer, c.hi)
        self.dst_addrs = <uint64_t *>malloc(max(total, 1) * sizeof(uint64_t))
        self.dst_limits = <uint64_t *>malloc(max(total, 1) * sizeof(uint64_t))
        if self.dst_addrs == NULL or self.dst_limits == NULL:
            raise MemoryError()
        for i, spec in enumerate(configs):
            addrs = spec[5]
            limits = spec[6]
            for j in range(len(addrs)):
                self.dst_addrs[self.dst_index[i] + j] = addrs[j]
                self.dst_limits[self.dst_index[i] + j] = limits[j]
        if self.ncfg == 0:
            self.first_layer = self.last_layer = 0
        if events is not None:
            if gate is None or len(events) < self.last_layer:
                raise ValueError("event-based readiness needs a gate and an event per layer")
            self.nevents = len(events)
            self.events = <llmd_event *>calloc(max(self.nevents, 1), sizeof(llmd_event))
            if self.events == NULL:
                raise MemoryError()
            for i in range(self.nevents):
                ev = events[i]
                if ev.runtime.rt != runtime.rt:
                    raise ValueError(f"event {i} belongs to the {ev.runtime.name} runtime, "
                                     f"the transfer runs on {runtime.name}")
                self.events[i] = ev.handle
            self.gate = gate

    def __dealloc__(self):
        free(self.cfg)
        free(self.dst_index)
        free(self.src_addrs)
        free(self.dst_addrs)
        free(self.dst_limits)
        free(self.d_dsts)
        free(self.d_srcs)
        free(self.d_sizes)
        self.release_tables()
        free(self.events)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    @property
    def num_configs(self):
        return self.ncfg

    cdef int alloc_descriptors(self) except -1:
        # Sized once per call, so the layer loop never allocates: a run table per lane of
        # plain runtime copies, with room for every pair the call copies, and one descriptor
        # per (config, covered layer, tensor, run) for process and engine writes.
        cdef Py_ssize_t n = 0, i
        cdef size_t pairs[2]
        cdef int lane, rc
        cdef Runtime owner
        pairs[0] = pairs[1] = 0
        for i in range(self.ncfg):
            if self.cfg[i].lane <= 1:
                pairs[self.cfg[i].lane] += <size_t>(self.cfg[i].hi - self.cfg[i].lo) * 2
            else:
                n += <Py_ssize_t>(self.cfg[i].hi - self.cfg[i].lo) * 2 * self.plan.count
        for lane in range(2):
            if pairs[lane] == 0:
                continue
            owner = self.runtime if lane == 0 else self.host
            with nogil:
                rc = owner.rt.run_table_create(owner.rt.ctx, self.plan.runs, self.plan.count,
                                               pairs[lane], &self.tables[lane])
            self.table_rts[lane] = owner.rt
            if rc != 0:
                raise MemoryError()
        n = max(n, 1)
        self.d_dsts = <void **>malloc(n * sizeof(void *))
        self.d_srcs = <void **>malloc(n * sizeof(void *))
        self.d_sizes = <size_t *>malloc(n * sizeof(size_t))
        if not (self.d_dsts and self.d_srcs and self.d_sizes):
            raise MemoryError()
        return 0

    cdef void release_tables(self) noexcept nogil:
        """Destroy the run tables (every stream that used them has been synchronized)."""
        cdef int lane
        for lane in range(2):
            if self.tables[lane] != NULL:
                self.table_rts[lane].run_table_destroy(self.table_rts[lane].ctx, self.tables[lane])
                self.tables[lane] = NULL

    cdef void fail_unfinished(self, int layer, int status) noexcept nogil:
        """Fail every config whose copies are not all issued yet (ranges reaching past layer)."""
        cdef int i
        for i in range(self.ncfg):
            if self.cfg[i].hi > layer and not self.cfg[i].failed:
                self.cfg[i].failed = status

    cdef void fail_lanes(self, int layer, int lanes, int code) noexcept nogil:
        """A runtime call made for layer on behalf of some lanes (bit 1 << lane) failed: fail
        their configs that cover the layer."""
        cdef int i
        for i in range(self.ncfg):
            if ((lanes >> self.cfg[i].lane) & 1 and self.cfg[i].lo <= layer < self.cfg[i].hi
                    and not self.cfg[i].failed):
                self.cfg[i].failed = ST_RUNTIME
                self.cfg[i].code = code

    cdef int lanes_at(self, int layer) noexcept nogil:
        """Bit 1 << lane for every lane with a live config covering layer."""
        cdef int i, bits = 0
        for i in range(self.ncfg):
            if self.cfg[i].lo <= layer < self.cfg[i].hi and not self.cfg[i].failed:
                bits |= 1 << self.cfg[i].lane
        return bits

    cdef void issue_layer(self, int layer) noexcept nogil:
        """Queue layer's copies for every config that covers it (job lock held)."""
        cdef int i, t, rc
        cdef CfgState *c
        cdef Py_ssize_t r, k, base, e
        cdef Run *runs = self.plan.runs
        cdef Py_ssize_t nruns = self.plan.count
        cdef char *src
        cdef char *dst
        cdef llmd_tensor_pair pairs[2]
        cdef const llmd_runtime *rt
        cdef llmd_stream stream
        cdef size_t fail = 0
        for i in range(self.ncfg):
            c = &self.cfg[i]
            if layer < c.lo or layer >= c.hi or c.failed:
                continue
            if c.link_up != NULL and not c.link_up[0]:
                c.failed = ST_LINK
                continue
            c.attempted = 1
            if c.lane == 0:
                rt = self.runtime.rt
                stream = self.stream
            else:
                rt = self.host.rt
                stream = self.host_stream
            if c.lane <= 1:
                # A plain runtime copy: the layer's two tensor pairs through the run table.
                for t in range(2):
                    e = self.dst_index[i] + 2 * (layer - c.lo) + t
                    pairs[t].src = self.src_addrs[2 * layer + t] + c.src_shift
                    pairs[t].dst = self.dst_addrs[e]
                    pairs[t].dst_end = self.dst_limits[e]
                rc = rt.copy_runs(rt.ctx, self.tables[c.lane], pairs, 2, c.kind,
                                  LLMD_COPY_PEER_DEVICE if c.single else 0, stream, &fail)
            else:
                base = c.desc_base + <Py_ssize_t>(layer - c.lo) * 2 * nruns
                k = base
                for t in range(2):
                    e = self.dst_index[i] + 2 * (layer - c.lo) + t
                    src = <char *><uintptr_t>self.src_addrs[2 * layer + t] + c.src_shift
                    dst = <char *><uintptr_t>self.dst_addrs[e]
                    for r in range(nruns):
                        self.d_dsts[k] = dst + runs[r].dst_off
                        self.d_srcs[k] = src + runs[r].src_off
                        self.d_sizes[k] = runs[r].nbytes
                        k += 1
                if c.lane == 3:
                    rc = self.engine_write(i, base, k - base)
                else:
                    rc = llmd_host_process_write_async(stream, c.pid, &self.d_dsts[base],
                                                       &self.d_srcs[base], &self.d_sizes[base],
                                                       k - base, &c.async_code)
            if rc != 0:
                c.code = rc
                c.fail_index = fail
                c.failed = ST_RUNTIME

    cdef int engine_write(self, int i, Py_ssize_t base, Py_ssize_t n) noexcept with gil:
        """Start one batched engine write of n descriptors; nonzero when it was refused or an
        earlier write of the config failed. The engine queues a bounded number of writes per
        peer (Mooncake's TCP transport: 1024 by default) and refuses the rest, so at most
        ENGINE_MAX_QUEUED runs are kept in flight: the oldest batches are waited for first."""
        cdef Py_ssize_t r, lo, hi
        transport, session, handles = self.engines[i]
        queued = sum(k for _, k in handles)
        for lo in range(base, base + n, ENGINE_MAX_QUEUED):
            hi = min(lo + ENGINE_MAX_QUEUED, base + n)
            while handles and queued + (hi - lo) > ENGINE_MAX_QUEUED:
                h, k = handles.pop(0)
                queued -= k
                rc = self.engine_wait(i, transport, h)
                if rc != 0:
                    return rc
            try:
                handles.append((transport.write_batch(
                    session, [<uintptr_t>self.d_srcs[r] for r in range(lo, hi)],
                    [<uintptr_t>self.d_dsts[r] for r in range(lo, hi)],
                    [self.d_sizes[r] for r in range(lo, hi)]), hi - lo))
            except Exception as exc:
                self.errors[i] = f"transfer engine refused a write: {exc}"
                return -1
            queued += hi - lo
        return 0

    cdef int engine_wait(self, int i, transport, handle):
        """Wait for one engine batch; 0 once its bytes arrived."""
        try:
            return transport.wait(handle, int(self.engine_wait_s * 1000))
        except Exception as exc:
            self.errors[i] = f"transfer engine wait failed: {exc}"
            return -1

    cdef settle_engines(self):
        """Wait for every engine write issued so far; fail the configs whose writes failed."""
        cdef CfgState *c
        for i in range(self.ncfg):
            if self.engines[i] is None:
                continue
            transport, session, handles = self.engines[i]
            c = &self.cfg[i]
            while handles:
                h, _ = handles.pop(0)
                rc = self.engine_wait(i, transport, h)
                if rc != 0 and c.failed in (0, ST_CANCELLED):
                    c.failed = ST_ENGINE
                    c.code = rc

    cdef int call_synchronizer(self, int layer) noexcept with gil:
        """Run the user's synchronizer for layer; returns ST_* (0 = go on)."""
        try:
            ok = self.synchronizer.synchronize_layer(layer, self.sync_timeout)
        except BaseException as exc:
            self.exception = exc
            self.sync_error = f"layer synchronizer raised at layer {layer}: {exc!r}"
            return ST_SYNC_RAISED
        if not ok:
            self.sync_error = f"layer synchronizer returned {ok!r} for layer {layer}"
            return ST_SYNC_FALSE
        return 0

    cdef int wait_events(self, int layer, int lanes) noexcept nogil:
        """Event readiness for layer: wait for the model to have recorded the layer's event, then
        make the runtime stream wait on it on the device (lane 0), or wait on the host before
        host-engine copies (lane 1). Returns ST_* (0 = go on); lane failures are recorded."""
        cdef int rc
        cdef const llmd_runtime *rt = self.runtime.rt
        rc = llmd_gate_wait(self.gate.gate, layer, self.wait_ms, &self.cancelled)
        if rc == LLMD_GATE_TIMEOUT:
            return ST_SYNC_TIMEOUT
        if rc != LLMD_GATE_OK:
            return 0            # stopped: the caller sees the cancellation
        # Copies queued on the runtime stream wait there; process writes share it on the host
        # runtime. Host-engine copies and engine writes are issued after a host-side wait.
        cdef bint shared = self.host_stream == self.stream
        cdef int device_lanes = (lanes & 1) | ((lanes & 4) if shared else 0)
        cdef int host_lanes = (lanes & (2 | 8)) | (0 if shared else (lanes & 4))
        if device_lanes:
            rc = rt.stream_wait_event(rt.ctx, self.stream, self.events[layer])
            if rc != 0:
                self.fail_lanes(layer, device_lanes, rc)
        if host_lanes:
            rc = rt.event_synchronize(rt.ctx, self.events[layer], self.wait_ms)
            if rc != 0:
                self.fail_lanes(layer, host_lanes, rc)
        return 0

    def run(self, Stream stream not None, Stream host_stream=None):
        """The layer loop: wait for each covered layer, then queue its copies, all without
        the GIL except for a Python synchronizer's call; then wait for the copies and publish."""
        cdef int layer, i, st, lanes
        cdef int rc = 0
        cdef const llmd_runtime *rt = self.runtime.rt
        cdef const llmd_runtime *hrt = self.host.rt
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        if self.cancelled or self.finished:
            PyThread_release_lock(self.lock)
            return
        self.stream = stream.handle
        self.host_stream = host_stream.handle if host_stream is not None else stream.handle
        PyThread_release_lock(self.lock)
        try:
            self.alloc_descriptors()
        except MemoryError:
            for i in range(self.ncfg):
                self.cfg[i].failed = ST_RUNTIME
                self.cfg[i].code = LLMD_HOST_ENOMEM
            self.publish()
            return
        with nogil:
            for layer in range(self.first_layer, self.last_layer):
                lanes = self.lanes_at(layer)
                if lanes == 0:
                    continue
                if self.cancelled:
                    break
                if self.events != NULL:
                    st = self.wait_events(layer, lanes)
                else:
                    st = self.call_synchronizer(layer)
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
                if self.cancelled:
                    PyThread_release_lock(self.lock)
                    break
                if st != 0:
                    self.fail_unfinished(layer, st)
                    PyThread_release_lock(self.lock)
                    break
                self.issue_layer(layer)
                self.issued_upto = layer + 1
                PyThread_release_lock(self.lock)
            rc = rt.stream_synchronize(rt.ctx, self.stream)
            if rc != 0:
                for i in range(self.ncfg):
                    if self.cfg[i].lane == 0 and self.cfg[i].attempted and not self.cfg[i].failed:
                        self.cfg[i].failed = ST_RUNTIME
                        self.cfg[i].code = rc
            if self.host_stream != self.stream:
                hrt.stream_synchronize(hrt.ctx, self.host_stream)
            self.release_tables()
        self.settle_engines()
        self.publish()

    def cancel(self, status_code, configs=None):
        """Stop the job (or only the given config indices) between layers, and wait until every
        copy it issued has landed. Configs it had started and not fully queued end with
        status_code; configs never started get None. The job ends when no config is left."""
        cdef llmd_stream s, hs
        cdef const llmd_runtime *rt = self.runtime.rt
        cdef const llmd_runtime *hrt = self.host.rt
        cdef int i, left = 0
        with nogil:             # the worker may hold the lock while it waits for the GIL
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
        if self.cancelled or self.finished:
            PyThread_release_lock(self.lock)
            return
        targets = range(self.ncfg) if configs is None else configs
        for i in targets:
            if self.cfg[i].hi > self.issued_upto and not self.cfg[i].failed:
                self.cfg[i].failed = ST_CANCELLED
                self.cancel_codes[i] = status_code
        for i in range(self.ncfg):
            if self.cfg[i].hi > self.issued_upto and not self.cfg[i].failed:
                left += 1
        if left == 0:
            self.cancelled = 1
            self.cancel_code = status_code
        s = self.stream
        hs = self.host_stream
        PyThread_release_lock(self.lock)
        if s != NULL:
            with nogil:
                rt.set_device(rt.ctx, self.runtime.device_id)
                rt.stream_synchronize(rt.ctx, s)
                if hs != s:
                    hrt.stream_synchronize(hrt.ctx, hs)
        self.settle_engines()
        if left == 0:
            self.publish()

    cdef publish(self):
        """Turn the per-config state into results (once) and wake waiters."""
        cdef CfgState *c
        if self.finished:
            return
        self.finished = 1
        results = []
        errors = list(self.errors)
        for i in range(self.ncfg):
            c = &self.cfg[i]
            if c.async_code != 0 and not c.failed:
                c.failed = ST_PROCESS       # a process write failed after it was queued
            if c.failed == ST_RUNTIME and c.lane == 3:
                c.failed = ST_ENGINE
            if (c.failed == 0 and c.attempted and self.links[i] is not None
                    and not self.links[i].peer_alive()):
                c.failed = ST_LINK          # the peer went away: its bytes are not known to be there
            if c.failed == 0:
                results.append(LLMStatusCode.LLM_SUCCESS if c.attempted else None)
            elif c.failed == ST_LINK:
                results.append(LLMStatusCode.LLM_LINK_FAILED)
                errors[i] = "the link to the destination cluster went down during the transfer"
            elif c.failed == ST_ENGINE:
                results.append(LLMStatusCode.LLM_TIMEOUT if c.code == -2 else LLMStatusCode.LLM_LINK_FAILED)
                if errors[i] is None:
                    errors[i] = (f"the transfer engine did not deliver the bytes "
                                 f"({'timed out' if c.code == -2 else f'code {c.code}'})")
            elif c.failed == ST_PROCESS:
                results.append(LLMStatusCode.LLM_LINK_FAILED if c.async_code == 3
                               else LLMStatusCode.LLM_FAILED)
                errors[i] = (f"writing into process {c.pid} failed: "
                             f"{os.strerror(c.async_code)} (errno {c.async_code})")
            elif c.failed == ST_RUNTIME:
                exc = (self.runtime if c.lane == 0 else self.host).error(
                    c.code, f"copy (entry {c.fail_index})")
                results.append(exc.status_code)
                errors[i] = str(exc)
            elif c.failed == ST_SYNC_FALSE:
                results.append(LLMStatusCode.LLM_PARAM_INVALID)
                errors[i] = self.sync_error
            elif c.failed == ST_SYNC_RAISED:
                results.append(LLMStatusCode.LLM_FAILED)
                errors[i] = self.sync_error
            elif c.failed == ST_SYNC_TIMEOUT:
                results.append(LLMStatusCode.LLM_TIMEOUT)
                errors[i] = (f"a layer's event was not recorded within {self.sync_timeout} ms "
                             f"(llm.SyncKvCacheWaitTime)")
            elif c.failed == ST_CANCELLED:
                if c.attempted:
                    code = self.cancel_codes[i]
                    results.append(code)
                    errors[i] = f"transfer cancelled: {code}"
                else:
                    results.append(None)
        self.results = results
        self.errors = errors
        self.done.set()
        cb = self.on_finish
        self.on_finish = None
        if cb is not None:
            cb(self)
