/* The vendor-neutral core of the fake runtimes (tests/fake_acl, tests/fake_cuda): call counters
 * and fault injection over the API table, failures with their message, small helpers, the table
 * of allocations (device and host allocation, frees, mappings of imported memory) and the
 * registries of handles. Each fake includes it once, after defining:
 *
 *   FAKE_TAG            the prefix of its error messages ("fake-acl")
 *   FAKE_ENV(name)      the name of one of its environment variables ("FAKE_ACL_" name)
 *   API_LIST(X)         X(function) for every function it counts and can fail on demand
 *   MAX_DEV             how many devices it can have
 *   FAKE_ALLOC_FIELDS   its own fields of struct alloc
 *   FAKE_HOOK(name)     the name of one of its test hooks (fake_acl_ ## name)
 *   FAKE_RULES          the initializer of its struct fake_rules: its error codes and the
 *                       places where its runtime behaves differently
 *
 * and it defines free_refused_locked(a, p) (below). It provides g_mu, the lock of the table,
 * the registries and the skin's own tables. Everything here is static: each library has its own
 * copy of the state. */
#ifndef FAKE_ENGINE_H
#define FAKE_ENGINE_H

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* What tells one vendor's runtime from the other's: the error code of each kind of failure and
 * the places where the two behave differently. */
struct fake_rules {
    int bad_value;      /* a NULL pointer, a size or flag out of range */
    int bad_handle;     /* an unknown or destroyed stream or event */
    int bad_range;      /* a count over its destination's room, a free of the wrong pointer */
    int no_memory;      /* host memory ran out */
    int no_stream;      /* a stream could not be made */
    int no_event;       /* an event could not be made */
    int stream_device;  /* a stream of another device than the thread's (0: allowed) */
    int event_device;   /* an event recorded on a stream of another device */
    int stream_timeout; /* a stream synchronization ran out of time */
    int event_timeout;  /* an event synchronization ran out of time */
    int timing;         /* elapsed time of events that do not time or never were recorded */
    int not_ready;      /* elapsed time of an event not complete yet */
    int busy_destroy;   /* destroying a stream with queued work is refused (else it waits) */
    int busy_free;      /* freeing memory that queued work uses is refused (else it waits) */
    int same_stream;    /* elapsed time needs both events recorded on one stream */
    unsigned wait_flag; /* an event a stream waits for needs this flag (0: any event) */
    const char *wait_flag_name;
    const char *import_name, *close_name; /* the functions that map and unmap imported memory */
};
static const struct fake_rules rules = FAKE_RULES;

/* ------------------------------------------------------------------------------------------ */
/* API table, call counters, fault injection                                                    */

#define X_ENUM(n) API_##n,
enum { API_LIST(X_ENUM) API_COUNT };
#define X_NAME(n) #n,
static const char *const g_api_names[API_COUNT] = {API_LIST(X_NAME)};

static atomic_long g_calls[API_COUNT];

struct injection {
    int api;
    int countdown;
    int code;
    struct injection *next;
};
static pthread_mutex_t g_inj_mu = PTHREAD_MUTEX_INITIALIZER;
static struct injection *g_inj;
static atomic_int g_inj_pending; /* fast path: no lock when nothing is armed */

static _Thread_local const char *t_api = "";
static _Thread_local char t_msg[1024];
static _Thread_local int t_has_msg; /* a call of this thread failed: t_msg is set */
static _Thread_local int t_last;    /* the code of the thread's last failure, until read */
static atomic_int g_sticky;         /* a device fault: every later call returns it, as on a GPU */

static inline int api_lookup(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < API_COUNT; i++)
        if (strcmp(g_api_names[i], name) == 0) return i;
    return -1;
}

/* The thread's last error message: "[FAKE_TAG] api: text (error code)". */
static inline void set_message(int code, const char *fmt, va_list ap)
{
    char body[768];
    vsnprintf(body, sizeof body, fmt, ap);
    snprintf(t_msg, sizeof t_msg, "[" FAKE_TAG "] %s: %s (error %d)", t_api, body, code);
}

