/* What the runtimes share: run tables, the per-run copy fallback, polling an event against a
 * deadline, and (for the device runtimes) opening a library and resolving its symbol list.
 * Internal to llmdist's C sources. */
#ifndef LLMDIST_RUNTIME_COMMON_H
#define LLMDIST_RUNTIME_COMMON_H

#include "llmdist/runtime.h"

/* Codes llmdist's own device-runtime code returns: negative, so never an ACL or CUDA code. */
enum {
    LLMD_RT_TIMEOUT = -2,           /* a bounded event wait ran out */
    LLMD_RT_NO_MEMORY = -3,         /* a host allocation of llmdist's own failed */
    LLMD_RT_BAD_ARGUMENT = -4,      /* e.g. a run table's pair capacity is spent */
    LLMD_RT_NOT_SUPPORTED = -5,     /* the loaded library lacks what the call needs */
    LLMD_RT_NOT_EXPORTABLE = -6     /* ipc_range: the memory cannot be exported */
};

const char *llmd_rt_error_string(int code);
int llmd_rt_error_class(int code);

/* A call's runs and, sized once for the whole call, the per-copy descriptors that copy_runs
 * expands them into (one slot per pair and run; a slot is never reused within the call). */
struct llmd_run_table {
    llmd_run *runs;
    size_t count;
    size_t capacity;        /* descriptor slots */
    size_t used;
    void **dsts;
    void **srcs;
    size_t *sizes;
    size_t *maxs;           /* bytes from each destination to its region's end */
    uint64_t reach;         /* the furthest byte past a destination any run writes */
    uint64_t src_reach;     /* the furthest byte past a source any run reads */
    void *device;           /* the runtime's own state for the table (CUDA: the copy kernel's) */
    void *slots;            /* the pooled buffer holding dsts, srcs, sizes and maxs */
    size_t slots_size;
};

/* 0, or -1 when memory ran out. */
int llmd_run_table_new(const llmd_run *runs, size_t count, size_t pair_capacity,
                       llmd_run_table **out);
void llmd_run_table_free(llmd_run_table *t);
/* Expand pairs x runs into the table's next free slots: *first is the first slot, *n their
 * number (pair-major); with_maxs also fills maxs. 0, or -1 when the capacity is spent. */
int llmd_run_table_expand(llmd_run_table *t, const llmd_tensor_pair *pairs, size_t count,
                          int with_maxs, size_t *first, size_t *n);

/* What llmd_run_table_check finds wrong with a descriptor. */
typedef enum llmd_runs_check {
    LLMD_RUNS_OK = 0,
    LLMD_RUNS_NULL_ADDRESS, /* a run of some bytes from or to address 0 */
    LLMD_RUNS_PAST_END,     /* a run reaching past its pair's dst_end */
} llmd_runs_check;

/* Check pairs x runs as each expanded descriptor would be checked (a run of some bytes starting
 * at or past dst_end is past the end too), a pair at a time when all its runs fit: *fail_index
 * is the first bad descriptor (pair-major). */
llmd_runs_check llmd_run_table_check(const llmd_run_table *t, const llmd_tensor_pair *pairs,
                                     size_t count, size_t *fail_index);

typedef int (*llmd_copy_fn)(void *ctx, void *dst, size_t dst_max, const void *src, size_t count,
                            int kind, llmd_stream stream);
/* One copy per descriptor; stops at the first failure and names it in *fail_index. */
int llmd_copy_each(void *ctx, llmd_copy_fn copy, void **dsts, size_t *maxs, void **srcs,
                   size_t *sizes, size_t n, int kind, llmd_stream stream, size_t *fail_index);

typedef int (*llmd_query_fn)(void *ctx, llmd_event event, int *done);
/* Query the event until it completes or timeout_ms (>= 0) passed: LLMD_RT_TIMEOUT then. */
int llmd_poll_event(void *ctx, llmd_query_fn query, llmd_event event, int32_t timeout_ms);

/* Symbol lists: each entry says where its function pointer goes in the api table. */
enum { LLMD_SYM_REQUIRED, LLMD_SYM_OPTIONAL, LLMD_SYM_IPC, LLMD_SYM_KERNEL };
typedef struct llmd_symbol {
    const char *name;
    size_t offset;
    int group;
} llmd_symbol;


/* dlopen the first of paths that opens (with try_loaded, first as already loaded by someone
 * else). *which gets its index; on failure err lists each path's dlerror text. */
void *llmd_open_first(const char *const *paths, size_t count, int try_loaded, size_t *which,
                      char *err, size_t err_len);
/* Look every symbol up into table (NULL where the library lacks it). */
void llmd_resolve(void *handle, const llmd_symbol *symbols, size_t count, void *table);
/* The names of group's symbols that table lacks, comma-separated (empty when none). */
void llmd_missing(const llmd_symbol *symbols, size_t count, const void *table, int group,
                  char *missing, size_t missing_len);

#endif
