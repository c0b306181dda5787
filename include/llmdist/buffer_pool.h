/* Descriptor buffers kept between calls. A transfer builds one descriptor per run (run tables,
 * process and engine descriptors): megabytes for a call of many small blocks. Fresh buffers of
 * that size come from mmap, so every call would fault their pages in anew; buffers given back
 * here are kept (up to LLMD_POOL_BYTES in all) for the next calls of any thread. */
#ifndef LLMDIST_BUFFER_POOL_H
#define LLMDIST_BUFFER_POOL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A buffer of at least bytes (its real size in *size), or NULL when memory ran out. */
void *llmd_pool_take(size_t bytes, size_t *size);
/* Give back a buffer of llmd_pool_take with the size it reported (NULL is ignored). */
void llmd_pool_give(void *buf, size_t size);

#ifdef __cplusplus
}
#endif
#endif
