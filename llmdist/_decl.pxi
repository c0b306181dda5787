# C declarations of the runtime interface (include/llmdist/runtime.h) and the host runtime.

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

    ctypedef struct llmd_runtime:
        const char *name
        void *ctx
        int (*set_device)(void *ctx, int32_t device_id) nogil
        int (*malloc_device)(void *ctx, void **ptr, size_t size) nogil
        int (*free_device)(void *ctx, void *ptr) nogil
        int (*malloc_host)(void *ctx, void **ptr, size_t size) nogil
        int (*free_host)(void *ctx, void *ptr) nogil
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
        int (*memcpy_batch_async)(void *ctx, void **dsts, size_t *dst_maxs, void **srcs,
                                  size_t *sizes, size_t count, int kind, llmd_stream stream,
                                  size_t *fail_index) nogil
        const char *(*error_string)(void *ctx, int code) nogil

cdef extern from "llmdist/host_runtime.h" nogil:
    enum:
        LLMD_HOST_ENOMEM
        LLMD_HOST_ETIMEOUT

    ctypedef struct llmd_host_tuning:
        int copy_threads
        size_t split_min_bytes
        size_t stream_store_min_bytes

    const llmd_runtime *llmd_host_runtime()
    llmd_host_tuning *llmd_host_tuning_get()
    void llmd_host_copy(void *dst, const void *src, size_t n)
    int llmd_host_process_write_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                      size_t *sizes, size_t count, int *status)
    int llmd_host_process_read_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                     size_t *sizes, size_t count, int *status)
    int llmd_host_shm_create(const char *name, size_t size, void **ptr)
    int llmd_host_shm_map(const char *name, size_t size, void **ptr)
    int llmd_host_shm_unmap(void *ptr, size_t size)
    int llmd_host_shm_unlink(const char *name)
