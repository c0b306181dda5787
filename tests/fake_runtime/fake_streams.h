/* Streams and events of the fake runtimes: every stream is a thread that runs the operations
 * queued on it one at a time, in order; an operation stays at the head of the queue until it is
 * done, so a synchronizing caller can wait for the count of done operations. Events are sequence
 * numbers: a record queues the next number, the stream marks it done when it gets there.
 *
 * Each fake includes it once, after fake_engine.h and after defining:
 *
 *   FAKE_STREAM_FIELDS  its own fields of struct stream
 *   FAKE_OP_FIELDS      its own fields of struct op
 *   FAKE_RUN_KERNEL(o)  (optional) runs an OP_KERNEL operation on the stream's thread
 *
 * and it defines event_untimed(e) (below). Handles given to the vendor API are the struct
 * pointers, valid while registered. */
#ifndef FAKE_STREAMS_H
#define FAKE_STREAMS_H

/* A run of rows of one copy: rows of width bytes, dpitch and spitch apart. da and sa are the
 * allocations of the two ends (NULL: pageable host memory), pinned while the copy is queued. */
struct seg {
    char *dst;
    const char *src;
    size_t width, dpitch, spitch, rows;
    struct alloc *da, *sa;
};

enum { OP_COPY, OP_RECORD, OP_WAIT, OP_KERNEL };

struct event {
    int device;
    unsigned flags;
    int refs;        /* the registry + lookups in progress + queued records and waits */
    int *counted_in; /* a per-device count the event holds a place in (NULL: none) */
    /* under g_ev_mu: */
    uint64_t rec_seq, done_seq;
    uint64_t done_stream_id;
    double t_done;
};

struct op {
    int type;
    long delay_us;
    size_t nseg;
    struct seg *segs;    /* OP_COPY, freed with the op */
    struct event *ev;    /* OP_RECORD, OP_WAIT: holds a reference */
    uint64_t seq;        /* the event's sequence number recorded or waited for */
    struct alloc *held[2]; /* other allocations the op pins while queued */
    FAKE_OP_FIELDS
    struct op *next;
};

struct stream {
    int device;
    int is_default;
    uint64_t id;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* worker: work or stop */
    pthread_cond_t done_cv; /* synchronizers */
    struct op *head, *tail;
    uint64_t enq, done;
    int stop;
    int refs; /* the registry + lookups in progress */
    FAKE_STREAM_FIELDS
};

static struct reg g_streams;
static struct stream *g_default_stream[MAX_DEV];
static int g_nstreams_dev[MAX_DEV]; /* created streams per device (not the default ones) */
static uint64_t g_stream_ids;
static struct reg g_events;

/* Lock order: g_mu -> stream.mu, g_mu -> g_ev_mu. Workers never hold two at once. */
static pthread_mutex_t g_ev_mu = PTHREAD_MUTEX_INITIALIZER; /* event sequence numbers */
static pthread_cond_t g_ev_cv;
__attribute__((constructor)) static void streams_init(void) { cond_init_mono(&g_ev_cv); }

/* NULL when e can time (for an elapsed time), else why not. Defined by the skin. */
static const char *event_untimed(const struct event *e);

/* ------------------------------------------------------------------------------------------ */
/* References                                                                                   */

static void event_put_locked(struct event *e)
{
    if (--e->refs == 0) free(e);
}

static void event_put(struct event *e)
{
    pthread_mutex_lock(&g_mu);
    event_put_locked(e);
    pthread_mutex_unlock(&g_mu);
}

static void stream_free(struct stream *s)
{
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->done_cv);
    free(s);
}

static void stream_unref_locked(struct stream *s, int n)
{
    s->refs -= n;
    if (s->refs == 0) stream_free(s);
}

static void stream_put_locked(struct stream *s) { stream_unref_locked(s, 1); }

static void stream_put(struct stream *s)
{
    pthread_mutex_lock(&g_mu);
    stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
}

/* ------------------------------------------------------------------------------------------ */
/* The worker                                                                                   */

