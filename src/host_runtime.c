/* The embedded host runtime (see include/llmdist/host_runtime.h). */
#define _GNU_SOURCE
#include "llmdist/host_runtime.h"
#include "llmdist/host_trace.h"
#include "runtime_common.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* LLMD_NO_STREAM_STORES builds copy with memcpy alone: sanitizer builds use it, since
 * AddressSanitizer does not check streaming stores. */
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LLMD_NO_STREAM_STORES)
#include <emmintrin.h>
#include <xmmintrin.h>
#define LLMD_HAVE_STREAM_STORES 1
#else
#define LLMD_HAVE_STREAM_STORES 0
#endif

/* ------------------------------------------------------------------------------------------ */
/* Tuning and the copy engine                                                                   */

static llmd_host_tuning g_tuning = {
    .copy_threads = 2,
    .split_min_bytes = (size_t)1 << 20,
    .stream_store_min_bytes = (size_t)4 << 10,
    .stream_store_short_batch_bytes = (size_t)256 << 10,
};

llmd_host_tuning *llmd_host_tuning_get(void) { return &g_tuning; }

#if LLMD_HAVE_STREAM_STORES
/* Non-temporal stores: the destination lines are written without being read first. */
static void copy_streaming(char *dst, const char *src, size_t n)
{
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n) head = n;
    if (head) {     /* small blocks are mostly aligned and whole lines: no calls for them */
        memcpy(dst, src, head);
        dst += head; src += head; n -= head;
    }
    while (n >= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)(dst), a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
        dst += 64; src += 64; n -= 64;
    }
    if (n) memcpy(dst, src, n);
}
#endif

static inline void copy_run(void *dst, const void *src, size_t n, size_t nt_min)
{
#if LLMD_HAVE_STREAM_STORES
    if (nt_min && n >= nt_min) {
        copy_streaming((char *)dst, (const char *)src, n);
        return;
    }
#else
    (void)nt_min;
#endif
    memcpy(dst, src, n);
}

static inline void copy_fence(void)
{
#if LLMD_HAVE_STREAM_STORES
    _mm_sfence();
#endif
}

void llmd_host_copy(void *dst, const void *src, size_t n)
{
    copy_run(dst, src, n, g_tuning.stream_store_min_bytes);
    copy_fence();
}

/* How many runs ahead copy_span starts loading a run's source: scattered blocks start on a cold
 * page each, which the hardware prefetcher cannot foresee, and one run ahead is too late to hide
 * the memory latency behind a 4 KiB copy. */
#define PREFETCH_RUNS_AHEAD 4

/* Start loading the first page of a run's source. */
static inline void prefetch_run(const char *src, size_t n)
{
#if LLMD_HAVE_STREAM_STORES
    size_t m = n < 4096 ? n : 4096;
    for (size_t o = 0; o < m; o += 64) _mm_prefetch(src + o, _MM_HINT_T0);
#else
    (void)src; (void)n;
#endif
}

/* Copy the runs from byte o0 of run r0 up to byte o1 of run r1 (exclusive; o1 == 0 ends with
 * run r1 - 1), r1 < count or (r1 == count and o1 == 0). */
static void copy_span(void **dsts, void **srcs, const size_t *sizes, size_t count,
                      size_t r0, size_t o0, size_t r1, size_t o1, size_t nt_min)
{
    if (count == 0) return;
    size_t last = r1 < count ? r1 : count - 1;
    for (size_t i = r0 + 1; i <= last && i < r0 + PREFETCH_RUNS_AHEAD; i++)
        prefetch_run((const char *)srcs[i], sizes[i]);
    for (size_t i = r0; i <= r1 && i < count; i++) {
        size_t a = i == r0 ? o0 : 0;
        size_t b = i == r1 ? o1 : sizes[i];
        if (b <= a) continue;
        size_t ahead = i + PREFETCH_RUNS_AHEAD;
        if (ahead <= last) prefetch_run((const char *)srcs[ahead], sizes[ahead]);
        copy_run((char *)dsts[i] + a, (const char *)srcs[i] + a, b - a, nt_min);
    }
    copy_fence();
}

/* What a batch does with its runs: copy them here, or move them to or from another process. */
enum { JOB_COPY, JOB_PROCESS_WRITE, JOB_PROCESS_READ };

/* The most iovecs one process_vm_writev/readv call takes (the kernel's UIO_MAXIOV). */
#define PROCESS_IOV_MAX 1024