/* Fail with code: the thread's message and last error; returns code. */
__attribute__((format(printf, 2, 3))) static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_message(code, fmt, ap);
    va_end(ap);
    t_has_msg = 1;
    t_last = code;
    return code;
}

/* Count a call of api (now the thread's current one). */
static inline void api_count(int api)
{
    t_api = g_api_names[api];
    atomic_fetch_add(&g_calls[api], 1);
}

/* The code of an injected failure of api that fires on this call, else 0. */
static inline int injection_take(int api)
{
    if (atomic_load(&g_inj_pending) == 0) return 0;
    int code = 0;
    pthread_mutex_lock(&g_inj_mu);
    struct injection **pp = &g_inj;
    while (*pp) {
        struct injection *j = *pp;
        if (j->api == api) {
            if (j->countdown == 0 && code == 0) {
                code = j->code;
                *pp = j->next;
                free(j);
                atomic_fetch_sub(&g_inj_pending, 1);
                continue;
            }
            if (j->countdown > 0) j->countdown--;
        }
        pp = &j->next;
    }
    pthread_mutex_unlock(&g_inj_mu);
    return code;
}

/* Count a call of api; a nonzero code (message set) when the process has a sticky device fault
 * or an injected failure fires. */
static int api_enter(int api)
{
    api_count(api);
    int sticky = atomic_load(&g_sticky);
    if (sticky) return fail(sticky, "an earlier kernel faulted; the context is unusable");
    int code = injection_take(api);
    return code ? fail(code, "injected failure") : 0;
}

