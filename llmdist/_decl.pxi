# C declarations of the runtime interface (include/llmdist/runtime.h), the device runtimes'
# loaders, the host runtime, the benchmarks' process_vm baseline and the layer gates.

from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t

cdef extern from "llmdist/runtime.h" nogil:
    ctypedef void *llmd_stream
    ctypedef void *llmd_event

    enum:
        LLMD_MEMCPY_H2H
        LLMD_MEMCPY_H2D
        LLMD_MEMCPY_D2H
        LLMD_MEMCPY_D2D
        LLMD_MEMCPY_DEFAULT

    enum:
        LLMD_ERROR_OTHER
        LLMD_ERROR_HOST_OUT_OF_MEMORY
        LLMD_ERROR_DEVICE_OUT_OF_MEMORY
        LLMD_ERROR_DEVICE_MEMORY
        LLMD_ERROR_TIMEOUT
        LLMD_ERROR_NOT_SUPPORTED

    enum:
        LLMD_COPY_PEER_DEVICE
        LLMD_IPC_ID_MAX

    enum:
        LLMD_DEVICE_COPY_AUTO
        LLMD_DEVICE_COPY_KERNEL
        LLMD_DEVICE_COPY_DMA

    ctypedef struct llmd_run:
        uint64_t src_off
        uint64_t dst_off
        uint64_t nbytes

    ctypedef struct llmd_tensor_pair:
        uint64_t src
        uint64_t dst
        uint64_t dst_end

    ctypedef struct llmd_run_table:
        pass

    ctypedef struct llmd_runtime:
        const char *name
        void *ctx
        int device_is_host
        const char *ipc_kind
        size_t ipc_align
        const char *framework_device
        int (*set_device)(void *ctx, int32_t device_id) nogil
        int (*malloc_device)(void *ctx, void **ptr, size_t size) nogil
        int (*free_device)(void *ctx, void *ptr) nogil
        int (*malloc_host)(void *ctx, void **ptr, size_t size) nogil
        int (*free_host)(void *ctx, void *ptr) nogil
        int (*mem_info)(void *ctx, size_t *free_bytes, size_t *total_bytes) nogil
        int (*stream_create)(void *ctx, llmd_stream *stream) nogil
        int (*stream_destroy)(void *ctx, llmd_stream stream) nogil
        int (*stream_synchronize)(void *ctx, llmd_stream stream) nogil
        int (*stream_wait_event)(void *ctx, llmd_stream stream, llmd_event event) nogil
        int (*event_create)(void *ctx, llmd_event *event) nogil
        int (*event_destroy)(void *ctx, llmd_event event) nogil
        int (*event_record)(void *ctx, llmd_event event, llmd_stream stream) nogil
        int (*event_query)(void *ctx, llmd_event event, int *done) nogil
        int (*event_synchronize)(void *ctx, llmd_event event, int32_t timeout_ms) nogil
        int (*memcpy_async)(void *ctx, void *dst, size_t dst_max, const void *src, size_t count,
                            int kind, llmd_stream stream) nogil
        int (*run_table_create)(void *ctx, const llmd_run *runs, size_t count,
                                size_t pair_capacity, llmd_run_table **table) nogil
        int (*run_table_destroy)(void *ctx, llmd_run_table *table) nogil
        int (*copy_runs)(void *ctx, llmd_run_table *table, const llmd_tensor_pair *pairs,
                         size_t count, int kind, unsigned flags, llmd_stream stream,
                         size_t *fail_index) nogil
        int (*select_device_copy)(void *ctx, int mode, const char *kernel, char *why,
                                  size_t why_len) nogil
        const char *(*error_string)(void *ctx, int code) nogil
        int (*error_class)(void *ctx, int code) nogil
        const char *(*ipc_unavailable)(void *ctx) nogil
        int (*ipc_self_pid)(void *ctx, int32_t *pid) nogil
        int (*ipc_export)(void *ctx, void *ptr, size_t size, int check_pid, char *id,
                          size_t id_len) nogil
        int (*ipc_allow)(void *ctx, const char *id, const int32_t *pids, size_t count) nogil
        int (*ipc_import)(void *ctx, const char *id, void **ptr) nogil
        int (*ipc_close_import)(void *ctx, const char *id, void *ptr) nogil
        int (*ipc_close_export)(void *ctx, const char *id) nogil
        int (*ipc_range)(void *ctx, const void *ptr, size_t size, uint64_t *base,
                         uint64_t *len) nogil

    ctypedef struct llmd_load_report:
        char library[1024]
        char version[64]
        char error[2048]

cdef extern from "llmdist/acl.h" nogil:
    const llmd_runtime *llmd_acl_load(const char *const *paths, size_t count, int try_loaded,
                                      int32_t device_id, llmd_load_report *report)

cdef extern from "llmdist/cuda.h" nogil:
    const llmd_runtime *llmd_cuda_load(const char *const *paths, size_t count, int32_t device_id,
                                       llmd_load_report *report)

cdef extern from "llmdist/buffer_pool.h" nogil:
    void *llmd_pool_take(size_t bytes, size_t *size)
    void llmd_pool_give(void *buf, size_t size)

cdef extern from "llmdist/host_runtime.h" nogil:
    enum:
        LLMD_HOST_ENOMEM

    ctypedef struct llmd_host_tuning:
        int copy_threads
        size_t split_min_bytes
        size_t stream_store_min_bytes
        size_t stream_store_short_batch_bytes

    const llmd_runtime *llmd_host_runtime()
    llmd_host_tuning *llmd_host_tuning_get()
    void llmd_host_copy(void *dst, const void *src, size_t n)
    ctypedef enum llmd_host_queueing:
        LLMD_HOST_RUN_WHERE_IDLE
        LLMD_HOST_QUEUE
    int llmd_host_process_write_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                      size_t *sizes, size_t count, int *status,
                                      llmd_host_queueing queueing)
    int llmd_host_process_read_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                     size_t *sizes, size_t count, int *status,
                                     llmd_host_queueing queueing)
    int llmd_host_memfd_create(size_t size, int *fd, void **ptr)
    int llmd_host_memfd_map(int fd, size_t size, void **ptr)
    int llmd_host_shm_unmap(void *ptr, size_t size)

cdef extern from "llmdist/process_vm_baseline.h" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    int llmd_process_vm_baseline(int pid, int write, const iovec *local, const iovec *remote,
                                 size_t count, int threads)

cdef extern from "llmdist/layer_gate.h" nogil:
    ctypedef struct llmd_gate:
        pass
    enum:
        LLMD_GATE_OK
        LLMD_GATE_TIMEOUT
    llmd_gate *llmd_gate_create(int32_t num_layers)
    void llmd_gate_destroy(llmd_gate *g)
    void llmd_gate_mark(llmd_gate *g, int32_t layer)
    void llmd_gate_reset(llmd_gate *g)
    int llmd_gate_wait(llmd_gate *g, int32_t layer, int32_t timeout_ms, const volatile int *stop)