/* Record err as a process batch's failure unless an earlier one is there. */
static void process_fail(int *status, int err)
{
    int zero = 0;
    __atomic_compare_exchange_n(status, &zero, err, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* The process_vm_writev/readv form of copy_span: the span's runs in calls of up to
 * PROCESS_IOV_MAX iovecs. Writes go from srcs here into dsts in process pid, reads from srcs
 * there into dsts here. Stops once *status holds a failure (this span's or another's). */
static void process_span(void **dsts, void **srcs, const size_t *sizes, size_t count,
                         size_t r0, size_t o0, size_t r1, size_t o1, int write, int pid,
                         int *status)
{
    struct iovec here[PROCESS_IOV_MAX], there[PROCESS_IOV_MAX];
    size_t i = r0;
    while (i <= r1 && i < count) {
        if (__atomic_load_n(status, __ATOMIC_ACQUIRE)) return;
        size_t k = 0, want = 0;
        for (; k < PROCESS_IOV_MAX && i <= r1 && i < count; i++) {
            size_t a = i == r0 ? o0 : 0;
            size_t b = i == r1 ? o1 : sizes[i];
            if (b <= a) continue;
            char *d = (char *)dsts[i] + a, *s = (char *)srcs[i] + a;
            here[k].iov_base = write ? s : d;
            there[k].iov_base = write ? d : s;
            here[k].iov_len = there[k].iov_len = b - a;
            want += b - a;
            k++;
        }
        if (k == 0) break;
        ssize_t got = write ? process_vm_writev((pid_t)pid, here, k, there, k, 0)
                            : process_vm_readv((pid_t)pid, here, k, there, k, 0);
        if (got < 0) { process_fail(status, errno ? errno : EIO); return; }
        if ((size_t)got != want) { process_fail(status, EFAULT); return; }
    }
}

/* A team of helper threads that share large batches with the stream thread that owns them.
 * One batch at a time; a stream that finds the team busy copies alone. A batch is cut into
 * parts of equal bytes, their bounds found in one pass over the runs. */
#define TEAM_MAX_PARTS 512      /* 8 parts per thread at the most threads set_host_tuning allows */
typedef struct copy_team {
    pthread_mutex_t lock;       /* held by the stream thread that owns the team for a batch */
    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    pthread_cond_t done_cv;
    int nhelpers;
    uint64_t generation;
    void **dsts, **srcs;
    const size_t *sizes;
    size_t count, total, nt_min;
    int kind;                   /* JOB_COPY or a process transfer (with pid and status) */
    int pid;
    int *status;
    int nparts;
    /* where part p starts: byte part_off[p] of run part_run[p]; entry nparts is the end */
    size_t part_run[TEAM_MAX_PARTS + 1], part_off[TEAM_MAX_PARTS + 1];
    atomic_int next_part;
    int parts_left;
} copy_team;

static copy_team g_team = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .work_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
};

/* Take and run parts until none is left; returns how many this thread ran. */
static int team_run_parts(copy_team *t)
{
    int ran = 0;
    for (;;) {
        int p = atomic_fetch_add(&t->next_part, 1);
        if (p >= t->nparts) break;
        ran++;
        uint64_t t0 = LLMD_TRACING() ? llmd_trace_now() : 0;
        if (t->kind == JOB_COPY)
            copy_span(t->dsts, t->srcs, t->sizes, t->count, t->part_run[p], t->part_off[p],
                      t->part_run[p + 1], t->part_off[p + 1], t->nt_min);
        else
            process_span(t->dsts, t->srcs, t->sizes, t->count, t->part_run[p], t->part_off[p],
                         t->part_run[p + 1], t->part_off[p + 1], t->kind == JOB_PROCESS_WRITE,
                         t->pid, t->status);
        if (LLMD_TRACING()) llmd_trace_add(LLMD_TRACE_PART, t0, llmd_trace_now(), 0, p);
        pthread_mutex_lock(&t->mu);
        if (--t->parts_left == 0) pthread_cond_broadcast(&t->done_cv);
        pthread_mutex_unlock(&t->mu);
    }
    return ran;
}

static double team_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* After a job a helper watches for the next one for a short while before it sleeps: the layers
 * of a transfer arrive as back-to-back batches, and a sleeping helper wakes too late to take its
 * share of a batch that lasts a few hundred microseconds. */
#define TEAM_SPIN_US 50.0

static void *team_helper_main(void *arg)
{
    copy_team *t = (copy_team *)arg;
    uint64_t seen = 0;
    for (;;) {
        double until = team_now_us() + TEAM_SPIN_US;
        while (__atomic_load_n(&t->generation, __ATOMIC_ACQUIRE) == seen && team_now_us() < until)
            ;
        pthread_mutex_lock(&t->mu);
        while (t->generation == seen) pthread_cond_wait(&t->work_cv, &t->mu);
        seen = t->generation;
        pthread_mutex_unlock(&t->mu);
        team_run_parts(t);
    }
    return NULL;
}

/* The bounds of t's parts: part p starts at byte total / nparts * p of the batch. */
static void team_cut(copy_team *t)
{
    size_t pos = 0, r = 0;
    for (int p = 0; p < t->nparts; p++) {
        size_t begin = t->total / (size_t)t->nparts * (size_t)p;
        while (r < t->count && pos + t->sizes[r] <= begin) pos += t->sizes[r++];
        t->part_run[p] = r;
        t->part_off[p] = begin - pos;
    }
    t->part_run[t->nparts] = t->count;
    t->part_off[t->nparts] = 0;
}

/* Grow the team to want-1 helpers (called with t->lock held). */
static void team_ensure(copy_team *t, int want)
{
    while (t->nhelpers < want - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, team_helper_main, t);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        t->nhelpers++;
    }
}

