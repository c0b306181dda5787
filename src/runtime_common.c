/* Helpers the runtimes share (see runtime_common.h). */
#define _GNU_SOURCE
#include "runtime_common.h"

#include "llmdist/buffer_pool.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *llmd_rt_error_string(int code)
{
    switch (code) {
    case LLMD_RT_TIMEOUT: return "wait timed out";
    case LLMD_RT_NO_MEMORY: return "host memory allocation failed";
    case LLMD_RT_BAD_ARGUMENT: return "invalid argument";
    case LLMD_RT_NOT_SUPPORTED: return "the loaded runtime library does not support this call";
    case LLMD_RT_NOT_EXPORTABLE:
        return "the memory is not part of an allocation the runtime can share with other processes";
    default: return NULL;
    }
}

int llmd_rt_error_class(int code)
{
    switch (code) {
    case LLMD_RT_TIMEOUT: return LLMD_ERROR_TIMEOUT;
    case LLMD_RT_NO_MEMORY: return LLMD_ERROR_HOST_OUT_OF_MEMORY;
    case LLMD_RT_NOT_SUPPORTED: return LLMD_ERROR_NOT_SUPPORTED;
    case LLMD_RT_NOT_EXPORTABLE: return LLMD_ERROR_NOT_SUPPORTED;
    default: return LLMD_ERROR_OTHER;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Run tables                                                                                   */

int llmd_run_table_new(const llmd_run *runs, size_t count, size_t pair_capacity,
                       llmd_run_table **out)
{
    llmd_run_table *t = (llmd_run_table *)calloc(1, sizeof(*t));
    if (!t) return -1;
    size_t slots = count * pair_capacity;
    size_t n = slots ? slots : 1;
    if ((pair_capacity && slots / pair_capacity != count) || n > ((size_t)-1) / (4 * sizeof(void *))) {
        free(t);
        return -1;
    }
    t->runs = (llmd_run *)malloc((count ? count : 1) * sizeof(llmd_run));
    /* one pooled buffer for the four descriptor arrays (all of 8-byte entries) */
    t->slots = llmd_pool_take(4 * n * sizeof(void *), &t->slots_size);
    if (!t->runs || !t->slots) {
        llmd_run_table_free(t);
        return -1;
    }
    t->dsts = (void **)t->slots;
    t->srcs = t->dsts + n;
    t->sizes = (size_t *)(t->srcs + n);
    t->maxs = t->sizes + n;
    if (count) memcpy(t->runs, runs, count * sizeof(llmd_run));
    for (size_t r = 0; r < count; r++) {
        if (!runs[r].nbytes) continue;
        if (runs[r].dst_off + runs[r].nbytes > t->reach) t->reach = runs[r].dst_off + runs[r].nbytes;
        if (runs[r].src_off + runs[r].nbytes > t->src_reach)
            t->src_reach = runs[r].src_off + runs[r].nbytes;
    }
    t->count = count;
    t->capacity = slots;
    *out = t;
    return 0;
}

void llmd_run_table_free(llmd_run_table *t)
{
    if (!t) return;
    free(t->runs);
    llmd_pool_give(t->slots, t->slots_size);
    free(t);
}

int llmd_run_table_expand(llmd_run_table *t, const llmd_tensor_pair *pairs, size_t count,
                          int with_maxs, size_t *first, size_t *n)
{
    size_t need = count * t->count;
    if (need > t->capacity - t->used) return -1;
    /* the table's arrays in locals: stores through them cannot change them, so the loop keeps
     * them in registers (through t, every store made the compiler reload all five) */
    const llmd_run *restrict runs = t->runs;
    const size_t nruns = t->count;
    void **restrict dsts = t->dsts + t->used;
    void **restrict srcs = t->srcs + t->used;
    size_t *restrict sizes = t->sizes + t->used;
    size_t *restrict maxs = t->maxs + t->used;
    size_t k = 0;
    for (size_t p = 0; p < count; p++) {
        char *src = (char *)(uintptr_t)pairs[p].src;
        char *dst = (char *)(uintptr_t)pairs[p].dst;
        uint64_t end = pairs[p].dst_end;
        for (size_t r = 0; r < nruns; r++, k++) {
            char *d = dst + runs[r].dst_off;
            dsts[k] = d;
            srcs[k] = src + runs[r].src_off;
            sizes[k] = (size_t)runs[r].nbytes;
            if (with_maxs) maxs[k] = (size_t)(end - (uint64_t)(uintptr_t)d);
        }
    }
    *first = t->used;
    t->used += need;
    *n = need;
    return 0;
}

llmd_runs_check llmd_run_table_check(const llmd_run_table *t, const llmd_tensor_pair *pairs,
                                     size_t count, size_t *fail_index)
{
    for (size_t p = 0; p < count; p++) {
        uint64_t src = pairs[p].src, dst = pairs[p].dst, end = pairs[p].dst_end;
        /* every run fits: no address wraps to 0 and none reaches past the end */
        if (src && dst && src <= UINT64_MAX - t->src_reach && end >= dst && t->reach <= end - dst)
            continue;
        for (size_t r = 0; r < t->count; r++) {
            uint64_t nbytes = t->runs[r].nbytes;
            uint64_t d = dst + t->runs[r].dst_off;
            size_t i = p * t->count + r;
            if (nbytes && (!d || !(src + t->runs[r].src_off))) {
                *fail_index = i;
                return LLMD_RUNS_NULL_ADDRESS;
            }
            if (nbytes && (end < d || nbytes > end - d)) {
                *fail_index = i;
                return LLMD_RUNS_PAST_END;
            }
        }
    }
    return LLMD_RUNS_OK;
}

int llmd_copy_each(void *ctx, llmd_copy_fn copy, void **dsts, size_t *maxs, void **srcs,
                   size_t *sizes, size_t n, int kind, llmd_stream stream, size_t *fail_index)
{
    for (size_t i = 0; i < n; i++) {
        int rc = copy(ctx, dsts[i], maxs[i], srcs[i], sizes[i], kind, stream);
        if (rc != 0) {
            *fail_index = i;
            return rc;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

int llmd_poll_event(void *ctx, llmd_query_fn query, llmd_event event, int32_t timeout_ms)
{
    double deadline = now_ms() + timeout_ms;
    for (;;) {
        int done = 0;
        int rc = query(ctx, event, &done);
        if (rc != 0 || done) return rc;
        if (now_ms() >= deadline) return LLMD_RT_TIMEOUT;
        usleep(50);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Loading a library                                                                            */

static void append(char *buf, size_t len, const char *sep, const char *text)
{
    size_t used = strlen(buf);
    if (used + 1 >= len) return;
    snprintf(buf + used, len - used, "%s%s", used ? sep : "", text);
}

void *llmd_open_first(const char *const *paths, size_t count, int try_loaded, size_t *which,
                      char *err, size_t err_len)
{
    err[0] = 0;
    for (size_t i = 0; i < count; i++) {
        void *h = NULL;
        if (try_loaded) h = dlopen(paths[i], RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
        if (!h) h = dlopen(paths[i], RTLD_NOW | RTLD_GLOBAL);
        if (h) {
            *which = i;
            return h;
        }
        const char *e = dlerror();
        append(err, err_len, "; ", e ? e : "unknown dlopen error");
    }
    return NULL;
}

void llmd_resolve(void *handle, const llmd_symbol *symbols, size_t count, void *table)
{
    for (size_t i = 0; i < count; i++) {
        void *p = dlsym(handle, symbols[i].name);
        memcpy((char *)table + symbols[i].offset, &p, sizeof(p));
    }
}

void llmd_missing(const llmd_symbol *symbols, size_t count, const void *table, int group,
                  char *missing, size_t missing_len)
{
    missing[0] = 0;
    for (size_t i = 0; i < count; i++) {
        void *p;
        memcpy(&p, (const char *)table + symbols[i].offset, sizeof(p));
        if (!p && symbols[i].group == group) append(missing, missing_len, ", ", symbols[i].name);
    }
}
