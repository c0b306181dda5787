# cython: language_level=3
# The compiled core's declarations: the C interfaces it calls (_decl.pxi) and every compiled
# class with its C attributes and C methods. _core.pyx and its .pxi parts implement them; a
# further Cython module shares them with `from llmdist._core cimport ...`.

include "_decl.pxi"

from cpython.pythread cimport PyThread_type_lock
cimport cython

ctypedef llmd_run Run        # the runtime interface's run: a plan's runs feed its run tables

cdef struct CfgState:
    int lo, hi              # layers [lo, hi) of the cache here
    size_t row_shift        # bytes added to each tensor base of the cache here (its row)
    int kind                # CopyKind
    int lane                # Lane
    int direction           # Direction
    int pid                 # LANE_PROCESS: the other process
    int single              # LANE_RUNTIME: copy run by run, never in a batch call
    int async_code          # LANE_PROCESS: errno of a failed transfer, set by the host stream
    const volatile int *link_up  # the link to the other cluster (NULL: this process)
    int code                # runtime or engine error code, 0 while fine
    int failed              # Failure once the config has failed
    int attempted           # some layer's copies were issued
    size_t fail_index
    Py_ssize_t desc_base    # first descriptor slot of this config
    int merged              # LANE_RUNTIME device to device, copied together with the other
                            # merged configs of the layer in one copy_runs call


cdef class Runtime:  # _runtime.pxi
    cdef const llmd_runtime *rt
    cdef readonly str name
    cdef readonly int device_id
    cdef readonly str version
    cdef readonly str library
    @staticmethod
    cdef Runtime wrap(const llmd_runtime *rt, int device_id, str version, str library)
    @staticmethod
    cdef Runtime load(list paths, int device_id, bint acl, bint try_loaded)
    cdef int check(self, int code, str op) except -1


cdef class Stream:  # _runtime.pxi
    cdef readonly Runtime runtime
    cdef llmd_stream handle


cdef class Event:  # _runtime.pxi
    cdef readonly Runtime runtime
    cdef llmd_event handle
    cdef bint owned


cdef class LinkFlag:  # _link.pxi
    cdef volatile int up
    cdef public int pid
    cdef readonly int pidfd


cdef class Indices:  # _indices.pxi
    cdef uint64_t *data
    cdef readonly Py_ssize_t size
    cdef readonly object max_value
    cdef uint64_t max_value_c       # max_value as a C integer (0 when empty)


@cython.final    # add and finish run once per pair and run: called directly, not through a table
cdef class Plan:  # _planner.pxi
    cdef Run *runs
    cdef readonly Py_ssize_t count
    cdef readonly size_t dst_lo, dst_hi    # the destination bytes any run touches, from a tensor base
    cdef readonly size_t src_lo, src_hi    # the same for the source (a pull checks it)
    cdef readonly size_t nbytes             # the bytes of all runs (one tensor's share)
    cdef bint overflow          # some block offset does not fit the address space
    cdef readonly bint dst_distinct     # plan_b2b: no destination block repeats
    cdef int reserve(self, Py_ssize_t n) except -1
    cdef void add(self, size_t src_off, size_t dst_off, size_t nbytes) noexcept nogil
    cdef void finish(self) noexcept nogil


cdef class LayerGate:  # _gate.pxi
    cdef llmd_gate *gate
    cdef readonly int num_layers


cdef class ConfigPlan:  # _config_plan.pxi
    cdef readonly int first_layer, stop_layer
    cdef readonly size_t row_shift
    cdef readonly int kind
    cdef readonly int lane
    cdef readonly int direction
    cdef readonly list target_addrs
    cdef readonly list target_limits
    cdef readonly int pid
    cdef readonly LinkFlag link
    cdef readonly object engine
    cdef readonly bint single
    cdef readonly int tensors_per_layer


cdef class Outcome:  # _outcome.pxi
    cdef readonly int failure
    cdef readonly bint attempted
    cdef readonly int lane
    cdef readonly int direction
    cdef readonly int code              # FAIL_ENGINE: the engine channel's code
    cdef readonly int os_error          # FAIL_PROCESS: the errno
    cdef readonly int pid               # FAIL_PROCESS: the other process
    cdef readonly object runtime_error  # FAIL_RUNTIME: the LLMException of the failed call
    cdef readonly object engine_status  # FAIL_ENGINE: the status the engine channel gives it
    cdef readonly object detail         # FAIL_ENGINE: the engine channel's text for it
    cdef readonly object cancel_status  # FAIL_CANCELLED: the status cancel() was given