/* The smallest run of a batch of count runs and total bytes that uses streaming stores. Short
 * runs (small blocks) scattered over a batch too large to stay in the cache have each store
 * wait for its line to be read first, which streaming stores skip. On the 2-core development
 * machine (copy_pairs of 256 scattered blocks per tensor, with and without, alternating in the
 * same rounds), batches of 256 KiB to 8 MiB copied 1.4-2.9x faster with them for 64 B
 * and 128 B runs; 256 B runs were 0.86-2.5x, and 512 B to 2 KiB runs, whose lines the
 * prefetcher reads ahead, mostly slower below 4 MiB. */
#define STREAM_LINE_BYTES 64     /* a cache line: the shortest run worth streaming */

static size_t batch_stream_min(size_t total, size_t count)
{
    size_t nt_min = g_tuning.stream_store_min_bytes;
    size_t short_batch = g_tuning.stream_store_short_batch_bytes;
    if (nt_min && short_batch && count && total >= short_batch
        && total / count < LLMD_SHORT_RUN_BYTES && nt_min > STREAM_LINE_BYTES)
        return STREAM_LINE_BYTES;
    return nt_min;
}

/* Run a batch: split across the copy team when it is large and the team is free, else on this
 * thread alone. kind is a JOB_*; pid and status serve process transfers. */
static void run_batch(int kind, void **dsts, void **srcs, const size_t *sizes, size_t count,
                      int pid, int *status)
{
    int threads = g_tuning.copy_threads;
    size_t total = 0;
    for (size_t i = 0; i < count; i++) total += sizes[i];
    size_t nt_min = batch_stream_min(total, count);
    uint64_t t0 = LLMD_TRACING() ? llmd_trace_now() : 0;
    if (threads > 1 && total >= g_tuning.split_min_bytes && pthread_mutex_trylock(&g_team.lock) == 0) {
        copy_team *t = &g_team;
        team_ensure(t, threads);
        /* Several parts per thread, so that a helper that wakes late still takes a share. */
        int nthreads = t->nhelpers + 1;
        size_t by_size = total / ((size_t)256 << 10);
        int nparts = by_size < (size_t)nthreads ? nthreads
                     : by_size > (size_t)nthreads * 8 ? nthreads * 8 : (int)by_size;
        if (nthreads > 1) {
            pthread_mutex_lock(&t->mu);
            t->dsts = dsts; t->srcs = srcs; t->sizes = sizes; t->count = count;
            t->total = total; t->nt_min = nt_min; t->nparts = nparts;
            t->kind = kind; t->pid = pid; t->status = status;
            team_cut(t);
            atomic_store(&t->next_part, 0);
            t->parts_left = nparts;
            __atomic_add_fetch(&t->generation, 1, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&t->work_cv);
            pthread_mutex_unlock(&t->mu);
            int mine = team_run_parts(t);
            pthread_mutex_lock(&t->mu);
            while (t->parts_left > 0) pthread_cond_wait(&t->done_cv, &t->mu);
            pthread_mutex_unlock(&t->mu);
            pthread_mutex_unlock(&t->lock);
            if (LLMD_TRACING())
                llmd_trace_add(kind == JOB_COPY ? LLMD_TRACE_BATCH : LLMD_TRACE_PROCESS_BATCH, t0,
                               llmd_trace_now(), total, mine);
            return;
        }
        pthread_mutex_unlock(&t->lock);
    }
    if (kind == JOB_COPY)
        copy_span(dsts, srcs, sizes, count, 0, 0, count, 0, nt_min);
    else
        process_span(dsts, srcs, sizes, count, 0, 0, count, 0, kind == JOB_PROCESS_WRITE, pid,
                     status);
    if (LLMD_TRACING())
        llmd_trace_add(kind == JOB_COPY ? LLMD_TRACE_BATCH_SOLO : LLMD_TRACE_PROCESS_BATCH_SOLO, t0,
                       llmd_trace_now(), total, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

typedef struct host_event {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t recorded;   /* generation of the last record */
    uint64_t reached;    /* highest generation whose marker the stream has passed */
} host_event;

static void event_reach(host_event *ev, uint64_t gen)
{
    pthread_mutex_lock(&ev->mu);
    if (gen > ev->reached) ev->reached = gen;
    pthread_cond_broadcast(&ev->cv);
    pthread_mutex_unlock(&ev->mu);
}

/* Wait until ev reaches gen; timeout_ms < 0 waits forever. */
static int event_wait_gen(host_event *ev, uint64_t gen, int32_t timeout_ms)
{
    int rc = LLMD_HOST_OK;
    struct timespec deadline;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    }
    pthread_mutex_lock(&ev->mu);
    while (ev->reached < gen) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&ev->cv, &ev->mu);
        } else if (pthread_cond_timedwait(&ev->cv, &ev->mu, &deadline) == ETIMEDOUT) {
            if (ev->reached < gen) rc = LLMD_HOST_ETIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&ev->mu);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Streams                                                                                      */