#define ENTER(name)                                                                           \
    do {                                                                                      \
        int inj_ = api_enter(API_##name);                                                     \
        if (inj_) return inj_;                                                                \
    } while (0)

/* Arm a failure: the (after+1)-th next call of api returns code (once); injections fire in the
 * order they were armed. 0 on success, -1 on bad arguments. */
static inline int injection_arm(int api, int after, int code)
{
    if (api < 0 || after < 0 || code == 0) return -1;
    struct injection *j = calloc(1, sizeof *j);
    if (!j) return -1;
    j->api = api;
    j->countdown = after;
    j->code = code;
    pthread_mutex_lock(&g_inj_mu);
    struct injection **pp = &g_inj;
    while (*pp) pp = &(*pp)->next;
    *pp = j;
    atomic_fetch_add(&g_inj_pending, 1);
    pthread_mutex_unlock(&g_inj_mu);
    return 0;
}

/* Calls of the named function since the last reset; -1 for an unknown name. */
static inline long calls_of(const char *api)
{
    int i = api_lookup(api);
    return i < 0 ? -1 : atomic_load(&g_calls[i]);
}

/* Clear the counters and the pending injections. */
static inline void counters_reset(void)
{
    pthread_mutex_lock(&g_inj_mu);
    while (g_inj) {
        struct injection *j = g_inj;
        g_inj = j->next;
        free(j);
    }
    atomic_store(&g_inj_pending, 0);
    for (int i = 0; i < API_COUNT; i++) atomic_store(&g_calls[i], 0);
    pthread_mutex_unlock(&g_inj_mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                                */

static inline long env_long(const char *name, long dflt)
{
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end;
    long x = strtol(v, &end, 10);
    return end == v ? dflt : x;
}

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void deadline_after_ms(struct timespec *ts, long ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static inline void cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

static inline size_t page_size(void)
{
    static size_t ps;
    if (!ps) ps = (size_t)sysconf(_SC_PAGESIZE);
    return ps;
}

/* FAKE_ENV("DEVICE_COUNT"), default 1, within [0, MAX_DEV]. */
static inline int device_count(void)
{
    long n = env_long(FAKE_ENV("DEVICE_COUNT"), 1);
    if (n < 0) n = 0;
    if (n > MAX_DEV) n = MAX_DEV;
    return (int)n;
}

/* Fill fresh memory with 0xA5 (FAKE_ENV("POISON"): 0 never, 1 always, unset up to 64 MiB), so
 * that a reader of bytes never written sees garbage. */
static inline void poison(void *p, size_t n)
{
    long mode = env_long(FAKE_ENV("POISON"), -1);
    if (mode == 0) return;
    if (mode < 0 && n > ((size_t)64 << 20)) return;
    memset(p, 0xA5, n);
}

/* ------------------------------------------------------------------------------------------ */
/* Allocations: a table sorted by base address                                                 */

enum { A_HOST_PINNED = 0, A_DEVICE = 1 };

struct alloc {
    uintptr_t base;
    size_t size;   /* requested size: ranges are checked against it */
    size_t maplen; /* bytes mapped (>= size) */
    int kind;
    int device;
    long pending;  /* queued/in-flight operations touching it */
    int fd;        /* memfd backing device memory (-1: none) */
    int imported;  /* a mapping of memory another process (or this one) exported */
    void *raw;
    FAKE_ALLOC_FIELDS
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* tables, registries, refcounts */
static pthread_cond_t g_pending_cv;                      /* an allocation's pending count fell */
static struct alloc **g_tab;
static size_t g_ntab, g_captab;
static size_t g_dev_used[MAX_DEV];

/* index of the last entry with base <= p, or -1 */
static inline long tab_floor(uintptr_t p)
{
    long lo = 0, hi = (long)g_ntab - 1, r = -1;
    while (lo <= hi) {
        long mid = (lo + hi) / 2;
        if (g_tab[mid]->base <= p) {
            r = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return r;
}

static inline struct alloc *tab_find(const void *p)
{
    long i = tab_floor((uintptr_t)p);
    if (i < 0) return NULL;
    struct alloc *a = g_tab[i];
    return (uintptr_t)p < a->base + a->maplen ? a : NULL;
}

static inline int tab_insert(struct alloc *a)
{
    if (g_ntab == g_captab) {
        size_t nc = g_captab ? g_captab * 2 : 64;
        struct alloc **t = realloc(g_tab, nc * sizeof *t);
        if (!t) return -1;
        g_tab = t;
        g_captab = nc;
    }
    long i = tab_floor(a->base) + 1;
    memmove(&g_tab[i + 1], &g_tab[i], (g_ntab - (size_t)i) * sizeof *g_tab);
    g_tab[i] = a;
    g_ntab++;
    return 0;
}

static inline void tab_remove(struct alloc *a)
{
    long i = tab_floor(a->base);
    if (i < 0 || g_tab[i] != a) return;
    memmove(&g_tab[i], &g_tab[i + 1], (g_ntab - (size_t)i - 1) * sizeof *g_tab);
    g_ntab--;
}

/* ------------------------------------------------------------------------------------------ */
/* Registries of handles (streams, events, ...): a handle is valid while registered            */

struct reg {
    void **v;
    size_t n, cap;
};

static inline int reg_add(struct reg *r, void *p)
{
    if (r->n == r->cap) {
        size_t nc = r->cap ? r->cap * 2 : 32;
        void **v = realloc(r->v, nc * sizeof *v);
        if (!v) return -1;
        r->v = v;
        r->cap = nc;
    }
    r->v[r->n++] = p;
    return 0;
}

static inline int reg_has(const struct reg *r, const void *p)
{
    for (size_t i = r->n; i-- > 0;)
        if (r->v[i] == p) return 1;
    return 0;
}

static inline void reg_del(struct reg *r, const void *p)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->v[i] == p) {
            r->v[i] = r->v[--r->n];
            return;
        }
}

/* Device memory of FAKE_ENV("HBM_BYTES") per device (default 32 GiB). */
static inline size_t device_capacity(void)
{
    return (size_t)env_long(FAKE_ENV("HBM_BYTES"), (long)((size_t)32 << 30));
}

/* Allocate size bytes of "device" memory on dev and enter them in the table: a memfd per
 * allocation (named memfd_name), mapped shared, so that an importer in another process can map
 * the same pages; without one (fd limit reached) anonymous shared memory that only this process
 * imports. NULL with the reason in why when the size does not fit the device or the memory
 * cannot be mapped. */
static inline struct alloc *device_alloc(int dev, size_t size, const char *memfd_name, char *why,
                                         size_t whylen)
{
    size_t cap = device_capacity();
    size_t ps = page_size();
    if (size > SIZE_MAX - ps) {
        snprintf(why, whylen, "size %zu too big", size);
        return NULL;
    }
    size_t maplen = (size + ps - 1) / ps * ps;
    pthread_mutex_lock(&g_mu);
    if (g_dev_used[dev] + size > cap || g_dev_used[dev] + size < size) {
        size_t used = g_dev_used[dev];
        pthread_mutex_unlock(&g_mu);
        snprintf(why, whylen, "device %d out of memory: %zu bytes requested, %zu of %zu in use",
                 dev, size, used, cap);
        return NULL;
    }
    g_dev_used[dev] += size;
    pthread_mutex_unlock(&g_mu);

    int fd = memfd_create(memfd_name, MFD_CLOEXEC);
    if (fd >= 0 && ftruncate(fd, (off_t)maplen) != 0) {
        close(fd);
        fd = -1;
    }
    void *p = mmap(NULL, maplen, PROT_READ | PROT_WRITE,
                   fd >= 0 ? MAP_SHARED : MAP_SHARED | MAP_ANONYMOUS, fd, 0);
    struct alloc *a = p == MAP_FAILED ? NULL : calloc(1, sizeof *a);
    if (a) {
        a->base = (uintptr_t)p;
        a->size = size;
        a->maplen = maplen;
        a->kind = A_DEVICE;
        a->device = dev;
        a->fd = fd;
        a->raw = p;
        poison(p, size);
    }
    pthread_mutex_lock(&g_mu);
    if (!a || tab_insert(a) != 0) {
        g_dev_used[dev] -= size;
        pthread_mutex_unlock(&g_mu);
        if (p != MAP_FAILED) munmap(p, maplen);
        if (fd >= 0) close(fd);
        free(a);
        snprintf(why, whylen, "cannot map %zu bytes", size);
        return NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return a;
}

/* Allocate size bytes of page-locked host memory and enter them in the table. */
static int host_alloc(size_t size, void **out)
{
    void *p = NULL;
    if (posix_memalign(&p, page_size(), size) != 0)
        return fail(rules.no_memory, "cannot allocate %zu bytes", size);
    struct alloc *a = calloc(1, sizeof *a);
    if (a) {
        a->base = (uintptr_t)p;
        a->size = a->maplen = size;
        a->kind = A_HOST_PINNED;
        a->device = -1;
        a->fd = -1;
        a->raw = p;
        poison(p, size);
    }
    pthread_mutex_lock(&g_mu);
    if (!a || tab_insert(a) != 0) {
        pthread_mutex_unlock(&g_mu);
        free(a);
        free(p);
        return fail(rules.no_memory, "out of host memory");
    }
    pthread_mutex_unlock(&g_mu);
    *out = p;
    return 0;
}

/* Add queued uses (delta > 0) of a, or drop them; NULL (pageable memory) is ignored. Caller
 * holds g_mu. */
static void pin_locked(struct alloc *a, long delta)
{
    if (!a) return;
    a->pending += delta;
    if (a->pending == 0) pthread_cond_broadcast(&g_pending_cv);
}

/* The skin's own reason not to free a (message set), or 0. Caller holds g_mu. */
static int free_refused_locked(const struct alloc *a, const void *p);

/* Free the allocation that starts at p, of kind (what names it in messages). Memory that queued
 * operations use is refused (rules.busy_free) or waited for. */
static int alloc_free(void *p, int kind, const char *what)
{
    struct alloc *a;
    int rc = 0;
    pthread_mutex_lock(&g_mu);
    for (;;) {
        a = tab_find(p);
        if (!a || a->base != (uintptr_t)p)
            rc = fail(rules.bad_range, "%p is not the start of a live %s allocation", p, what);
        else if (a->kind != kind)
            rc = fail(rules.bad_range, "%p is %s memory, not %s memory", p,
                      a->kind == A_DEVICE ? "device" : "page-locked host", what);
        else if (a->imported)
            rc = fail(rules.bad_range, "%p was imported by %s: close it with %s", p,
                      rules.import_name, rules.close_name);
        else if (a->pending && rules.busy_free)
            rc = fail(rules.busy_free,
                      "%p is still used by %ld queued async operation(s): synchronize first", p,
                      a->pending);
        else if (a->pending) {
            pthread_cond_wait(&g_pending_cv, &g_mu);
            continue;
        } else
            rc = free_refused_locked(a, p);
        break;
    }
    if (!rc) {
        tab_remove(a);
        if (a->kind == A_DEVICE) g_dev_used[a->device] -= a->size;
    }
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    if (a->kind == A_DEVICE) {
        munmap(a->raw, a->maplen);
        if (a->fd >= 0) close(a->fd);
    } else {
        free(a->raw);
    }
    free(a);
    return 0;
}

/* Enter a mapping of imported device memory [p, +maplen) in the table (NULL: out of memory).
 * Caller holds g_mu. */
static struct alloc *import_insert_locked(void *p, size_t size, size_t maplen, int device)
{
    struct alloc *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->base = (uintptr_t)p;
    a->size = size;
    a->maplen = maplen;
    a->kind = A_DEVICE;
    a->device = device;
    a->imported = 1;
    a->fd = -1;
    a->raw = p;
    if (tab_insert(a) != 0) {
        free(a);
        return NULL;
    }
    return a;
}

/* Map len bytes at off of file descriptor fd of process pid, through /proc/<pid>/fd (same
 * user, as for ptrace reads); the file must hold min_size bytes. MAP_FAILED when it cannot, with
 * *opened 0 when the descriptor could not be opened (errno says why). */
static void *map_foreign_fd(long pid, int fd, size_t len, off_t off, size_t min_size, int *opened)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/fd/%d", pid, fd);
    int f = open(path, O_RDWR | O_CLOEXEC);
    *opened = f >= 0;
    if (f < 0) return MAP_FAILED;
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(f, &st) == 0 && S_ISREG(st.st_mode) && (size_t)st.st_size >= min_size)
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, f, off);
    int e = errno;
    close(f);
    errno = e;
    return p;
}

/* ------------------------------------------------------------------------------------------ */
/* Copy delay and test hooks common to both fakes (FAKE_HOOK(name): the skin's symbol)          */

static atomic_long g_delay_override = -1; /* -1: FAKE_ENV("COPY_DELAY_US") */

static long copy_delay_us(void)
{
    long d = atomic_load(&g_delay_override);
    return d >= 0 ? d : env_long(FAKE_ENV("COPY_DELAY_US"), 0);
}

/* Calls of `api` since the last reset; -1 for an unknown name. */
EXPORT long FAKE_HOOK(calls)(const char *api) { return calls_of(api); }

/* Sleep per queued copy operation; a negative value goes back to FAKE_ENV("COPY_DELAY_US"). */
EXPORT void FAKE_HOOK(set_copy_delay_us)(long us)
{
    atomic_store(&g_delay_override, us < 0 ? -1 : us);
}

__attribute__((constructor)) static void engine_init(void) { cond_init_mono(&g_pending_cv); }

#endif /* FAKE_ENGINE_H */
