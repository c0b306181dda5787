/* llmdist runtime interface.
 *
 * Every runtime (host, ACL, CUDA) fills one llmd_runtime table, and the layers above use a
 * device only through it: memory, streams, events, copies, the copies of one layer
 * (copy_runs), device IPC and what an error code means. The Cython layer calls the table
 * without the GIL and turns a nonzero return code into an exception in one place, using
 * error_class for the status and error_string for the runtime's own text.
 */
#ifndef LLMDIST_RUNTIME_H
#define LLMDIST_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Copy kinds, numbered as ACL and CUDA number them. */
enum {
    LLMD_MEMCPY_H2H = 0,
    LLMD_MEMCPY_H2D = 1,
    LLMD_MEMCPY_D2H = 2,
    LLMD_MEMCPY_D2D = 3,
    LLMD_MEMCPY_DEFAULT = 4
};

/* What an error code means to the layers above (error_class). */
enum {
    LLMD_ERROR_OTHER = 0,
    LLMD_ERROR_HOST_OUT_OF_MEMORY = 1,
    LLMD_ERROR_DEVICE_OUT_OF_MEMORY = 2,
    LLMD_ERROR_DEVICE_MEMORY = 3,       /* the device reported a memory fault */
    LLMD_ERROR_TIMEOUT = 4,
    LLMD_ERROR_NOT_SUPPORTED = 5
};

/* copy_runs flags. */
enum {
    /* The destinations are memory of another device (mapped by device IPC): the device
     * runtimes copy run by run, since a batch call names a single destination device. */
    LLMD_COPY_PEER_DEVICE = 1u
};

/* How copy_runs moves device-to-device bytes (select_device_copy; llmdist.device_copy). */
enum {
    LLMD_DEVICE_COPY_AUTO = 0,      /* the copy kernel when it loads, else DMA */
    LLMD_DEVICE_COPY_KERNEL = 1,    /* the copy kernel, or an error */
    LLMD_DEVICE_COPY_DMA = 2        /* DMA copies */
};

/* Longest device-IPC id (an ACL key, or the hex of a CUDA handle), its NUL included. */
#define LLMD_IPC_ID_MAX 160

typedef void *llmd_stream;
typedef void *llmd_event;

/* One run of a layer's copies: nbytes from src_off in a source tensor to dst_off in its
 * destination tensor. A call's runs are the same for every layer and tensor pair. */
typedef struct llmd_run {
    uint64_t src_off;
    uint64_t dst_off;
    uint64_t nbytes;
} llmd_run;

/* The base addresses of one source tensor and its destination. dst_end is the end of the
 * memory region that holds the destination: no run may write past it. */
typedef struct llmd_tensor_pair {
    uint64_t src;
    uint64_t dst;
    uint64_t dst_end;
} llmd_tensor_pair;

/* A call's runs, prepared once by the runtime (it may keep them in device memory) and used
 * by every copy_runs of the call. Opaque to callers. */
typedef struct llmd_run_table llmd_run_table;