enum { OP_COPY, OP_BATCH, OP_RECORD, OP_WAIT, OP_PROCESS_WRITE, OP_PROCESS_READ };

typedef struct host_op {
    int type;
    void *dst;
    const void *src;
    size_t n;
    void **dsts, **srcs;
    size_t *sizes;
    host_event *ev;
    uint64_t gen;
    int pid;
    int *status;
    int queued;     /* LLMD_HOST_QUEUE: never run on the issuing thread */
} host_op;

typedef struct host_stream {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;
    pthread_cond_t idle_cv;
    host_op *ring;
    size_t cap, head, len;
    uint64_t submitted, completed;
    int running_inline;         /* a copy runs on the thread that issued it (see stream_push) */
    int stop;
} host_stream;

static void run_op(host_op *op)
{
    switch (op->type) {
    case OP_COPY: {
        uint64_t t0 = LLMD_TRACING() ? llmd_trace_now() : 0;
        copy_run(op->dst, op->src, op->n, g_tuning.stream_store_min_bytes);
        copy_fence();
        if (LLMD_TRACING()) llmd_trace_add(LLMD_TRACE_COPY, t0, llmd_trace_now(), op->n, 0);
        break;
    }
    case OP_BATCH:
        run_batch(JOB_COPY, op->dsts, op->srcs, op->sizes, op->n, 0, NULL);
        break;
    case OP_RECORD:
        event_reach(op->ev, op->gen);
        break;
    case OP_WAIT:
        event_wait_gen(op->ev, op->gen, -1);
        break;
    case OP_PROCESS_WRITE:
        run_batch(JOB_PROCESS_WRITE, op->dsts, op->srcs, op->sizes, op->n, op->pid, op->status);
        break;
    case OP_PROCESS_READ:
        run_batch(JOB_PROCESS_READ, op->dsts, op->srcs, op->sizes, op->n, op->pid, op->status);
        break;
    }
}

/* Queued process transfers that continue op (same kind, pid and status; arrays that follow on
 * from op's) join it, so that the layers of a gated transfer queued while an earlier one moved
 * go as one batch. Returns how many joined (s->mu held). */
static uint64_t take_continuations(host_stream *s, host_op *op)
{
    uint64_t joined = 0;
    if (op->type != OP_PROCESS_WRITE && op->type != OP_PROCESS_READ) return 0;
    while (s->len > 0) {
        const host_op *next = &s->ring[s->head];
        if (next->type != op->type || next->pid != op->pid || next->status != op->status ||
            next->dsts != op->dsts + op->n || next->srcs != op->srcs + op->n ||
            next->sizes != op->sizes + op->n)
            break;
        op->n += next->n;
        s->head = (s->head + 1) % s->cap;
        s->len--;
        joined++;
    }
    return joined;
}