static void segs_copy(const struct seg *segs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct seg *g = &segs[i];
        for (size_t r = 0; r < g->rows; r++)
            memmove(g->dst + r * g->dpitch, g->src + r * g->spitch, g->width);
    }
}

static void segs_pin_locked(struct seg *segs, size_t n, long delta)
{
    for (size_t i = 0; i < n; i++) {
        pin_locked(segs[i].da, delta);
        pin_locked(segs[i].sa, delta);
    }
}

static void op_release_locked(struct op *o)
{
    segs_pin_locked(o->segs, o->nseg, -1);
    pin_locked(o->held[0], -1);
    pin_locked(o->held[1], -1);
    if (o->ev) event_put_locked(o->ev);
}

static void op_run(struct stream *s, struct op *o)
{
    if (o->delay_us > 0) usleep((useconds_t)o->delay_us);
    switch (o->type) {
    case OP_COPY:
        if (!atomic_load(&g_sticky)) segs_copy(o->segs, o->nseg);
        break;
    case OP_KERNEL:
#ifdef FAKE_RUN_KERNEL
        if (!atomic_load(&g_sticky)) FAKE_RUN_KERNEL(o);
#endif
        break;
    case OP_RECORD:
        pthread_mutex_lock(&g_ev_mu);
        if (o->seq > o->ev->done_seq) {
            o->ev->done_seq = o->seq;
            o->ev->done_stream_id = s->id;
            o->ev->t_done = now_s();
        }
        pthread_cond_broadcast(&g_ev_cv);
        pthread_mutex_unlock(&g_ev_mu);
        break;
    case OP_WAIT:
        pthread_mutex_lock(&g_ev_mu);
        while (o->ev->done_seq < o->seq) pthread_cond_wait(&g_ev_cv, &g_ev_mu);
        pthread_mutex_unlock(&g_ev_mu);
        break;
    }
}

static void *stream_main(void *arg)
{
    struct stream *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->head && !s->stop) pthread_cond_wait(&s->cv, &s->mu);
        if (!s->head) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        struct op *o = s->head; /* stays queued until done */
        pthread_mutex_unlock(&s->mu);

        op_run(s, o);

        pthread_mutex_lock(&g_mu);
        op_release_locked(o);
        pthread_mutex_unlock(&g_mu);

        pthread_mutex_lock(&s->mu);
        s->head = o->next;
        if (!s->head) s->tail = NULL;
        s->done++;
        pthread_cond_broadcast(&s->done_cv);
        pthread_mutex_unlock(&s->mu);
        free(o->segs);
        free(o);
    }
    return NULL;
}