typedef struct llmd_runtime {
    const char *name;
    void *ctx;
    /* 1 when "device" memory is host RAM (the host runtime). */
    int device_is_host;
    /* How peers on this host reach exported device memory ("acl_ipc", "cuda_ipc"); NULL when
     * the runtime has no device IPC. */
    const char *ipc_kind;
    /* An export must start on a multiple of this many bytes (CUDA: 1, and the start of a
     * cudaMalloc allocation, which the export then covers whole). */
    size_t ipc_align;
    /* The device type frameworks name this runtime's devices by (torch: "cuda", "npu"); NULL
     * when its memory is host RAM. */
    const char *framework_device;

    int (*set_device)(void *ctx, int32_t device_id);
    int (*malloc_device)(void *ctx, void **ptr, size_t size);
    int (*free_device)(void *ctx, void *ptr);
    int (*malloc_host)(void *ctx, void **ptr, size_t size);
    int (*free_host)(void *ctx, void *ptr);
    /* Free and total memory of the current device; a code of class LLMD_ERROR_NOT_SUPPORTED
     * when the runtime cannot tell. */
    int (*mem_info)(void *ctx, size_t *free_bytes, size_t *total_bytes);
    int (*stream_create)(void *ctx, llmd_stream *stream);
    int (*stream_destroy)(void *ctx, llmd_stream stream);
    int (*stream_synchronize)(void *ctx, llmd_stream stream);
    int (*stream_wait_event)(void *ctx, llmd_stream stream, llmd_event event);
    int (*event_create)(void *ctx, llmd_event *event);
    int (*event_destroy)(void *ctx, llmd_event event);
    int (*event_record)(void *ctx, llmd_event event, llmd_stream stream);
    /* *done = 1 when all work captured by the last record has completed. */
    int (*event_query)(void *ctx, llmd_event event, int *done);
    /* timeout_ms < 0 waits forever; a timeout is a code of class LLMD_ERROR_TIMEOUT. */
    int (*event_synchronize)(void *ctx, llmd_event event, int32_t timeout_ms);
    int (*memcpy_async)(void *ctx, void *dst, size_t dst_max, const void *src, size_t count,
                        int kind, llmd_stream stream);

    /* The copies of one layer. run_table_create copies runs[0..count) into a table that
     * copy_runs calls may pass pair_capacity tensor pairs to in total (each call takes its own
     * share, so nothing a queued copy still reads is reused); destroy it once every stream that
     * used it has been synchronized. copy_runs queues, on stream, run r of the table for each
     * of pairs[0..count) (the pairs are read during the call only); on failure *fail_index is
     * pair * runs + run of the copy that failed. */
    int (*run_table_create)(void *ctx, const llmd_run *runs, size_t count, size_t pair_capacity,
                            llmd_run_table **table);
    int (*run_table_destroy)(void *ctx, llmd_run_table *table);
    int (*copy_runs)(void *ctx, llmd_run_table *table, const llmd_tensor_pair *pairs,
                     size_t count, int kind, unsigned flags, llmd_stream stream,
                     size_t *fail_index);
    /* How copy_runs moves device-to-device bytes from now on in this process, for a runtime
     * with a copy kernel (CUDA); NULL where DMA is the only way. mode: LLMD_DEVICE_COPY_*;
     * kernel: the copy kernel's code the package ships (NUL-terminated; NULL when missing),
     * loaded once. Returns 1 when the kernel is used, 0 for DMA with why saying why, -1 when
     * mode is KERNEL and the kernel cannot be used (why says why). */
    int (*select_device_copy)(void *ctx, int mode, const char *kernel, char *why,
                              size_t why_len);

    const char *(*error_string)(void *ctx, int code);
    /* LLMD_ERROR_* for a code this runtime returned. */
    int (*error_class)(void *ctx, int code);

    /* Device IPC: device memory shared with other processes of this host.
     * ipc_unavailable: NULL when the calls below work, else why not.
     * ipc_self_pid: the pid an exporter lets import (with ipc_allow) to reach this process.
     * ipc_export: share [ptr, ptr + size) and write its id (NUL-terminated, at most id_len
     * bytes); with check_pid, only processes passed to ipc_allow may import it.
     * ipc_import: map an export of another process here; *ptr is its start.
     * ipc_close_import: unmap it (after every copy into it has completed).
     * ipc_close_export: withdraw an export (after the importers closed theirs). */
    const char *(*ipc_unavailable)(void *ctx);
    int (*ipc_self_pid)(void *ctx, int32_t *pid);
    int (*ipc_export)(void *ctx, void *ptr, size_t size, int check_pid, char *id, size_t id_len);
    int (*ipc_allow)(void *ctx, const char *id, const int32_t *pids, size_t count);
    int (*ipc_import)(void *ctx, const char *id, void **ptr);
    int (*ipc_close_import)(void *ctx, const char *id, void *ptr);
    int (*ipc_close_export)(void *ctx, const char *id);
    /* The exportable region holding [ptr, ptr + size) of memory the caller did not allocate
     * through this table (a framework's tensor): *base and *len. ipc_export(*base, *len) then
     * covers ptr, and an importer finds ptr at its imported address + (ptr - *base). CUDA: the
     * cudaMalloc allocation holding ptr (the driver's cuMemGetAddressRange; on an imported
     * address, the imported mapping); ACL: [ptr, ptr + size) itself when ptr is a multiple of
     * ipc_align. A code of class LLMD_ERROR_NOT_SUPPORTED when the memory cannot be exported
     * that way (host memory, unaligned, no driver library). */
    int (*ipc_range)(void *ctx, const void *ptr, size_t size, uint64_t *base, uint64_t *len);
} llmd_runtime;

/* What a device runtime's loader found: the library it opened and its version, or why it
 * could not be used. */
typedef struct llmd_load_report {
    char library[1024];
    char version[64];
    char error[2048];
} llmd_load_report;

#ifdef __cplusplus
}
#endif
#endif
