# The layer loop: one transfer_cache_async call, run on a transfer worker thread.

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
    int by_kernel           # lane 0 device-to-device on CUDA: copied by the layer's one kernel launch


# Most runs one config keeps queued in a transfer engine at once (below Mooncake's per-peer
# queue of 1024 writes).
ENGINE_MAX_QUEUED = 512

# Why a config failed; turned into LLMStatusCode when results are published.
cdef enum:
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
    cdef void **d_dsts
    cdef void **d_srcs
    cdef size_t *d_sizes
    cdef size_t *d_maxs
    cdef PyThread_type_lock lock
    cdef llmd_stream stream           # the runtime stream of the worker running the job
    cdef llmd_stream host_stream      # its host-engine stream (lane 1), or NULL
    cdef volatile int cancelled
    cdef int finished
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
    # CUDA copy kernel: the call's run table in device memory and one layer's pairs
    cdef Py_ssize_t kernel_pairs      # tensor pairs of all by_kernel configs over all layers
    cdef llmd_cuda_copy_table *ktab
    cdef uint64_t *k_srcs
    cdef uint64_t *k_dsts
    cdef uint64_t *k_ends
    cdef int *k_cfgs

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, Runtime runtime not None, Plan plan not None, list src_addrs,
                 list configs, synchronizer, sync_timeout=None, events=None, LayerGate gate=None):
        """configs: (first_layer, stop_layer, src_shift, kind, lane, dst_addrs, dst_limits, pid,
        link, engine, single) per config, with 2 destination addresses and limits per covered
        layer; pid is the destination process for lane 2, link the LinkFlag of a peer or None,
        engine (transport, session) for lane 3, single true to copy run by run. events (a list of
        Event, one per source layer) with gate switch to event-based readiness."""
        cdef Py_ssize_t i, j, total = 0, nl = len(src_addrs), slots = 0
        cdef CfgState *c
        cdef Event ev
        self.runtime = runtime
        self.host = runtime if runtime.name == "host" else Runtime.host(runtime.device_id)
        self.plan = plan
        self.synchronizer = synchronizer
        self.sync_timeout = sync_timeout
        self.wait_ms = -1 if sync_timeout is None else sync_timeout
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
            slots += <Py_ssize_t>(c.hi - c.lo) * 2 * plan.count
            self.dst_index[i] = total
            total += len(spec[5])
            self.first_layer = min(self.first_layer, c.lo)
            self.last_layer = max(self.last_layer, c.hi)
            if (runtime.device_copy == "kernel" and c.lane == 0 and c.kind == LLMD_MEMCPY_D2D
                    and plan.count > 0):
                c.by_kernel = 1
                self.kernel_pairs += 2 * (c.hi - c.lo)
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
        free(self.d_maxs)
        free(self.events)
        free(self.k_srcs)
        free(self.k_dsts)
        free(self.k_ends)
        free(self.k_cfgs)
        if self.ktab != NULL:
            llmd_cuda_copy_table_destroy(&g_cuda_kernel, self.ktab)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    @property
    def num_configs(self):
        return self.ncfg

    cdef int alloc_descriptors(self) except -1:
        # One slot per (config, covered layer, tensor, run): sized once per call, so the
        # layer loop never allocates, and every queued batch keeps its own descriptors.
        cdef Py_ssize_t n = 0, i
        for i in range(self.ncfg):
            n += <Py_ssize_t>(self.cfg[i].hi - self.cfg[i].lo) * 2 * self.plan.count
        n = max(n, 1)
        self.d_dsts = <void **>malloc(n * sizeof(void *))
        self.d_srcs = <void **>malloc(n * sizeof(void *))
        self.d_sizes = <size_t *>malloc(n * sizeof(size_t))
        self.d_maxs = <size_t *>malloc(n * sizeof(size_t))
        if not (self.d_dsts and self.d_srcs and self.d_sizes and self.d_maxs):
            raise MemoryError()
        if self.kernel_pairs:
            self.k_srcs = <uint64_t *>malloc(2 * self.ncfg * sizeof(uint64_t))
            self.k_dsts = <uint64_t *>malloc(2 * self.ncfg * sizeof(uint64_t))
            self.k_ends = <uint64_t *>malloc(2 * self.ncfg * sizeof(uint64_t))
            self.k_cfgs = <int *>malloc(self.ncfg * sizeof(int))
            if not (self.k_srcs and self.k_dsts and self.k_ends and self.k_cfgs):
                raise MemoryError()
        return 0

    cdef void kernel_prepare(self) noexcept nogil:
        """The run table reaches the device once per call (with the first launch); when it
        cannot be made, the configs it was for fail."""
        cdef int i, rc
        rc = llmd_cuda_copy_table_create(&g_cuda_kernel, <const uint64_t *>self.plan.runs,
                                         self.plan.count, self.kernel_pairs, &self.ktab)
        if rc != 0:
            self.ktab = NULL
            for i in range(self.ncfg):
                if self.cfg[i].by_kernel and not self.cfg[i].failed:
                    self.cfg[i].failed = ST_RUNTIME
                    self.cfg[i].code = rc

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
        cdef uint64_t limit
        cdef const llmd_runtime *rt
        cdef llmd_stream stream
        cdef size_t fail = 0
        cdef size_t npairs = 0
        cdef int nkcfg = 0
        for i in range(self.ncfg):
            c = &self.cfg[i]
            if layer < c.lo or layer >= c.hi or c.failed:
                continue
            if c.link_up != NULL and not c.link_up[0]:
                c.failed = ST_LINK
                continue
            c.attempted = 1
            if c.by_kernel:
                for t in range(2):
                    e = self.dst_index[i] + 2 * (layer - c.lo) + t
                    self.k_srcs[npairs] = self.src_addrs[2 * layer + t] + c.src_shift
                    self.k_dsts[npairs] = self.dst_addrs[e]
                    self.k_ends[npairs] = self.dst_limits[e]
                    npairs += 1
                self.k_cfgs[nkcfg] = i
                nkcfg += 1
                continue
            if c.lane == 0:
                rt = self.runtime.rt
                stream = self.stream
            else:
                rt = self.host.rt
                stream = self.host_stream
            base = c.desc_base + <Py_ssize_t>(layer - c.lo) * 2 * nruns
            k = base
            for t in range(2):
                e = self.dst_index[i] + 2 * (layer - c.lo) + t
                src = <char *><uintptr_t>self.src_addrs[2 * layer + t] + c.src_shift
                dst = <char *><uintptr_t>self.dst_addrs[e]
                limit = self.dst_limits[e]
                for r in range(nruns):
                    self.d_dsts[k] = dst + runs[r].dst_off
                    self.d_srcs[k] = src + runs[r].src_off
                    self.d_sizes[k] = runs[r].nbytes
                    self.d_maxs[k] = <size_t>(limit - <uint64_t><uintptr_t>self.d_dsts[k])
                    k += 1
            rc = 0
            if c.lane == 3:
                rc = self.engine_write(i, base, k - base)
            elif c.lane == 2:
                rc = llmd_host_process_write_async(stream, c.pid, &self.d_dsts[base],
                                                   &self.d_srcs[base], &self.d_sizes[base],
                                                   k - base, &c.async_code)
            elif not c.single and rt.memcpy_batch_async != NULL:
                rc = rt.memcpy_batch_async(rt.ctx, &self.d_dsts[base], &self.d_maxs[base],
                                           &self.d_srcs[base], &self.d_sizes[base], k - base,
                                           c.kind, stream, &fail)
            else:
                for r in range(base, k):
                    rc = rt.memcpy_async(rt.ctx, self.d_dsts[r], self.d_maxs[r], self.d_srcs[r],
                                         self.d_sizes[r], c.kind, stream)
                    if rc != 0:
                        fail = r - base
                        break
            if rc != 0:
                c.code = rc
                c.fail_index = fail
                c.failed = ST_RUNTIME
        if npairs:
            # One launch for every kernel config's tensors of this layer, after the layer's wait.
            rc = llmd_cuda_copy_launch(&g_cuda_kernel, self.ktab, self.k_srcs, self.k_dsts,
                                       self.k_ends, npairs, self.stream, &fail)
            if rc != 0:
                for i in range(nkcfg):
                    c = &self.cfg[self.k_cfgs[i]]
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
            if self.kernel_pairs:
                self.kernel_prepare()
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
            if self.ktab != NULL:
                llmd_cuda_copy_table_destroy(&g_cuda_kernel, self.ktab)
                self.ktab = NULL
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
                rname = self.runtime.name if c.lane == 0 else "host"
                text = (self.runtime if c.lane == 0 else self.host).text(c.code)
                exc = runtime_error(rname, c.code, f"copy (entry {c.fail_index})", text)
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
