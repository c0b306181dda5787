/* The C runtime layer on its own: the shared helpers (src/runtime_common.c) and copy_runs of the
 * host runtime through the llmd_runtime table. Built and run by tests/test_runtime_c.py; prints
 * "ok" and exits 0 when every check holds, else names the first that failed. */
#include "llmdist/buffer_pool.h"
#include "llmdist/host_runtime.h"
#include "runtime_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);          \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

/* -- run tables ------------------------------------------------------------------------- */

static void check_expand(void)
{
    llmd_run runs[2] = {{0, 100, 10}, {50, 0, 20}};
    llmd_tensor_pair pairs[2] = {{1000, 5000, 5200}, {2000, 7000, 7030}};
    llmd_run_table *t = NULL;
    size_t first = 99, n = 99;
    CHECK(llmd_run_table_new(runs, 2, 3, &t) == 0);
    CHECK(llmd_run_table_expand(t, pairs, 2, 1, &first, &n) == 0);
    CHECK(first == 0 && n == 4);
    /* pair-major: pair 0 run 0, pair 0 run 1, pair 1 run 0, pair 1 run 1 */
    CHECK((uintptr_t)t->srcs[0] == 1000 && (uintptr_t)t->dsts[0] == 5100 && t->sizes[0] == 10);
    CHECK((uintptr_t)t->srcs[1] == 1050 && (uintptr_t)t->dsts[1] == 5000 && t->sizes[1] == 20);
    CHECK((uintptr_t)t->srcs[3] == 2050 && (uintptr_t)t->dsts[3] == 7000 && t->sizes[3] == 20);
    CHECK(t->maxs[0] == 100 && t->maxs[1] == 200 && t->maxs[3] == 30);
    /* one pair of capacity left: a call with two is refused, one with one fits */
    CHECK(llmd_run_table_expand(t, pairs, 2, 1, &first, &n) == -1);
    CHECK(llmd_run_table_expand(t, pairs, 1, 1, &first, &n) == 0 && first == 4 && n == 2);
    CHECK(llmd_run_table_expand(t, pairs, 1, 1, &first, &n) == -1);
    llmd_run_table_free(t);
}

/* The check a pair at a time gives what checking each expanded descriptor would: the first bad
 * descriptor and why, whether the pair's fast test or its run-by-run scan decides. */
static void check_runs_check(void)
{
    llmd_run runs[3] = {{0, 100, 10}, {50, 0, 20}, {70, 300, 0}}; /* run 2 moves nothing */
    llmd_run_table *t = NULL;
    size_t fail = 99;
    CHECK(llmd_run_table_new(runs, 3, 4, &t) == 0);
    CHECK(t->reach == 110 && t->src_reach == 70);
    llmd_tensor_pair ok[2] = {{1000, 5000, 5110}, {2000, 7000, 9000}};
    CHECK(llmd_run_table_check(t, ok, 2, &fail) == LLMD_RUNS_OK && fail == 99);
    llmd_tensor_pair short_end[2] = {{1000, 5000, 5110}, {2000, 7000, 7105}};
    CHECK(llmd_run_table_check(t, short_end, 2, &fail) == LLMD_RUNS_PAST_END && fail == 3);
    llmd_tensor_pair tight[1] = {{1000, 5000, 5109}}; /* one byte short of run 0's end */
    CHECK(llmd_run_table_check(t, tight, 1, &fail) == LLMD_RUNS_PAST_END && fail == 0);
    llmd_tensor_pair null_dst[2] = {{1000, 5000, 5110}, {2000, 0, 200}};
    /* dst 0: run 0 writes at 100 (not address 0), run 1 writes at 0 */
    CHECK(llmd_run_table_check(t, null_dst, 2, &fail) == LLMD_RUNS_NULL_ADDRESS && fail == 4);
    llmd_tensor_pair before[1] = {{1000, 5000, 4000}}; /* an end before the start */
    CHECK(llmd_run_table_check(t, before, 1, &fail) == LLMD_RUNS_PAST_END && fail == 0);
    llmd_run_table_free(t);
}

/* -- the per-run fallback ------------------------------------------------------------------ */

static int g_copies;

static int copy_fails_third(void *ctx, void *dst, size_t dst_max, const void *src, size_t count,
                            int kind, llmd_stream stream)
{
    (void)ctx; (void)dst; (void)dst_max; (void)src; (void)count; (void)kind; (void)stream;
    return ++g_copies == 3 ? 77 : 0;
}

