# A local pull_blocks of a shape pulled before, in one compiled step.

import time as _time


cdef class LocalPull:
    """pull_blocks from a BlocksCacheKey of this cluster into one blocks cache, with the layer
    ranges of a call the full path (reads.pull) resolved in the current generation of the
    cluster's memory. A later call with other blocks runs here when every check passes: the
    planner's Python steps cost more than the copies of a small pull, more so once those
    copies have pushed the interpreter out of the CPU caches. Anything in doubt (a bad
    argument, a change of the memory, no idle worker, no free task slot) is left to the full
    path, which reports it as it always did. Attributes: _core.pxd."""

    def __init__(self, *, planner, mem, long long generation, Runtime runtime not None,
                 ConfigPlan config not None, list dst_addrs, object inflight_entry, str what,
                 size_t stride, uint64_t src_blocks, uint64_t dst_blocks, size_t src_size,
                 size_t dst_size, int tensors_per_layer, int wait_ms):
        self.planner = planner
        self.mem = mem
        self.generation = generation
        self.runtime = runtime
        self.config = config
        self.dst_addrs = dst_addrs
        self.inflight_entry = inflight_entry
        self.what = what
        self.stride = stride
        self.src_blocks = src_blocks
        self.dst_blocks = dst_blocks
        self.src_size = src_size
        self.dst_size = dst_size
        self.tpl = tensors_per_layer
        self.wait_ms = wait_ms

    def run(self, src_blocks, dst_blocks):
        """True once the blocks are copied; False when nothing was done and the full path must
        take the call. A copy that fails raises the full path's error (planner.verdict)."""
        cdef Indices a, b
        cdef Plan plan
        cdef TransferJob job
        cdef Slots slots
        cdef Outcome o
        pl = self.planner
        if pl.closed or self.mem.generation != self.generation:
            return False
        try:
            a = parse_indices("src_blocks", src_blocks)
            b = parse_indices("dst_blocks", dst_blocks)
        except Exception:
            return False
        if (a.size == 0 or a.size != b.size or a.max_value_c >= self.src_blocks
                or b.max_value_c >= self.dst_blocks):
            return False
        plan = plan_b2b(a, b, self.stride)
        if (not plan.dst_distinct or plan.src_hi > self.src_size
                or plan.dst_hi > self.dst_size):
            return False
        # a worker idle: no job queued before this one that it would pass
        if pl.workers.idle <= 0:
            return False
        slots = pl.slots
        if not slots.acquire(0.0):
            return False
        try:
            with pl.lock:
                if pl.closed or self.mem.generation != self.generation:
                    slots.release()
                    return False
                job = TransferJob(self.runtime, plan, self.dst_addrs, [self.config], None,
                                  pl.sync_timeout, tensors_per_layer=self.tpl)
                pl.inflight[job] = self.inflight_entry
                job.on_finish = pl.job_done
        except BaseException:
            slots.release()
            raise
        t0 = _time.monotonic()
        pl.run_here(job, self.wait_ms)
        # planner.verdict's success case, read from the one outcome without its Python steps;
        # anything else goes through verdict, which raises what the full path raises
        if job.cancel_code is None and _time.monotonic() - t0 < self.wait_ms / 1000.0:
            o = job.outcomes[0]
            if o.failure == FAIL_NONE and o.attempted:
                return True
        pl.verdict(job, self.what, self.wait_ms, t0)
        return True