static void *stream_main(void *arg)
{
    host_stream *s = (host_stream *)arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while ((s->len == 0 || s->running_inline) && !s->stop)
            pthread_cond_wait(&s->work_cv, &s->mu);
        if (s->len == 0 && s->stop) break;
        host_op op = s->ring[s->head];
        s->head = (s->head + 1) % s->cap;
        s->len--;
        uint64_t ops = 1 + take_continuations(s, &op);
        pthread_mutex_unlock(&s->mu);
        run_op(&op);
        pthread_mutex_lock(&s->mu);
        s->completed += ops;
        if (s->completed == s->submitted) pthread_cond_broadcast(&s->idle_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Queue op on s. An op issued to an idle stream (nothing queued or running) runs at once on
 * the issuing thread instead: the stream thread's hand-offs (a wake-up to start, another to
 * report completion) cost more than small copies themselves, and stream order holds, since
 * ops issued meanwhile wait in the queue until it is done. Event waits always go to the
 * stream thread (they may block); an event record runs here only on an idle stream, where
 * everything queued before it has landed. */
static int stream_push(host_stream *s, const host_op *op)
{
    pthread_mutex_lock(&s->mu);
    if (op->type != OP_WAIT && !op->queued && s->len == 0 && s->completed == s->submitted) {
        s->submitted++;
        s->running_inline = 1;
        pthread_mutex_unlock(&s->mu);
        host_op mine = *op;
        run_op(&mine);
        pthread_mutex_lock(&s->mu);
        s->running_inline = 0;
        s->completed++;
        if (s->len > 0) pthread_cond_signal(&s->work_cv);
        if (s->completed == s->submitted) pthread_cond_broadcast(&s->idle_cv);
        pthread_mutex_unlock(&s->mu);
        return LLMD_HOST_OK;
    }
    if (s->len == s->cap) {
        size_t ncap = s->cap ? s->cap * 2 : 64;
        host_op *nr = (host_op *)malloc(ncap * sizeof(host_op));
        if (!nr) { pthread_mutex_unlock(&s->mu); return LLMD_HOST_ENOMEM; }
        for (size_t i = 0; i < s->len; i++) nr[i] = s->ring[(s->head + i) % s->cap];
        free(s->ring);
        s->ring = nr; s->cap = ncap; s->head = 0;
    }
    s->ring[(s->head + s->len) % s->cap] = *op;
    s->len++;
    s->submitted++;
    pthread_cond_signal(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    return LLMD_HOST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The runtime table                                                                            */

/* Host memory is the same for every device id: accept any non-negative id. */
static int h_set_device(void *ctx, int32_t dev) { (void)ctx; return dev >= 0 ? LLMD_HOST_OK : LLMD_HOST_EINVAL; }

/* Allocations are page aligned; large ones are 2 MiB aligned and asked to use transparent huge
 * pages, since scattered block copies are bound by TLB misses on 4 KiB pages. */
#define HUGE_ALIGN ((size_t)2 << 20)

static int h_malloc(void *ctx, void **p, size_t n)
{
    (void)ctx;
    if (!p || n == 0) return LLMD_HOST_EINVAL;
    void *m = NULL;
    size_t align = n >= HUGE_ALIGN ? HUGE_ALIGN : 4096;
    if (posix_memalign(&m, align, n) != 0) return LLMD_HOST_ENOMEM;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_ALIGN) madvise(m, n & ~(HUGE_ALIGN - 1), MADV_HUGEPAGE);
#endif
    *p = m;
    return LLMD_HOST_OK;
}

static int h_free(void *ctx, void *p) { (void)ctx; free(p); return LLMD_HOST_OK; }

/* Host RAM is the system's to report (it changes under every process): not the runtime's. */
static int h_mem_info(void *ctx, size_t *free_bytes, size_t *total_bytes)
{
    (void)ctx; (void)free_bytes; (void)total_bytes;
    return LLMD_HOST_ENOTSUP;
}

static int h_stream_create(void *ctx, llmd_stream *out)
{
    (void)ctx;
    if (!out) return LLMD_HOST_EINVAL;
    host_stream *s = (host_stream *)calloc(1, sizeof(host_stream));
    if (!s) return LLMD_HOST_ENOMEM;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work_cv, NULL);
    pthread_cond_init(&s->idle_cv, NULL);
    if (pthread_create(&s->thread, NULL, stream_main, s) != 0) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->work_cv);
        pthread_cond_destroy(&s->idle_cv);
        free(s);
        return LLMD_HOST_ETHREAD;
    }
    *out = s;
    return LLMD_HOST_OK;
}