/* caller holds g_mu */
static void stream_push_locked(struct stream *s, struct op *o)
{
    o->next = NULL;
    pthread_mutex_lock(&s->mu);
    if (s->tail)
        s->tail->next = o;
    else
        s->head = o;
    s->tail = o;
    s->enq++;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* A new operation of type; NULL (message set) when host memory ran out. */
static struct op *op_new(int type)
{
    struct op *o = calloc(1, sizeof *o);
    if (!o) fail(rules.no_memory, "out of host memory");
    if (o) o->type = type;
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* Streams                                                                                      */

/* Stop the worker (after the operations queued) and wait for its thread. */
static void stream_stop(struct stream *s)
{
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
}

/* caller holds g_mu */
static struct stream *stream_new_locked(int dev, int is_default, int *err)
{
    struct stream *s = calloc(1, sizeof *s);
    if (!s) {
        *err = fail(rules.no_stream, "out of host memory");
        return NULL;
    }
    s->device = dev;
    s->is_default = is_default;
    s->id = ++g_stream_ids;
    pthread_mutex_init(&s->mu, NULL);
    cond_init_mono(&s->cv);
    cond_init_mono(&s->done_cv);
    if (pthread_create(&s->th, NULL, stream_main, s) != 0) {
        stream_free(s);
        *err = fail(rules.no_stream, "cannot start the stream worker thread");
        return NULL;
    }
    if (reg_add(&g_streams, s) != 0) {
        stream_stop(s);
        stream_free(s);
        *err = fail(rules.no_stream, "out of host memory");
        return NULL;
    }
    s->refs = 1;
    if (!is_default) g_nstreams_dev[dev]++;
    return s;
}

/* A new stream on dev into *out; limit: the most streams a device may have (< 0: no limit). */
static int stream_create(void **out, int dev, long limit)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = NULL;
    if (limit >= 0 && g_nstreams_dev[dev] >= limit)
        err = fail(rules.no_stream, "too many streams on device %d (%d)", dev, g_nstreams_dev[dev]);
    else
        s = stream_new_locked(dev, 0, &err);
    pthread_mutex_unlock(&g_mu);
    if (s) *out = s;
    return err;
}

/* The stream of handle h (NULL: the default stream of dev, made on first use), with a
 * reference; NULL with *err set when h is not a live stream. Caller holds g_mu. */
static struct stream *stream_get_locked(void *h, int dev, int *err)
{
    struct stream *s;
    if (!h) {
        s = g_default_stream[dev];
        if (!s) {
            s = stream_new_locked(dev, 1, err);
            if (!s) return NULL;
            g_default_stream[dev] = s;
        }
    } else {
        if (!reg_has(&g_streams, h)) {
            *err = fail(rules.bad_handle, "unknown or destroyed stream %p", h);
            return NULL;
        }
        s = h;
    }
    if (rules.stream_device && s->device != dev) {
        *err = fail(rules.stream_device,
                    "stream %p belongs to device %d but the thread's current device is %d", h,
                    s->device, dev);
        return NULL;
    }
    s->refs++;
    return s;
}

/* Wait until the operations queued on s so far are done; ms < 0: forever. 1 on a time-out. */
static int stream_wait(struct stream *s, long ms)
{
    struct timespec dl;
    if (ms >= 0) deadline_after_ms(&dl, ms);
    int late = 0;
    pthread_mutex_lock(&s->mu);
    uint64_t target = s->enq;
    while (s->done < target) {
        if (ms < 0) {
            pthread_cond_wait(&s->done_cv, &s->mu);
        } else if (pthread_cond_timedwait(&s->done_cv, &s->mu, &dl) == ETIMEDOUT) {
            late = s->done < target;
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return late;
}

/* Synchronize with stream h; ms < 0: no time limit. */
static int stream_sync(void *h, int dev, long ms)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(h, dev, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    int late = stream_wait(s, ms);
    stream_put(s);
    if (late) return fail(rules.stream_timeout, "stream %p not done within %ld ms", h, ms);
    return 0;
}

/* *busy: 1 while stream h has queued work, 0 when it is idle. */
static inline int stream_busy(void *h, int dev, int *busy)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(h, dev, &err);
    pthread_mutex_unlock(&g_mu);
    if (!s) return err;
    pthread_mutex_lock(&s->mu);
    *busy = s->done < s->enq;
    pthread_mutex_unlock(&s->mu);
    stream_put(s);
    return 0;
}

/* Destroy the (non-default) stream h. Queued work is refused (rules.busy_destroy) or waited for. */
static int stream_destroy(void *h, int dev)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(h, dev, &err);
    if (!s) {
        pthread_mutex_unlock(&g_mu);
        return err;
    }
    pthread_mutex_lock(&s->mu);
    uint64_t queued = s->enq - s->done;
    pthread_mutex_unlock(&s->mu);
    if (queued && rules.busy_destroy) {
        stream_put_locked(s);
        pthread_mutex_unlock(&g_mu);
        return fail(rules.busy_destroy,
                    "stream %p still has %llu queued operation(s): synchronize it first", h,
                    (unsigned long long)queued);
    }
    reg_del(&g_streams, s);
    g_nstreams_dev[s->device]--;
    pthread_mutex_unlock(&g_mu);

    stream_wait(s, -1);
    stream_stop(s);

    pthread_mutex_lock(&g_mu);
    stream_unref_locked(s, 2); /* the lookup and the registry */
    pthread_mutex_unlock(&g_mu);
    return 0;
}

/* Wait for every stream of dev. */
static inline int device_sync(int dev)
{
    pthread_mutex_lock(&g_mu);
    size_t n = g_streams.n;
    struct stream **v = calloc(n ? n : 1, sizeof *v);
    size_t k = 0;
    for (size_t i = 0; v && i < n; i++) {
        struct stream *s = g_streams.v[i];
        if (s->device == dev) {
            s->refs++;
            v[k++] = s;
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (!v) return fail(rules.no_memory, "out of host memory");
    for (size_t i = 0; i < k; i++) {
        stream_wait(v[i], -1);
        stream_put(v[i]);
    }
    free(v);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Events                                                                                       */

/* caller holds g_mu; takes a ref */
static struct event *event_get_locked(void *h, int *err)
{
    if (!h || !reg_has(&g_events, h)) {
        *err = fail(rules.bad_handle, "unknown or destroyed event %p", h);
        return NULL;
    }
    struct event *e = h;
    e->refs++;
    return e;
}

/* A new event of dev into *out. counted_in: a per-device count of events that may not pass
 * limit (NULL: none). */
static int event_create(void **out, int dev, unsigned flags, int *counted_in, long limit)
{
    pthread_mutex_lock(&g_mu);
    if (counted_in && *counted_in >= limit) {
        int n = *counted_in;
        pthread_mutex_unlock(&g_mu);
        return fail(rules.no_event,
                    "sync event limit reached on device %d (%d): pool and reuse events", dev, n);
    }
    struct event *e = calloc(1, sizeof *e);
    if (!e || reg_add(&g_events, e) != 0) {
        free(e);
        pthread_mutex_unlock(&g_mu);
        return fail(rules.no_event, "out of host memory");
    }
    e->device = dev;
    e->flags = flags;
    e->refs = 1;
    e->counted_in = counted_in;
    if (counted_in) ++*counted_in;
    pthread_mutex_unlock(&g_mu);
    *out = e;
    return 0;
}

static int event_destroy(void *h)
{
    pthread_mutex_lock(&g_mu);
    if (!h || !reg_has(&g_events, h)) {
        pthread_mutex_unlock(&g_mu);
        return fail(rules.bad_handle, "unknown or destroyed event %p", h);
    }
    struct event *e = h;
    reg_del(&g_events, e);
    if (e->counted_in) --*e->counted_in;
    event_put_locked(e); /* queued records/waits keep it alive */
    pthread_mutex_unlock(&g_mu);
    return 0;
}

/* Queue a record of event eh on stream sh. */
static int event_record(void *eh, void *sh, int dev)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(eh, &err);
    struct stream *s = e ? stream_get_locked(sh, dev, &err) : NULL;
    struct op *o = NULL;
    if (s && e->device != s->device)
        err = fail(rules.event_device, "event of device %d recorded on a stream of device %d",
                   e->device, s->device);
    else if (s)
        o = op_new(OP_RECORD);
    if (o) {
        pthread_mutex_lock(&g_ev_mu);
        o->seq = ++e->rec_seq;
        pthread_mutex_unlock(&g_ev_mu);
        o->ev = e; /* keeps the lookup ref */
        stream_push_locked(s, o);
    } else if (e) {
        event_put_locked(e);
        if (!err) err = rules.no_memory;
    }
    if (s) stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

/* Make stream sh wait until event eh's last record (at this call) completes. */
static int stream_wait_event(void *sh, void *eh, int dev)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(sh, dev, &err);
    struct event *e = s ? event_get_locked(eh, &err) : NULL;
    struct op *o = NULL;
    if (e && rules.wait_flag && !(e->flags & rules.wait_flag)) {
        err = fail(rules.bad_handle, "event %p was created without %s and cannot be waited on",
                   eh, rules.wait_flag_name);
    } else if (e) {
        pthread_mutex_lock(&g_ev_mu);
        uint64_t target = e->rec_seq;
        int done = e->done_seq >= target;
        pthread_mutex_unlock(&g_ev_mu);
        if (!done && (o = op_new(OP_WAIT))) {
            o->ev = e; /* keeps the lookup ref */
            o->seq = target;
            stream_push_locked(s, o);
        } else if (!done) {
            err = rules.no_memory;
        }
    }
    if (e && !o) event_put_locked(e);
    if (s) stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

/* *done: 1 when event h's last record completed (or there was none). */
static int event_query(void *h, int *done)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(h, &err);
    pthread_mutex_unlock(&g_mu);
    if (!e) return err;
    pthread_mutex_lock(&g_ev_mu);
    *done = e->done_seq >= e->rec_seq;
    pthread_mutex_unlock(&g_ev_mu);
    event_put(e);
    return 0;
}

/* Wait until event h's last record completes; ms < 0: no time limit. */
static int event_sync(void *h, long ms)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *e = event_get_locked(h, &err);
    pthread_mutex_unlock(&g_mu);
    if (!e) return err;
    struct timespec dl;
    if (ms >= 0) deadline_after_ms(&dl, ms);
    int late = 0;
    pthread_mutex_lock(&g_ev_mu);
    uint64_t target = e->rec_seq;
    while (e->done_seq < target) {
        if (ms < 0) {
            pthread_cond_wait(&g_ev_cv, &g_ev_mu);
        } else if (pthread_cond_timedwait(&g_ev_cv, &g_ev_mu, &dl) == ETIMEDOUT) {
            late = e->done_seq < target;
            break;
        }
    }
    pthread_mutex_unlock(&g_ev_mu);
    event_put(e);
    if (late) return fail(rules.event_timeout, "event %p not complete within %ld ms", h, ms);
    return 0;
}

/* Milliseconds between the completions of events start and end. */
static int event_elapsed(float *ms, void *start, void *end)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct event *a = event_get_locked(start, &err);
    struct event *b = a ? event_get_locked(end, &err) : NULL;
    if (a && !b) event_put_locked(a);
    pthread_mutex_unlock(&g_mu);
    if (!b) return err;
    const char *why = event_untimed(a);
    if (!why) why = event_untimed(b);
    if (why) {
        err = fail(rules.timing, "%s", why);
    } else {
        pthread_mutex_lock(&g_ev_mu);
        if (a->rec_seq == 0 || b->rec_seq == 0)
            err = fail(rules.timing, "event never recorded");
        else if (a->done_seq < a->rec_seq || b->done_seq < b->rec_seq)
            err = fail(rules.not_ready, "event not complete yet");
        else if (rules.same_stream && a->done_stream_id != b->done_stream_id)
            err = fail(rules.timing, "events were recorded on different streams");
        else
            *ms = (float)((b->t_done - a->t_done) * 1000.0);
        pthread_mutex_unlock(&g_ev_mu);
    }
    pthread_mutex_lock(&g_mu);
    event_put_locked(a);
    event_put_locked(b);
    pthread_mutex_unlock(&g_mu);
    return err;
}

/* Live objects both fakes count: "host" (page-locked allocations), "stream" (created streams,
 * not the per-device default ones), "event", "pending" (queued/in-flight copy references); -1
 * for another name. Caller holds g_mu. */
static long live_count_locked(const char *what)
{
    long n = 0;
    if (strcmp(what, "host") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->kind == A_HOST_PINNED;
    } else if (strcmp(what, "stream") == 0) {
        for (size_t i = 0; i < g_streams.n; i++) n += !((struct stream *)g_streams.v[i])->is_default;
    } else if (strcmp(what, "event") == 0) {
        n = (long)g_events.n;
    } else if (strcmp(what, "pending") == 0) {
        for (size_t i = 0; i < g_ntab; i++) n += g_tab[i]->pending;
    } else {
        n = -1;
    }
    return n;
}

#endif /* FAKE_STREAMS_H */