static void check_copy_each(void)
{
    void *d[5] = {0}, *s[5] = {0};
    size_t n[5] = {1, 1, 1, 1, 1}, m[5] = {1, 1, 1, 1, 1}, fail = 99;
    g_copies = 0;
    CHECK(llmd_copy_each(NULL, copy_fails_third, d, m, s, n, 5, 0, NULL, &fail) == 77);
    CHECK(fail == 2 && g_copies == 3);
}

/* -- polling an event -------------------------------------------------------------------- */

static int g_polls;

static int query_never(void *ctx, llmd_event e, int *done) { (void)ctx; (void)e; g_polls++; *done = 0; return 0; }
static int query_third(void *ctx, llmd_event e, int *done) { (void)ctx; (void)e; *done = ++g_polls >= 3; return 0; }
static int query_error(void *ctx, llmd_event e, int *done) { (void)ctx; (void)e; *done = 0; return 5; }

static void check_poll(void)
{
    g_polls = 0;
    CHECK(llmd_poll_event(NULL, query_never, NULL, 20) == LLMD_RT_TIMEOUT && g_polls > 1);
    g_polls = 0;
    CHECK(llmd_poll_event(NULL, query_third, NULL, 10000) == 0 && g_polls == 3);
    CHECK(llmd_poll_event(NULL, query_error, NULL, 10000) == 5);
    CHECK(llmd_rt_error_class(LLMD_RT_TIMEOUT) == LLMD_ERROR_TIMEOUT);
}

/* -- a symbol list ---------------------------------------------------------------------- */

typedef struct demo_api {
    void *(*malloc)(size_t n);
    void (*free)(void *p);
    int (*llmd_no_such_symbol)(void);
} demo_api;

static void check_symbols(void)
{
    static const llmd_symbol syms[] = {
        {"malloc", offsetof(demo_api, malloc), LLMD_SYM_REQUIRED},
        {"free", offsetof(demo_api, free), LLMD_SYM_OPTIONAL},
        {"llmd_no_such_symbol", offsetof(demo_api, llmd_no_such_symbol), LLMD_SYM_IPC},
    };
    const char *paths[] = {"/nonexistent/libnothing.so", "libc.so.6"};
    char err[512], missing[128];
    size_t which = 99;
    demo_api api;
    memset(&api, 0xff, sizeof(api));
    void *h = llmd_open_first(paths, 2, 0, &which, err, sizeof(err));
    CHECK(h != NULL && which == 1 && strstr(err, "libnothing") != NULL);
    llmd_resolve(h, syms, 3, &api);
    CHECK(api.malloc != NULL && api.free != NULL && api.llmd_no_such_symbol == NULL);
    llmd_missing(syms, 3, &api, LLMD_SYM_REQUIRED, missing, sizeof(missing));
    CHECK(missing[0] == 0);
    llmd_missing(syms, 3, &api, LLMD_SYM_IPC, missing, sizeof(missing));
    CHECK(strcmp(missing, "llmd_no_such_symbol") == 0);
    CHECK(llmd_open_first(paths, 1, 0, &which, err, sizeof(err)) == NULL && err[0] != 0);
}

/* -- copy_runs on the host runtime ---------------------------------------------------------- */

