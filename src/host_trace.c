/* Phase timing for profiling (see include/llmdist/host_trace.h). */
#define _GNU_SOURCE
#include "llmdist/host_trace.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct trace_record {
    uint64_t t_start, t_end;
    size_t bytes;
    int64_t arg;
    int32_t kind;
    int32_t tid;
} trace_record;

int llmd_trace_enabled;
static char *g_path;
static trace_record *g_records;
static atomic_size_t g_next;

uint64_t llmd_trace_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void llmd_trace_add(llmd_trace_kind kind, uint64_t t_start, uint64_t t_end, size_t bytes,
                    int64_t arg)
{
    size_t i = atomic_fetch_add(&g_next, 1);
    if (i >= LLMD_TRACE_MAX) return;
    trace_record *r = &g_records[i];
    r->t_start = t_start;
    r->t_end = t_end;
    r->bytes = bytes;
    r->arg = arg;
    r->kind = (int32_t)kind;
    r->tid = (int32_t)syscall(SYS_gettid);
}

/* A forked child keeps its own records only. */
static void trace_forget(void) { atomic_store(&g_next, 0); }

__attribute__((constructor)) static void trace_start(void)
{
    const char *path = getenv("LLMDIST_HOST_TRACE");
    if (!path || !*path) return;
    g_path = strdup(path);
    g_records = (trace_record *)calloc(LLMD_TRACE_MAX, sizeof(trace_record));
    if (!g_path || !g_records) {
        free(g_path);
        free(g_records);
        g_path = NULL;
        g_records = NULL;
        return;
    }
    pthread_atfork(NULL, NULL, trace_forget);
    llmd_trace_enabled = 1;
}

/* The file name with each "%p" replaced by this process's id (NULL when out of memory). */
static char *trace_file_name(void)
{
    char pid[24];
    int plen = snprintf(pid, sizeof pid, "%d", (int)getpid());
    size_t n = strlen(g_path), k = 0;
    char *out = (char *)malloc(n * (size_t)plen + 1);
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (g_path[i] == '%' && g_path[i + 1] == 'p') {
            memcpy(out + k, pid, (size_t)plen);
            k += (size_t)plen;
            i++;
        } else {
            out[k++] = g_path[i];
        }
    }
    out[k] = 0;
    return out;
}

/* One line per record, in the order they were kept: kind t_start_ns t_end_ns bytes arg tid. */
__attribute__((destructor)) static void trace_write(void)
{
    if (!llmd_trace_enabled) return;
    llmd_trace_enabled = 0;
    char *name = trace_file_name();
    if (!name) return;
    FILE *f = fopen(name, "w");
    free(name);
    if (!f) return;
    size_t n = atomic_load(&g_next);
    if (n > LLMD_TRACE_MAX) n = LLMD_TRACE_MAX;
    fprintf(f, "# kind t_start_ns t_end_ns bytes arg tid; kinds: 1 batch (arg: parts done by the "
               "issuing thread), 2 solo batch, 3 team part, 4 copy, 5 gate mark, 6 gate wake\n");
    for (size_t i = 0; i < n; i++) {
        const trace_record *r = &g_records[i];
        fprintf(f, "%d %llu %llu %zu %lld %d\n", r->kind, (unsigned long long)r->t_start,
                (unsigned long long)r->t_end, r->bytes, (long long)r->arg, r->tid);
    }
    fclose(f);
}