cdef class TransferJob:  # _layer_loop.pxi
    cdef Runtime runtime
    cdef Runtime host
    cdef Plan plan
    cdef int ncfg, first_layer, last_layer
    cdef CfgState *cfg
    cdef uint64_t *local_addrs        # the cache here: tpl tensor bases per layer
    cdef uint64_t *target_addrs       # per config: tpl per covered layer
    cdef uint64_t *target_limits      # the end of the region holding each target tensor
    cdef Py_ssize_t *target_index     # where each config's entries start in target_addrs
    cdef llmd_run_table *tables[2]    # the plan's runs for LANE_RUNTIME and LANE_HOST copies
    cdef const llmd_runtime *table_rts[2]   # the runtime that made each table
    cdef void **d_dsts                # LANE_PROCESS, LANE_ENGINE: per-run descriptors
    cdef void **d_srcs
    cdef size_t *d_sizes
    cdef void *d_block                # the pooled buffer holding them
    cdef size_t d_block_size
    cdef PyThread_type_lock lock
    cdef llmd_stream stream           # the runtime stream of the worker running the job
    cdef llmd_stream host_stream      # its host-engine stream (LANE_HOST, LANE_PROCESS)
    cdef volatile int cancelled
    cdef int finished
    cdef int tpl                      # tensors per layer on both sides: 2 (K and V) or 1 (MLA)
    cdef bint has_sync                # a LayerSynchronizer gates the layers (else all are ready)
    cdef int issued_upto              # every layer below this has had its copies queued
    cdef llmd_event *events           # event-based readiness: one event per layer
    cdef int nevents
    cdef LayerGate gate
    cdef int32_t wait_ms
    cdef readonly list configs        # the ConfigPlan of each config
    cdef readonly object synchronizer
    cdef readonly object sync_timeout
    cdef readonly object done
    cdef readonly list outcomes
    cdef readonly object exception    # what the layer synchronizer raised
    cdef readonly object sync_layer   # the layer at which the synchronizer failed
    cdef readonly object sync_value   # the false value the synchronizer returned
    cdef readonly object cancel_code
    cdef list cancel_codes            # per config, the status a cancellation gave it
    cdef public object on_finish
    # On CUDA with the copy kernel, one copy_runs call (one launch) per layer covers every merged
    # config: their tensor pairs are gathered here (sized once per call)
    cdef llmd_tensor_pair *m_pairs
    cdef int *m_cfgs
    cdef llmd_tensor_pair *pairs      # one config's tensor pairs of the layers of one call
    cdef int group                    # the most layers one copy call covers
    cdef bint holds_gil               # run() keeps the GIL through the layer loop
    cdef int alloc_descriptors(self, bint keep_gil) except -1
    cdef size_t job_bytes(self) noexcept
    cdef void loop(self) noexcept nogil
    cdef void take_lock(self) noexcept nogil
    cdef void wait_for_lock(self) noexcept with gil
    cdef int layers_per_call(self)
    cdef int finished_after(self, int layer) noexcept nogil
    cdef void release_tables(self) noexcept nogil
    cdef void fail_unfinished(self, int layer, int failure) noexcept nogil
    cdef void fail_lanes(self, int layer, int lanes, int code) noexcept nogil
    cdef int lanes_between(self, int first, int stop) noexcept nogil
    cdef void issue_layers(self, int first, int stop) noexcept nogil
    cdef int engine_move(self, int i, Py_ssize_t base, Py_ssize_t n) noexcept with gil
    cdef settle_engines(self)
    cdef int call_synchronizer(self, int layer) noexcept with gil
    cdef int wait_events(self, int layer, int lanes) noexcept nogil
    cdef report(self)


cdef class ProcessVmBaseline:  # _process_vm_baseline.pxi
    cdef iovec *local
    cdef iovec *remote
    cdef size_t count
    cdef readonly int pid
    cdef readonly bint write
    cdef readonly int threads


cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass


cdef class Slots:  # _slots.pxi
    cdef sem_t sem
    cdef bint ready
    cdef readonly int size


cdef class Done:  # _done.pxi
    cdef object lock
    cdef bint flag


cdef class LocalPull:  # _local_pull.pxi
    cdef object planner               # the transfers.Planner of the cluster
    cdef object mem                   # its ClusterMemory
    cdef long long generation         # the memory's generation the shape was resolved in
    cdef Runtime runtime
    cdef ConfigPlan config
    cdef list dst_addrs               # the destination cache's tensor addresses
    cdef object inflight_entry        # what Planner.inflight records for the job
    cdef str what                     # the failure messages' name of the call
    cdef size_t stride                # block bytes, the same on both sides
    cdef uint64_t src_blocks, dst_blocks    # the caches' block counts
    cdef size_t src_size, dst_size    # the caches' tensor bytes
    cdef int tpl
    cdef int wait_ms                  # llm.SyncKvCacheWaitTime