static int h_stream_synchronize(void *ctx, llmd_stream stream)
{
    (void)ctx;
    host_stream *s = (host_stream *)stream;
    if (!s) return LLMD_HOST_EINVAL;
    pthread_mutex_lock(&s->mu);
    uint64_t target = s->submitted;
    while (s->completed < target) pthread_cond_wait(&s->idle_cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return LLMD_HOST_OK;
}

static int h_stream_destroy(void *ctx, llmd_stream stream)
{
    host_stream *s = (host_stream *)stream;
    if (!s) return LLMD_HOST_EINVAL;
    h_stream_synchronize(ctx, s);
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work_cv);
    pthread_cond_destroy(&s->idle_cv);
    free(s->ring);
    free(s);
    return LLMD_HOST_OK;
}

static int h_event_create(void *ctx, llmd_event *out)
{
    (void)ctx;
    if (!out) return LLMD_HOST_EINVAL;
    host_event *ev = (host_event *)calloc(1, sizeof(host_event));
    if (!ev) return LLMD_HOST_ENOMEM;
    pthread_mutex_init(&ev->mu, NULL);
    pthread_cond_init(&ev->cv, NULL);
    *out = ev;
    return LLMD_HOST_OK;
}

static int h_event_destroy(void *ctx, llmd_event event)
{
    (void)ctx;
    host_event *ev = (host_event *)event;
    if (!ev) return LLMD_HOST_EINVAL;
    pthread_mutex_destroy(&ev->mu);
    pthread_cond_destroy(&ev->cv);
    free(ev);
    return LLMD_HOST_OK;
}

static int h_event_record(void *ctx, llmd_event event, llmd_stream stream)
{
    (void)ctx;
    host_event *ev = (host_event *)event;
    if (!ev || !stream) return LLMD_HOST_EINVAL;
    pthread_mutex_lock(&ev->mu);
    uint64_t gen = ++ev->recorded;
    pthread_mutex_unlock(&ev->mu);
    host_op op = {.type = OP_RECORD, .ev = ev, .gen = gen};
    return stream_push((host_stream *)stream, &op);
}

static int h_event_query(void *ctx, llmd_event event, int *done)
{
    (void)ctx;
    host_event *ev = (host_event *)event;
    if (!ev || !done) return LLMD_HOST_EINVAL;
    pthread_mutex_lock(&ev->mu);
    *done = ev->reached >= ev->recorded;
    pthread_mutex_unlock(&ev->mu);
    return LLMD_HOST_OK;
}

static int h_event_synchronize(void *ctx, llmd_event event, int32_t timeout_ms)
{
    (void)ctx;
    host_event *ev = (host_event *)event;
    if (!ev) return LLMD_HOST_EINVAL;
    pthread_mutex_lock(&ev->mu);
    uint64_t gen = ev->recorded;
    pthread_mutex_unlock(&ev->mu);
    return event_wait_gen(ev, gen, timeout_ms);
}

static int h_stream_wait_event(void *ctx, llmd_stream stream, llmd_event event)
{
    (void)ctx;
    host_event *ev = (host_event *)event;
    if (!ev || !stream) return LLMD_HOST_EINVAL;
    pthread_mutex_lock(&ev->mu);
    uint64_t gen = ev->recorded;
    int reached = ev->reached >= gen;
    pthread_mutex_unlock(&ev->mu);
    /* An event already completed holds nothing back: queue no wait (which would cost the
     * stream thread a hand-off, and the ops after it their inline start). */
    if (reached) return LLMD_HOST_OK;
    host_op op = {.type = OP_WAIT, .ev = ev, .gen = gen};
    return stream_push((host_stream *)stream, &op);
}

static int h_memcpy_async(void *ctx, void *dst, size_t dst_max, const void *src, size_t count,
                          int kind, llmd_stream stream)
{
    (void)ctx; (void)kind;
    if (!stream) return LLMD_HOST_EINVAL;
    if (count == 0) return LLMD_HOST_OK;
    if (!dst || !src) return LLMD_HOST_EINVAL;
    if (count > dst_max) return LLMD_HOST_EOVERFLOW;
    host_op op = {.type = OP_COPY, .dst = dst, .src = src, .n = count};
    return stream_push((host_stream *)stream, &op);
}

static int h_run_table_create(void *ctx, const llmd_run *runs, size_t count, size_t pairs,
                              llmd_run_table **out)
{
    (void)ctx;
    if (!out || (count && !runs)) return LLMD_HOST_EINVAL;
    return llmd_run_table_new(runs, count, pairs, out) == 0 ? LLMD_HOST_OK : LLMD_HOST_ENOMEM;
}

static int h_run_table_destroy(void *ctx, llmd_run_table *t)
{
    (void)ctx;
    llmd_run_table_free(t);
    return LLMD_HOST_OK;
}

