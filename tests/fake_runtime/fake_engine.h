/* The vendor-neutral core of the fake runtimes (tests/fake_acl, tests/fake_cuda): call counters
 * and fault injection over the API table, small helpers, the table of allocations and the
 * registries of handles. Each fake includes it once, after defining:
 *
 *   FAKE_TAG            the prefix of its error messages ("fake-acl")
 *   FAKE_ENV(name)      the name of one of its environment variables ("FAKE_ACL_" name)
 *   API_LIST(X)         X(function) for every function it counts and can fail on demand
 *   MAX_DEV             how many devices it can have
 *   FAKE_ALLOC_FIELDS   its own fields of struct alloc
 *
 * It provides g_mu, the lock of the table, the registries and the skin's own tables. Everything
 * here is static: each library has its own copy of the state. */
#ifndef FAKE_ENGINE_H
#define FAKE_ENGINE_H

#include <pthread.h>
#include <sys/mman.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

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
    void *raw;
    FAKE_ALLOC_FIELDS
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* tables, registries, refcounts */
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

#endif /* FAKE_ENGINE_H */