static void check_host_copy_runs(void)
{
    const llmd_runtime *rt = llmd_host_runtime();
    enum { N = 4096 };
    unsigned char *src[2], *dst[2];
    llmd_stream s = NULL;
    llmd_run_table *t = NULL;
    llmd_run runs[2] = {{0, 2048, 512}, {1024, 0, 256}};
    llmd_tensor_pair pairs[2];
    size_t fail = 99;
    for (int p = 0; p < 2; p++) {
        src[p] = malloc(N);
        dst[p] = calloc(1, N);
        for (int i = 0; i < N; i++) src[p][i] = (unsigned char)(i * 7 + p * 13);
        pairs[p].src = (uintptr_t)src[p];
        pairs[p].dst = (uintptr_t)dst[p];
        pairs[p].dst_end = (uintptr_t)dst[p] + N;
    }
    CHECK(rt->stream_create(rt->ctx, &s) == 0);
    CHECK(rt->run_table_create(rt->ctx, runs, 2, 3, &t) == 0);
    CHECK(rt->copy_runs(rt->ctx, t, pairs, 2, LLMD_MEMCPY_DEFAULT, 0, s, &fail) == 0);
    CHECK(rt->stream_synchronize(rt->ctx, s) == 0);
    for (int p = 0; p < 2; p++) {
        CHECK(memcmp(dst[p] + 2048, src[p], 512) == 0);
        CHECK(memcmp(dst[p], src[p] + 1024, 256) == 0);
        CHECK(dst[p][256] == 0 && dst[p][2047] == 0 && dst[p][2560] == 0);
    }
    /* a destination region too short for run 0: refused before anything is queued, naming
     * pair 0's run 0 */
    pairs[0].dst_end = (uintptr_t)dst[0] + 2048 + 100;
    CHECK(rt->copy_runs(rt->ctx, t, pairs, 1, LLMD_MEMCPY_DEFAULT, 0, s, &fail) == LLMD_HOST_EOVERFLOW);
    CHECK(fail == 0);
    /* a pair whose source is address 0: refused as invalid, naming pair 1's run 0 */
    llmd_tensor_pair null_src[2] = {pairs[1], pairs[1]};
    null_src[1].src = 0;
    CHECK(rt->copy_runs(rt->ctx, t, null_src, 2, LLMD_MEMCPY_DEFAULT, 0, s, &fail) == LLMD_HOST_EINVAL);
    CHECK(fail == 2);
    /* refused calls take none of the table's pair capacity (3): one more pair fits, then no more */
    CHECK(rt->copy_runs(rt->ctx, t, pairs + 1, 1, LLMD_MEMCPY_DEFAULT, 0, s, &fail) == 0);
    CHECK(rt->copy_runs(rt->ctx, t, pairs + 1, 1, LLMD_MEMCPY_DEFAULT, 0, s, &fail) != 0);
    CHECK(rt->error_class(rt->ctx, LLMD_HOST_ENOMEM) == LLMD_ERROR_HOST_OUT_OF_MEMORY);
    CHECK(rt->error_class(rt->ctx, LLMD_HOST_ETIMEOUT) == LLMD_ERROR_TIMEOUT);
    CHECK(rt->ipc_kind == NULL && rt->ipc_unavailable(rt->ctx) != NULL);
    CHECK(rt->stream_synchronize(rt->ctx, s) == 0);
    CHECK(rt->run_table_destroy(rt->ctx, t) == 0);
    CHECK(rt->stream_destroy(rt->ctx, s) == 0);
    for (int p = 0; p < 2; p++) {
        free(src[p]);
        free(dst[p]);
    }
}

/* The descriptor pool: a buffer given back serves the next take that fits (the smallest that
 * does), a larger take gets a new one, and the pool keeps at most 64 MiB. */
static void check_pool(void)
{
    size_t a_size, b_size, c_size, got;
    void *a = llmd_pool_take(1000, &a_size);
    void *b = llmd_pool_take(5000, &b_size);
    CHECK(a && b && a_size == 1000 && b_size == 5000);
    memset(a, 1, a_size);
    memset(b, 2, b_size);
    llmd_pool_give(b, b_size);
    llmd_pool_give(a, a_size);
    CHECK(llmd_pool_take(900, &got) == a && got == 1000);
    CHECK(llmd_pool_take(4000, &got) == b && got == 5000);
    void *c = llmd_pool_take(6000, &c_size);
    CHECK(c != a && c != b && c_size == 6000);
    llmd_pool_give(a, a_size);
    llmd_pool_give(b, b_size);
    llmd_pool_give(c, c_size);
    /* a buffer over the bound is freed, not kept: the next take of that size is a new one,
     * and the small ones stay */
    size_t big_size;
    void *big = llmd_pool_take((size_t)65 << 20, &big_size);
    CHECK(big != NULL);
    llmd_pool_give(big, big_size);
    CHECK(llmd_pool_take(5500, &got) == c && got == 6000);
    llmd_pool_give(c, got);
    llmd_pool_give(NULL, 10);
}

int main(void)
{
    check_pool();
    check_expand();
    check_copy_each();
    check_poll();
    check_symbols();
    check_runs_check();
    check_host_copy_runs();
    printf("ok\n");
    return 0;
}