static int h_copy_runs(void *ctx, llmd_run_table *t, const llmd_tensor_pair *pairs, size_t count,
                       int kind, unsigned flags, llmd_stream stream, size_t *fail_index)
{
    (void)ctx; (void)kind; (void)flags;
    size_t first, n;
    if (!t || (count && !pairs) || !stream || !fail_index) return LLMD_HOST_EINVAL;
    /* checked a pair at a time before expanding, so the copies need no maxs: a run table's
     * descriptors are the largest memory a small-block copy touches besides the blocks */
    *fail_index = SIZE_MAX;
    switch (llmd_run_table_check(t, pairs, count, fail_index)) {
    case LLMD_RUNS_OK: break;
    case LLMD_RUNS_NULL_ADDRESS: return LLMD_HOST_EINVAL;
    case LLMD_RUNS_PAST_END: return LLMD_HOST_EOVERFLOW;
    }
    if (llmd_run_table_expand(t, pairs, count, 0, &first, &n) != 0) return LLMD_HOST_EINVAL;
    if (n == 0) return LLMD_HOST_OK;
    host_op op = {.type = OP_BATCH, .dsts = t->dsts + first, .srcs = t->srcs + first,
                  .sizes = t->sizes + first, .n = n};
    return stream_push((host_stream *)stream, &op);
}

static int process_async(int type, llmd_stream stream, int pid, void **dsts, void **srcs,
                         size_t *sizes, size_t count, int *status, llmd_host_queueing queueing)
{
    if (!stream || !status || (count && (!dsts || !srcs || !sizes))) return LLMD_HOST_EINVAL;
    if (queueing != LLMD_HOST_RUN_WHERE_IDLE && queueing != LLMD_HOST_QUEUE) return LLMD_HOST_EINVAL;
    if (count == 0) return LLMD_HOST_OK;
    host_op op = {.type = type, .dsts = dsts, .srcs = srcs, .sizes = sizes,
                  .n = count, .pid = pid, .status = status, .queued = queueing == LLMD_HOST_QUEUE};
    return stream_push((host_stream *)stream, &op);
}

int llmd_host_process_write_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                  size_t *sizes, size_t count, int *status,
                                  llmd_host_queueing queueing)
{
    return process_async(OP_PROCESS_WRITE, stream, pid, dsts, srcs, sizes, count, status, queueing);
}

int llmd_host_process_read_async(llmd_stream stream, int pid, void **dsts, void **srcs,
                                 size_t *sizes, size_t count, int *status,
                                 llmd_host_queueing queueing)
{
    return process_async(OP_PROCESS_READ, stream, pid, dsts, srcs, sizes, count, status, queueing);
}

/* Shared memory: a sealed memfd that peers on this host receive as a file descriptor over a Unix
 * socket (SCM_RIGHTS) and map. No name exists, so nothing can alias or remove it; the seals keep
 * its size fixed, so no owner can shrink it under a mapper. */
/* memfd_create and file seals came to glibc in 2.27, after the manylinux2014 floor (2.17) the
 * wheels are built against; the kernel has had them since 3.17. So: the system call itself, and
 * the constants of <linux/memfd.h> and <linux/fcntl.h> where the C library lacks them. */
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS (1024 + 9)
#define F_GET_SEALS (1024 + 10)
#endif
#ifndef F_SEAL_SEAL
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#endif

static int sealable_memfd(const char *name)
{
    return (int)syscall(__NR_memfd_create, name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
}

int llmd_host_memfd_create(size_t size, int *fd_out, void **ptr)
{
    if (!fd_out || !ptr || size == 0) return LLMD_HOST_EINVAL;
    int fd = sealable_memfd("llmdist");
    if (fd < 0) return LLMD_HOST_ENOMEM;
    if (ftruncate(fd, (off_t)size) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        close(fd);
        return LLMD_HOST_ENOMEM;
    }
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { close(fd); return LLMD_HOST_ENOMEM; }
    *fd_out = fd;
    *ptr = m;
    return LLMD_HOST_OK;
}

int llmd_host_memfd_map(int fd, size_t size, void **ptr)
{
    if (fd < 0 || !ptr || size == 0) return LLMD_HOST_EINVAL;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        return LLMD_HOST_EINVAL;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size < size)
        return LLMD_HOST_EINVAL;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return LLMD_HOST_ENOMEM;
    *ptr = m;
    return LLMD_HOST_OK;
}

