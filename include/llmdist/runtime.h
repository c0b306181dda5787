/* llmdist runtime interface.
 *
 * Every runtime (host, ACL, CUDA) fills one llmd_runtime table. The Cython layer calls
 * only through this table, without the GIL, and turns a nonzero return code into an
 * exception in one place (with error_string for the runtime's own text).
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

typedef void *llmd_stream;
typedef void *llmd_event;

typedef struct llmd_runtime {
    const char *name;
    void *ctx;
    int (*set_device)(void *ctx, int32_t device_id);
    int (*malloc_device)(void *ctx, void **ptr, size_t size);
    int (*free_device)(void *ctx, void *ptr);
    int (*malloc_host)(void *ctx, void **ptr, size_t size);
    int (*free_host)(void *ctx, void *ptr);
    int (*stream_create)(void *ctx, llmd_stream *stream);
    int (*stream_destroy)(void *ctx, llmd_stream stream);
    int (*stream_synchronize)(void *ctx, llmd_stream stream);
    int (*stream_wait_event)(void *ctx, llmd_stream stream, llmd_event event);
    int (*event_create)(void *ctx, llmd_event *event);
    int (*event_destroy)(void *ctx, llmd_event event);
    int (*event_record)(void *ctx, llmd_event event, llmd_stream stream);
    /* *done = 1 when all work captured by the last record has completed. */
    int (*event_query)(void *ctx, llmd_event event, int *done);
    /* timeout_ms < 0 waits forever. */
    int (*event_synchronize)(void *ctx, llmd_event event, int32_t timeout_ms);
    int (*memcpy_async)(void *ctx, void *dst, size_t dst_max, const void *src, size_t count,
                        int kind, llmd_stream stream);
    /* Optional (NULL when the runtime has none). On failure *fail_index names the entry. */
    int (*memcpy_batch_async)(void *ctx, void **dsts, size_t *dst_maxs, void **srcs,
                              size_t *sizes, size_t count, int kind, llmd_stream stream,
                              size_t *fail_index);
    const char *(*error_string)(void *ctx, int code);
} llmd_runtime;

#ifdef __cplusplus
}
#endif
#endif
