/* The embedded host runtime: "device" memory is host RAM, a stream is a worker thread with a
 * FIFO of operations, an event is a completion marker in that FIFO. Copies run on the stream's
 * thread and, for large batches, are split across a small team of copy threads. */
#ifndef LLMDIST_HOST_RUNTIME_H
#define LLMDIST_HOST_RUNTIME_H

#include "llmdist/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes of the host runtime. */
enum {
    LLMD_HOST_OK = 0,
    LLMD_HOST_EINVAL = 1,      /* NULL pointer or bad argument */
    LLMD_HOST_ENOMEM = 2,      /* allocation failed */
    LLMD_HOST_EOVERFLOW = 3,   /* count > dst_max */
    LLMD_HOST_ETIMEOUT = 4,    /* event wait timed out */
    LLMD_HOST_ETHREAD = 5,     /* a worker thread could not be started */
    LLMD_HOST_ENOTSUP = 6      /* no such operation on host memory (device IPC) */
};

/* Runs shorter than this are short for stream_store_short_batch_bytes. */
#define LLMD_SHORT_RUN_BYTES 256

/* Tuning knobs, read by every copy; set them before or between transfers. */
typedef struct llmd_host_tuning {
    /* Number of threads (the stream's own included) that share one large batch. */
    int copy_threads;
    /* A batch is split across threads only when it moves at least this many bytes. */
    size_t split_min_bytes;
    /* Runs of at least this many bytes use non-temporal (streaming) stores; 0 disables. */
    size_t stream_store_min_bytes;
    /* A batch of at least this many bytes whose runs average under LLMD_SHORT_RUN_BYTES uses
     * streaming stores for every run of a cache line or more; 0 disables (so does
     * stream_store_min_bytes 0). */
    size_t stream_store_short_batch_bytes;
} llmd_host_tuning;

const llmd_runtime *llmd_host_runtime(void);
llmd_host_tuning *llmd_host_tuning_get(void);
/* Copy one run with the same engine the streams use (for benchmarks and tests). */
void llmd_host_copy(void *dst, const void *src, size_t n);

/* How a process transfer is queued. */
typedef enum llmd_host_queueing {
    /* run on the issuing thread when the stream is idle (no hand-off: best for one batch) */
    LLMD_HOST_RUN_WHERE_IDLE = 0,
    /* always hand to the stream thread: the issuer goes on (a gated layer loop asks for its
     * next layer) while this one moves; transfers queued back to back with the same pid and
     * status whose arrays continue each other run as one batch */
    LLMD_HOST_QUEUE = 1,
} llmd_host_queueing;

/* Queue writes of runs into process pid's memory (process_vm_writev) on a host stream. The
 * arrays must stay valid until the stream passes the operation; the errno of the first failure
 * is stored in *status (which must start at 0). */
int llmd_host_process_write_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                  size_t *sizes, size_t count, int *status,
                                  llmd_host_queueing queueing);
/* The same for reads: runs of process pid's memory (srcs) into this process's dsts
 * (process_vm_readv). */
int llmd_host_process_read_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                 size_t *sizes, size_t count, int *status,
                                 llmd_host_queueing queueing);

/* Shared memory as a sealed memfd (size fixed by F_SEAL_SHRINK|F_SEAL_GROW), so that peers on
 * this host can map host-runtime memory from a file descriptor passed over a Unix socket.
 * memfd_map refuses a descriptor without both seals or smaller than size. */
int llmd_host_memfd_create(size_t size, int *fd, void **ptr);
int llmd_host_memfd_map(int fd, size_t size, void **ptr);
int llmd_host_shm_unmap(void *ptr, size_t size);

#ifdef __cplusplus
}
#endif
#endif
