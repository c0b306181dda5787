/* Descriptor buffers kept between calls (see include/llmdist/buffer_pool.h). */
#include "llmdist/buffer_pool.h"

#include <pthread.h>
#include <stdlib.h>

#define LLMD_POOL_SLOTS 8
#define LLMD_POOL_BYTES ((size_t)64 << 20)

typedef struct { void *buf; size_t size; } pooled;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pooled g_slots[LLMD_POOL_SLOTS];
static size_t g_bytes;

void *llmd_pool_take(size_t bytes, size_t *size)
{
    if (bytes == 0) bytes = 1;
    int best = -1;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < LLMD_POOL_SLOTS; i++)
        if (g_slots[i].buf && g_slots[i].size >= bytes &&
            (best < 0 || g_slots[i].size < g_slots[best].size))
            best = i;
    if (best >= 0) {
        void *buf = g_slots[best].buf;
        *size = g_slots[best].size;
        g_bytes -= *size;
        g_slots[best].buf = NULL;
        pthread_mutex_unlock(&g_mu);
        return buf;
    }
    pthread_mutex_unlock(&g_mu);
    *size = bytes;
    return malloc(bytes);
}

void llmd_pool_give(void *buf, size_t size)
{
    if (!buf) return;
    if (size > LLMD_POOL_BYTES) {
        free(buf);
        return;
    }
    pthread_mutex_lock(&g_mu);
    /* Keep it in a free slot, or in place of the smallest kept buffer when it is larger; make
     * room under the byte bound by dropping the smallest ones. */
    for (;;) {
        int free_slot = -1, smallest = -1;
        for (int i = 0; i < LLMD_POOL_SLOTS; i++) {
            if (!g_slots[i].buf) {
                if (free_slot < 0) free_slot = i;
            } else if (smallest < 0 || g_slots[i].size < g_slots[smallest].size) {
                smallest = i;
            }
        }
        if (free_slot >= 0 && g_bytes + size <= LLMD_POOL_BYTES) {
            g_slots[free_slot].buf = buf;
            g_slots[free_slot].size = size;
            g_bytes += size;
            pthread_mutex_unlock(&g_mu);
            return;
        }
        if (smallest < 0 || g_slots[smallest].size >= size) break;
        free(g_slots[smallest].buf);
        g_bytes -= g_slots[smallest].size;
        g_slots[smallest].buf = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    free(buf);
}
