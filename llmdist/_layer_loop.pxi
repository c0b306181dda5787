# The layer loop: one transfer call, run on a transfer worker thread. For each covered layer it
# waits for readiness, then queues every config's runs on the config's lane; it knows lanes and
# engine channels, never which transport or API option a config came from.

# The most bytes one copy call covers when a job's layers are all ready at once (see
# TransferJob.layers_per_call).
cdef size_t GROUP_BYTES = <size_t>64 << 20


cdef inline int lane_bit(int lane) noexcept nogil:
    return 1 << lane


cdef class TransferJob:
    """One transfer call: the run template, every config's plan and the progress.

    run() is the layer loop, called on a transfer worker thread with that worker's streams.
    cancel() stops it between layers and waits until the copies it issued have landed. Once
    done is set, outcomes holds one Outcome per config."""

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __init__(self, Runtime runtime not None, Plan plan not None, list local_addrs,
                 list configs, synchronizer, sync_timeout=None, events=None, LayerGate gate=None,
                 int tensors_per_layer=2):
        """local_addrs: the tensor bases of the cache here (tensors_per_layer per layer: 2, K
        and V, or 1, MLA); configs: a ConfigPlan per config, of the same tensors_per_layer.
        synchronizer None: every layer is ready at once (pull, push). events (a list of Event,
        one per layer) with gate switch to event-based readiness; sync_timeout (ms, or None)
        bounds each layer's wait."""
        cdef Py_ssize_t i, j, total = 0, nl = len(local_addrs), slots = 0
        cdef CfgState *c
        cdef ConfigPlan cp
        cdef Event ev
        if tensors_per_layer not in (1, 2):
            raise ValueError(f"tensors_per_layer must be 1 or 2, got {tensors_per_layer}")
        self.tpl = tensors_per_layer
        self.runtime = runtime
        self.host = runtime if runtime.is_host else Runtime.host(runtime.device_id)
        self.plan = plan
        self.synchronizer = synchronizer
        self.has_sync = synchronizer is not None
        self.sync_timeout = sync_timeout
        self.wait_ms = -1 if sync_timeout is None else sync_timeout
        self.done = Done()
        self.outcomes = None
        self.configs = list(configs)
        self.cancel_codes = [None] * len(configs)
        self.ncfg = len(configs)
        self.cfg = <CfgState *>calloc(max(self.ncfg, 1), sizeof(CfgState))
        self.target_index = <Py_ssize_t *>calloc(max(self.ncfg, 1), sizeof(Py_ssize_t))
        self.local_addrs = <uint64_t *>malloc(max(nl, 1) * sizeof(uint64_t))
        if self.cfg == NULL or self.target_index == NULL or self.local_addrs == NULL:
            raise MemoryError()
        for i in range(nl):
            self.local_addrs[i] = local_addrs[i]
        self.first_layer = 1 << 30
        self.last_layer = 0
        for i in range(self.ncfg):
            cp = self.configs[i]
            if cp.tensors_per_layer != self.tpl:
                raise ValueError(f"config {i} has {cp.tensors_per_layer} tensors per layer, the "
                                 f"transfer {self.tpl}")
            if self.tpl * cp.stop_layer > nl:
                raise ValueError(f"config {i} covers layers up to {cp.stop_layer}, the cache here "
                                 f"has {nl // self.tpl}")
            c = &self.cfg[i]
            c.lo, c.hi, c.row_shift = cp.first_layer, cp.stop_layer, cp.row_shift
            c.kind, c.lane, c.direction = cp.kind, cp.lane, cp.direction
            c.pid, c.single = cp.pid, cp.single
            if cp.link is not None:
                c.link_up = &cp.link.up
            c.desc_base = slots
            if c.lane == LANE_PROCESS or c.lane == LANE_ENGINE:
                slots += <Py_ssize_t>(c.hi - c.lo) * self.tpl * plan.count
            self.target_index[i] = total
            total += len(cp.target_addrs)
            self.first_layer = min(self.first_layer, c.lo)
            self.last_layer = max(self.last_layer, c.hi)
        self.target_addrs = <uint64_t *>malloc(max(total, 1) * sizeof(uint64_t))
        self.target_limits = <uint64_t *>malloc(max(total, 1) * sizeof(uint64_t))
        if self.target_addrs == NULL or self.target_limits == NULL:
            raise MemoryError()
        for i in range(self.ncfg):
            cp = self.configs[i]
            for j in range(len(cp.target_addrs)):
                self.target_addrs[self.target_index[i] + j] = cp.target_addrs[j]
                self.target_limits[self.target_index[i] + j] = cp.target_limits[j]
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
        free(self.target_index)
        free(self.local_addrs)
        free(self.target_addrs)
        free(self.target_limits)
        llmd_pool_give(self.d_block, self.d_block_size)
        free(self.m_pairs)
        free(self.m_cfgs)
        free(self.pairs)
        self.release_tables()
        free(self.events)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    @property
    def num_configs(self):
        return self.ncfg

    cdef int alloc_descriptors(self, bint keep_gil) except -1:
        # Sized once per call, so the layer loop never allocates: a run table for each lane of
        # plain runtime copies, with room for every tensor pair the call copies on it, and one
        # descriptor per (config, covered layer, tensor, run) for process and engine transfers
        # (every queued transfer keeps its own).
        cdef Py_ssize_t n = 0, i
        cdef CfgState *c
        cdef size_t pairs[2]
        cdef int lane, rc
        cdef Runtime owner
        pairs[0] = pairs[1] = 0
        for i in range(self.ncfg):
            lane = self.cfg[i].lane
            if lane == LANE_RUNTIME or lane == LANE_HOST:
                pairs[lane] += <size_t>(self.cfg[i].hi - self.cfg[i].lo) * self.tpl
            else:
                n += <Py_ssize_t>(self.cfg[i].hi - self.cfg[i].lo) * self.tpl * self.plan.count
        for lane in (LANE_RUNTIME, LANE_HOST):
            if pairs[lane] == 0:
                continue
            owner = self.runtime if lane == LANE_RUNTIME else self.host
            if keep_gil:
                rc = owner.rt.run_table_create(owner.rt.ctx, self.plan.runs, self.plan.count,
                                               pairs[lane], &self.tables[lane])
            else:
                with nogil:
                    rc = owner.rt.run_table_create(owner.rt.ctx, self.plan.runs,
                                                   self.plan.count, pairs[lane],
                                                   &self.tables[lane])
            if rc != 0:
                raise MemoryError()
            self.table_rts[lane] = owner.rt
        self.group = self.layers_per_call()
        self.pairs = <llmd_tensor_pair *>malloc(self.tpl * self.group * sizeof(llmd_tensor_pair))
        if self.pairs == NULL:
            raise MemoryError()
        n = max(n, 1)
        self.d_block = llmd_pool_take(3 * n * sizeof(void *), &self.d_block_size)
        if self.d_block == NULL:
            raise MemoryError()
        self.d_dsts = <void **>self.d_block
        self.d_srcs = self.d_dsts + n
        self.d_sizes = <size_t *>(self.d_srcs + n)
        if self.runtime.device_copy == "kernel":
            for i in range(self.ncfg):
                c = &self.cfg[i]
                c.merged = (c.lane == LANE_RUNTIME and c.kind == COPY_D2D and not c.single)
            self.m_pairs = <llmd_tensor_pair *>malloc(
                max(self.tpl * self.group * self.ncfg, 1) * sizeof(llmd_tensor_pair))
            self.m_cfgs = <int *>malloc(max(self.ncfg, 1) * sizeof(int))
            if self.m_pairs == NULL or self.m_cfgs == NULL:
                raise MemoryError()
        return 0

    cdef int layers_per_call(self):
        """The most layers one copy call covers: as many as fit GROUP_BYTES, so that a call
        and hand-off to the copy engine (on CUDA, a launch) serves several layers while a
        cancellation still waits for a bounded amount of copying. Layers all ready at once
        (pull, push) go together; event-gated layers join the call of an earlier one when their
        events have completed by then (see finished_after); a Python synchronizer is asked
        layer by layer."""
        cdef size_t per_layer = 0
        cdef Py_ssize_t r
        cdef int span = max(self.last_layer - self.first_layer, 1)
        if self.has_sync and self.events == NULL:
            return 1
        for r in range(self.plan.count):
            per_layer += self.plan.runs[r].nbytes
        per_layer *= <size_t>(self.tpl * max(self.ncfg, 1))
        if per_layer == 0 or per_layer >= GROUP_BYTES:
            return 1
        return <int>min(<size_t>span, GROUP_BYTES // per_layer)

    cdef int finished_after(self, int layer) noexcept nogil:
        """Event-gated copies: the end of the layers after layer (whose wait is done) that the
        model has released and whose events have completed, up to the group size. A copy call
        issued for them waits for nothing more than layer's own does, so they join it."""
        cdef const llmd_runtime *rt = self.runtime.rt
        cdef int stop = layer + 1
        cdef int done
        while stop < self.last_layer and stop - layer < self.group:
            if llmd_gate_wait(self.gate.gate, stop, 0, NULL) != LLMD_GATE_OK:
                break
            done = 0
            if rt.event_query(rt.ctx, self.events[stop], &done) != 0 or not done:
                break
            stop += 1
        return stop

    cdef void release_tables(self) noexcept nogil:
        """Destroy the run tables (every stream that used them has been synchronized)."""
        cdef int lane
        for lane in range(2):
            if self.tables[lane] != NULL:
                self.table_rts[lane].run_table_destroy(self.table_rts[lane].ctx, self.tables[lane])
                self.tables[lane] = NULL

    cdef void fail_unfinished(self, int layer, int failure) noexcept nogil:
        """Fail every config whose copies are not all issued yet (ranges reaching past layer)."""
        cdef int i
        for i in range(self.ncfg):
            if self.cfg[i].hi > layer and not self.cfg[i].failed:
                self.cfg[i].failed = failure

    cdef void fail_lanes(self, int layer, int lanes, int code) noexcept nogil:
        """A runtime call made for layer on behalf of some lanes (lane_bit set) failed: fail
        their configs that cover the layer."""
        cdef int i
        for i in range(self.ncfg):
            if (lanes & lane_bit(self.cfg[i].lane) and self.cfg[i].lo <= layer < self.cfg[i].hi
                    and not self.cfg[i].failed):
                self.cfg[i].failed = FAIL_RUNTIME
                self.cfg[i].code = code

    cdef int lanes_between(self, int first, int stop) noexcept nogil:
        """lane_bit of every lane with a live config covering a layer of [first, stop)."""
        cdef int i, bits = 0
        for i in range(self.ncfg):
            if self.cfg[i].lo < stop and first < self.cfg[i].hi and not self.cfg[i].failed:
                bits |= lane_bit(self.cfg[i].lane)
        return bits

    cdef void issue_layers(self, int first, int stop) noexcept nogil:
        """Queue the copies of layers [first, stop) for every config covering them, one call
        per config (job lock held): one layer at a time when readiness gates the layers,
        several when they are all ready (pull, push). On CUDA with the copy kernel, the merged
        configs' tensors of those layers go in one call (one launch) after the loop."""
        cdef int i, t, rc, layer, lo, hi
        cdef CfgState *c
        cdef Py_ssize_t r, k, base, e, p
        cdef Run *runs = self.plan.runs
        cdef Py_ssize_t nruns = self.plan.count
        cdef char *local
        cdef char *target
        cdef uint64_t here
        cdef llmd_tensor_pair *pairs
        cdef const llmd_runtime *rt
        cdef llmd_stream stream
        cdef size_t fail = 0
        cdef int merged = 0             # merged configs in this call
        cdef Py_ssize_t mpairs = 0      # their tensor pairs so far
        # A synchronizer gates the layers one by one: its process batches go to the stream
        # thread, so that the next layer's call overlaps this layer's bytes, and layers queued
        # meanwhile move as one batch.
        cdef llmd_host_queueing queueing = LLMD_HOST_QUEUE if self.has_sync else LLMD_HOST_RUN_WHERE_IDLE
        for i in range(self.ncfg):
            c = &self.cfg[i]
            lo = max(first, c.lo)
            hi = min(stop, c.hi)
            if lo >= hi or c.failed:
                continue
            if c.link_up != NULL and not c.link_up[0]:
                c.failed = FAIL_LINK
                continue
            c.attempted = 1
            if c.lane == LANE_RUNTIME:
                rt = self.runtime.rt
                stream = self.stream
            else:
                rt = self.host.rt
                stream = self.host_stream
            if c.lane == LANE_RUNTIME or c.lane == LANE_HOST:
                # Plain runtime copies: the layers' tensor pairs (K and V, or one) through the
                # run table.
                pairs = &self.m_pairs[mpairs] if c.merged else self.pairs
                p = 0
                for layer in range(lo, hi):
                    for t in range(self.tpl):
                        e = self.target_index[i] + self.tpl * (layer - c.lo) + t
                        here = self.local_addrs[self.tpl * layer + t] + c.row_shift
                        if c.direction == WRITE:
                            pairs[p].src = here
                            pairs[p].dst = self.target_addrs[e]
                            pairs[p].dst_end = self.target_limits[e]
                        else:
                            # The cache here is the destination, its bounds checked by the
                            # cache manager: the end of what the runs write is its bound.
                            pairs[p].src = self.target_addrs[e]
                            pairs[p].dst = here
                            pairs[p].dst_end = here + self.plan.dst_hi
                        p += 1
                if c.merged:
                    self.m_cfgs[merged] = i
                    merged += 1
                    mpairs += p
                    continue
                rc = rt.copy_runs(rt.ctx, self.tables[c.lane], pairs, p, c.kind,
                                  LLMD_COPY_PEER_DEVICE if c.single else 0, stream, &fail)
            else:
                base = c.desc_base + <Py_ssize_t>(lo - c.lo) * self.tpl * nruns
                k = base
                for layer in range(lo, hi):
                    for t in range(self.tpl):
                        e = self.target_index[i] + self.tpl * (layer - c.lo) + t
                        local = (<char *><uintptr_t>self.local_addrs[self.tpl * layer + t]
                                 + c.row_shift)
                        target = <char *><uintptr_t>self.target_addrs[e]
                        for r in range(nruns):
                            self.d_sizes[k] = runs[r].nbytes
                            if c.direction == WRITE:
                                self.d_srcs[k] = local + runs[r].src_off
                                self.d_dsts[k] = target + runs[r].dst_off
                            else:
                                self.d_srcs[k] = target + runs[r].src_off
                                self.d_dsts[k] = local + runs[r].dst_off
                            k += 1
                if c.lane == LANE_ENGINE:
                    rc = self.engine_move(i, base, k - base)
                elif c.direction == WRITE:
                    rc = llmd_host_process_write_async(stream, c.pid, &self.d_dsts[base],
                                                       &self.d_srcs[base], &self.d_sizes[base],
                                                       k - base, &c.async_code, queueing)
                else:
                    rc = llmd_host_process_read_async(stream, c.pid, &self.d_dsts[base],
                                                      &self.d_srcs[base], &self.d_sizes[base],
                                                      k - base, &c.async_code, queueing)
            if rc != 0:
                c.code = rc
                c.fail_index = fail
                c.failed = FAIL_ENGINE if c.lane == LANE_ENGINE else FAIL_RUNTIME
        if merged:
            # One call (on CUDA one kernel launch) for every merged config's tensors of these
            # layers, after their waits; if it fails, nothing of it was queued and each of
            # those configs fails.
            rt = self.runtime.rt
            rc = rt.copy_runs(rt.ctx, self.tables[<int>LANE_RUNTIME], self.m_pairs, mpairs,
                              COPY_D2D, 0, self.stream, &fail)
            if rc != 0:
                for i in range(merged):
                    c = &self.cfg[self.m_cfgs[i]]
                    c.code = rc
                    c.fail_index = fail
                    c.failed = FAIL_RUNTIME

    cdef int engine_move(self, int i, Py_ssize_t base, Py_ssize_t n) noexcept with gil:
        """Hand n descriptors to config i's engine channel (which bounds what it keeps queued);
        nonzero when the engine refused them or an earlier batch failed."""
        cdef Py_ssize_t r
        channel = (<ConfigPlan>self.configs[i]).engine
        srcs = [<uintptr_t>self.d_srcs[r] for r in range(base, base + n)]
        dsts = [<uintptr_t>self.d_dsts[r] for r in range(base, base + n)]
        sizes = [self.d_sizes[r] for r in range(base, base + n)]
        if self.cfg[i].direction == WRITE:
            return channel.write(srcs, dsts, sizes)
        return channel.read(dsts, srcs, sizes)

    cdef settle_engines(self):
        """Wait for every engine batch issued so far; fail the configs whose batches failed."""
        cdef CfgState *c
        cdef ConfigPlan cp
        for i in range(self.ncfg):
            cp = self.configs[i]
            if cp.engine is None:
                continue
            c = &self.cfg[i]
            rc = cp.engine.settle()
            if rc != 0 and c.failed in (FAIL_NONE, FAIL_CANCELLED):
                c.failed = FAIL_ENGINE
                c.code = rc

    cdef int call_synchronizer(self, int layer) noexcept with gil:
        """Run the user's synchronizer for layer; returns a Failure (FAIL_NONE: go on)."""
        try:
            ok = self.synchronizer.synchronize_layer(layer, self.sync_timeout)
        except BaseException as exc:
            self.exception = exc
            self.sync_layer = layer
            return FAIL_SYNC_RAISED
        if not ok:
            self.sync_value = ok
            self.sync_layer = layer
            return FAIL_SYNC_FALSE
        return FAIL_NONE

    cdef int wait_events(self, int layer, int lanes) noexcept nogil:
        """Event readiness for layer: wait for the model to have recorded the layer's event, then
        make the runtime stream wait on it on the device, or wait on the host before copies that
        the host issues. Returns a Failure (FAIL_NONE: go on); lane failures are recorded."""
        cdef int rc
        cdef const llmd_runtime *rt = self.runtime.rt
        rc = llmd_gate_wait(self.gate.gate, layer, self.wait_ms, &self.cancelled)
        if rc == LLMD_GATE_TIMEOUT:
            return FAIL_SYNC_TIMEOUT
        if rc != LLMD_GATE_OK:
            return FAIL_NONE    # stopped: the caller sees the cancellation
        # Copies queued on the runtime stream wait there; process transfers share it on the host
        # runtime. Host-engine copies and engine transfers are issued after a host-side wait.
        cdef bint shared = self.host_stream == self.stream
        cdef int process = lane_bit(LANE_PROCESS)
        cdef int device_lanes = (lanes & lane_bit(LANE_RUNTIME)) | ((lanes & process) if shared else 0)
        cdef int host_lanes = ((lanes & (lane_bit(LANE_HOST) | lane_bit(LANE_ENGINE)))
                               | (0 if shared else (lanes & process)))
        if device_lanes:
            rc = rt.stream_wait_event(rt.ctx, self.stream, self.events[layer])
            if rc != 0:
                self.fail_lanes(layer, device_lanes, rc)
        if host_lanes:
            rc = rt.event_synchronize(rt.ctx, self.events[layer], self.wait_ms)
            if rc != 0:
                self.fail_lanes(layer, host_lanes, rc)
        return FAIL_NONE

    def run(self, Stream stream not None, Stream host_stream=None, size_t keep_gil_bytes=0):
        """The layer loop: wait for each covered layer, then queue its copies, all without
        the GIL except for a Python synchronizer's call; then wait for the copies and report.
        A job with every layer ready that moves at most keep_gil_bytes keeps the GIL instead:
        a short copy ends sooner than another busy Python thread would hand the GIL back."""
        cdef bint keep_gil
        cdef int i
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        if self.cancelled or self.finished:
            PyThread_release_lock(self.lock)
            return
        self.stream = stream.handle
        self.host_stream = host_stream.handle if host_stream is not None else stream.handle
        PyThread_release_lock(self.lock)
        keep_gil = self.holds_gil = self.keeps_gil(keep_gil_bytes)
        try:
            self.alloc_descriptors(keep_gil)
        except MemoryError:
            for i in range(self.ncfg):
                self.cfg[i].failed = FAIL_RUNTIME
                self.cfg[i].code = LLMD_HOST_ENOMEM
            self.report()
            return
        if keep_gil:
            self.loop()
        else:
            with nogil:
                self.loop()
        self.settle_engines()
        self.report()

    def keeps_gil(self, size_t keep_gil_bytes):
        """Whether run(..., keep_gil_bytes) keeps the GIL: every layer is ready (no
        synchronizer, no events) and the job moves at most keep_gil_bytes."""
        return not self.has_sync and self.events == NULL and self.job_bytes() <= keep_gil_bytes

    def needs_deadline(self, size_t keep_gil_bytes):
        """Whether a caller running the job on its own thread (run(..., keep_gil_bytes)) needs
        a deadline thread to cancel it: only a job that releases the GIL and issues its copies
        in more than one call (gated layers, or more than GROUP_BYTES) can be stopped part
        way; one issued in a single call can only end late, which the caller's clock sees."""
        cdef size_t per_layer
        cdef int span = max(self.last_layer - self.first_layer, 1)
        if self.keeps_gil(keep_gil_bytes):
            return False
        if self.has_sync or self.events != NULL:
            return True
        per_layer = self.plan.nbytes * <size_t>(self.tpl * max(self.ncfg, 1))
        if per_layer == 0 or per_layer >= GROUP_BYTES:
            return span > 1
        return <size_t>span > GROUP_BYTES // per_layer

    cdef size_t job_bytes(self) noexcept:
        """The bytes every config of the job moves."""
        cdef size_t total = 0
        cdef int i
        for i in range(self.ncfg):
            total += <size_t>(self.cfg[i].hi - self.cfg[i].lo) * self.tpl * self.plan.nbytes
        return total

    cdef void loop(self) noexcept nogil:
        """Queue each layer's copies as it becomes ready, then wait for them all."""
        cdef int layer, stop, i, st, lanes
        cdef int rc = 0
        cdef const llmd_runtime *rt = self.runtime.rt
        cdef const llmd_runtime *hrt = self.host.rt
        layer = self.first_layer
        while layer < self.last_layer:
            # layers ready at once go up to the group size per call; gated ones one by one,
            # with any later ones already finished
            stop = (layer + 1 if self.has_sync or self.events != NULL
                    else min(layer + self.group, self.last_layer))
            lanes = self.lanes_between(layer, stop)
            if lanes == 0:
                layer = stop
                continue
            if self.cancelled:
                break
            if self.events != NULL:
                st = self.wait_events(layer, lanes)
                if st == FAIL_NONE:
                    stop = self.finished_after(layer)
            elif self.has_sync:
                st = self.call_synchronizer(layer)
            else:
                st = FAIL_NONE  # no synchronizer: every layer is ready (pull, push)
            self.take_lock()
            if self.cancelled:
                PyThread_release_lock(self.lock)
                break
            if st != 0:
                self.fail_unfinished(layer, st)
                PyThread_release_lock(self.lock)
                break
            self.issue_layers(layer, stop)
            self.issued_upto = stop
            PyThread_release_lock(self.lock)
            layer = stop
        rc = rt.stream_synchronize(rt.ctx, self.stream)
        if rc != 0:
            for i in range(self.ncfg):
                if self.cfg[i].lane == LANE_RUNTIME and self.cfg[i].attempted and not self.cfg[i].failed:
                    self.cfg[i].failed = FAIL_RUNTIME
                    self.cfg[i].code = rc
        if self.host_stream != self.stream:
            hrt.stream_synchronize(hrt.ctx, self.host_stream)
        self.release_tables()

    cdef void take_lock(self) noexcept nogil:
        """Take the job's lock from the layer loop. A loop that holds the GIL (run's
        keep_gil_bytes) waits for it without the GIL: a canceller holding the lock may be
        waiting for the GIL."""
        if not self.holds_gil:
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
        elif not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            self.wait_for_lock()

    cdef void wait_for_lock(self) noexcept with gil:
        with nogil:
            PyThread_acquire_lock(self.lock, WAIT_LOCK)

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
                self.cfg[i].failed = FAIL_CANCELLED
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
            self.report()

    cdef report(self):
        """Record each config's Outcome (once) and wake waiters."""
        cdef CfgState *c
        cdef ConfigPlan cp
        cdef Outcome o
        cdef Runtime owner
        if self.finished:
            return
        self.finished = 1
        outcomes = []
        for i in range(self.ncfg):
            c = &self.cfg[i]
            cp = self.configs[i]
            if c.async_code != 0 and not c.failed:
                c.failed = FAIL_PROCESS     # a process transfer failed after it was queued
            if c.failed == FAIL_RUNTIME and c.lane == LANE_ENGINE:
                c.failed = FAIL_ENGINE      # a host-side wait or allocation for engine transfers
            if (c.failed == FAIL_NONE and c.attempted and cp.link is not None
                    and not cp.link.peer_alive()):
                c.failed = FAIL_LINK        # the peer went away: its bytes are not known to be there
            o = Outcome.__new__(Outcome)
            o.failure = c.failed
            o.attempted = c.attempted
            o.lane = c.lane
            o.direction = c.direction
            o.code = c.code
            o.os_error = c.async_code
            o.pid = c.pid
            if c.failed == FAIL_RUNTIME:
                owner = self.runtime if c.lane == LANE_RUNTIME else self.host
                o.runtime_error = runtime_error(owner.rt, c.code, f"copy (entry {c.fail_index})")
            elif c.failed == FAIL_ENGINE:
                o.engine_status, o.detail = cp.engine.verdict(c.code)
            elif c.failed == FAIL_CANCELLED:
                o.cancel_status = self.cancel_codes[i]
            outcomes.append(o)
        self.outcomes = outcomes
        self.done.set()
        cb = self.on_finish
        self.on_finish = None
        if cb is not None:
            cb(self)