int llmd_host_shm_unmap(void *ptr, size_t size)
{
    return munmap(ptr, size) == 0 ? LLMD_HOST_OK : LLMD_HOST_EINVAL;
}

static const char *h_error_string(void *ctx, int code)
{
    (void)ctx;
    switch (code) {
    case LLMD_HOST_OK: return "success";
    case LLMD_HOST_EINVAL: return "invalid argument (NULL pointer or bad handle)";
    case LLMD_HOST_ENOMEM: return "host memory allocation failed";
    case LLMD_HOST_EOVERFLOW: return "copy size exceeds the destination's maximum";
    case LLMD_HOST_ETIMEOUT: return "wait timed out";
    case LLMD_HOST_ETHREAD: return "could not start a runtime thread";
    case LLMD_HOST_ENOTSUP: return "not supported on the host runtime";
    default: return "unknown host runtime error";
    }
}

static int h_error_class(void *ctx, int code)
{
    (void)ctx;
    switch (code) {
    case LLMD_HOST_ENOMEM: return LLMD_ERROR_HOST_OUT_OF_MEMORY;
    case LLMD_HOST_ETIMEOUT: return LLMD_ERROR_TIMEOUT;
    case LLMD_HOST_ENOTSUP: return LLMD_ERROR_NOT_SUPPORTED;
    default: return LLMD_ERROR_OTHER;
    }
}

/* Host memory is shared with peers as POSIX shared memory (above), not by device IPC. */
static const char *h_ipc_unavailable(void *ctx)
{
    (void)ctx;
    return "the host runtime has no device memory";
}

static int h_ipc_self_pid(void *ctx, int32_t *pid)
{
    (void)ctx;
    *pid = (int32_t)getpid();
    return LLMD_HOST_OK;
}

static int h_ipc_export(void *ctx, void *ptr, size_t size, int check_pid, char *id, size_t id_len)
{
    (void)ctx; (void)ptr; (void)size; (void)check_pid; (void)id; (void)id_len;
    return LLMD_HOST_ENOTSUP;
}

static int h_ipc_allow(void *ctx, const char *id, const int32_t *pids, size_t count)
{
    (void)ctx; (void)id; (void)pids; (void)count;
    return LLMD_HOST_ENOTSUP;
}

static int h_ipc_import(void *ctx, const char *id, void **ptr)
{
    (void)ctx; (void)id; (void)ptr;
    return LLMD_HOST_ENOTSUP;
}

static int h_ipc_close_import(void *ctx, const char *id, void *ptr)
{
    (void)ctx; (void)id; (void)ptr;
    return LLMD_HOST_ENOTSUP;
}

static int h_ipc_close_export(void *ctx, const char *id)
{
    (void)ctx; (void)id;
    return LLMD_HOST_ENOTSUP;
}

static int h_ipc_range(void *ctx, const void *ptr, size_t size, uint64_t *base, uint64_t *len)
{
    (void)ctx; (void)ptr; (void)size; (void)base; (void)len;
    return LLMD_HOST_ENOTSUP;
}

static const llmd_runtime g_host_runtime = {
    .name = "host",
    .ctx = NULL,
    .device_is_host = 1,
    .ipc_kind = NULL,
    .ipc_align = 1,
    .framework_device = NULL,
    .set_device = h_set_device,
    .malloc_device = h_malloc,
    .free_device = h_free,
    .malloc_host = h_malloc,
    .free_host = h_free,
    .mem_info = h_mem_info,
    .stream_create = h_stream_create,
    .stream_destroy = h_stream_destroy,
    .stream_synchronize = h_stream_synchronize,
    .stream_wait_event = h_stream_wait_event,
    .event_create = h_event_create,
    .event_destroy = h_event_destroy,
    .event_record = h_event_record,
    .event_query = h_event_query,
    .event_synchronize = h_event_synchronize,
    .memcpy_async = h_memcpy_async,
    .run_table_create = h_run_table_create,
    .run_table_destroy = h_run_table_destroy,
    .copy_runs = h_copy_runs,
    .select_device_copy = NULL,
    .error_string = h_error_string,
    .error_class = h_error_class,
    .ipc_unavailable = h_ipc_unavailable,
    .ipc_self_pid = h_ipc_self_pid,
    .ipc_export = h_ipc_export,
    .ipc_allow = h_ipc_allow,
    .ipc_import = h_ipc_import,
    .ipc_close_import = h_ipc_close_import,
    .ipc_close_export = h_ipc_close_export,
    .ipc_range = h_ipc_range,
};

const llmd_runtime *llmd_host_runtime(void) { return &g_host_runtime; }
