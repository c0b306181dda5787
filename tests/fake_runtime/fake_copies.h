/* Copies of the fake runtimes: one copy, a 2D copy and a batch are checked, then copied at once
 * or queued on a stream as one OP_COPY. Each fake includes it once, after fake_streams.h, and
 * defines the checks that differ between vendors:
 *
 *   check_copy_locked(g, c)          one copy's kind and ends; fills g
 *   check_loc_locked(role, i, loc, a)  the location that entry i of a batch claims for its end
 *                                    role ("dst" or "src") against that end's allocation a
 */
#ifndef FAKE_COPIES_H
#define FAKE_COPIES_H

enum { K_H2H = 0, K_H2D = 1, K_D2H = 2, K_D2D = 3, K_DEFAULT = 4 };

/* One copy as the caller asked for it: rows of width bytes, dpitch and spitch apart. */
struct copy_args {
    void *dst;
    const void *src;
    size_t dpitch, spitch, width, rows;
    int kind;  /* K_* */
    int async; /* queued on a stream (else done before the call returns) */
    int dev;   /* the thread's current device */
};

/* A batch of copies of one stream, each with the attribute in force at its index. */
struct batch_args {
    void **dsts, **srcs;
    const size_t *sizes;
    const size_t *dest_maxs; /* NULL: no room given */
    size_t count;
    const void *attrs;              /* the vendor's attribute array */
    size_t attr_size;               /* sizeof one attribute */
    size_t dst_loc_at, src_loc_at;  /* offsetof the two location fields in an attribute */
    const size_t *attr_idxs;
    size_t nattrs;
    size_t *fail_index; /* NULL: not reported */
    const char *count_name, *idxs_name; /* the parameters' names for messages */
};

static int check_copy_locked(struct seg *g, const struct copy_args *c);
static int check_loc_locked(const char *role, size_t i, const void *loc, const struct alloc *a);

/* One copy of n bytes. */
static struct copy_args copy_line(void *dst, const void *src, size_t n, int kind, int async,
                                  int dev)
{
    struct copy_args c = {.dst = dst, .src = src, .dpitch = n, .spitch = n, .width = n,
                          .rows = 1, .kind = kind, .async = async, .dev = dev};
    return c;
}

/* The sides a copy kind names: *dd, *sd = 1 for a device end. K_DEFAULT reads them from the
 * table. Caller holds g_mu and checked kind. */
static void copy_sides_locked(const struct copy_args *c, int *dd, int *sd)
{
    if (c->kind == K_DEFAULT) {
        struct alloc *a = tab_find(c->dst), *b = tab_find(c->src);
        *dd = a && a->kind == A_DEVICE;
        *sd = b && b->kind == A_DEVICE;
    } else {
        *dd = c->kind == K_H2D || c->kind == K_D2D;
        *sd = c->kind == K_D2H || c->kind == K_D2D;
    }
}

/* The bytes each end spans: (rows - 1) pitches and a width. */
static size_t copy_extent(const struct copy_args *c, size_t pitch)
{
    return (c->rows - 1) * pitch + c->width;
}

static void seg_set(struct seg *g, const struct copy_args *c)
{
    g->dst = c->dst;
    g->src = c->src;
    g->width = c->width;
    g->dpitch = c->dpitch;
    g->spitch = c->spitch;
    g->rows = c->rows;
}

/* Queue n checked copies on s as one operation (ownership of segs passes), or, when one of them
 * touches pageable host memory, drain s and copy them here, as a runtime stages pageable memory.
 * Caller holds g_mu (released and retaken around a copy made here). */
static int enqueue_copies_locked(struct stream *s, struct seg *segs, size_t n)
{
    int pageable = 0;
    for (size_t i = 0; i < n; i++) pageable |= !segs[i].da || !segs[i].sa;
    segs_pin_locked(segs, n, 1);
    if (pageable) {
        pthread_mutex_unlock(&g_mu);
        stream_wait(s, -1);
        long d = copy_delay_us();
        if (d > 0) usleep((useconds_t)d);
        segs_copy(segs, n);
        pthread_mutex_lock(&g_mu);
        segs_pin_locked(segs, n, -1);
        free(segs);
        return 0;
    }
    struct op *o = op_new(OP_COPY);
    if (!o) {
        segs_pin_locked(segs, n, -1);
        free(segs);
        return rules.no_memory;
    }
    o->delay_us = copy_delay_us();
    o->segs = segs;
    o->nseg = n;
    stream_push_locked(s, o);
    return 0;
}

/* Check and make one copy now. */
static int copy_sync(struct copy_args c)
{
    struct seg g;
    pthread_mutex_lock(&g_mu);
    int rc = check_copy_locked(&g, &c);
    if (!rc) segs_pin_locked(&g, 1, 1);
    pthread_mutex_unlock(&g_mu);
    if (rc) return rc;
    segs_copy(&g, 1);
    pthread_mutex_lock(&g_mu);
    segs_pin_locked(&g, 1, -1);
    pthread_mutex_unlock(&g_mu);
    return 0;
}

/* Check one copy and queue it on stream h (nothing for an empty one). pre_err: the caller's own
 * finding about the arguments (message set), returned once the stream is known good. */
static int copy_async(void *h, struct copy_args c, int pre_err)
{
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(h, c.dev, &err);
    struct seg *g = NULL;
    if (!s)
        ;
    else if (pre_err)
        err = pre_err;
    else if (c.width && c.rows && !(g = malloc(sizeof *g)))
        err = fail(rules.no_memory, "out of host memory");
    else if (g && (err = check_copy_locked(g, &c)))
        free(g);
    else if (g)
        err = enqueue_copies_locked(s, g, 1);
    if (s) stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

/* The arguments of a batch that do not depend on its entries. */
static int check_batch_args(const struct batch_args *b)
{
    if (b->count == 0) return fail(rules.bad_value, "%s is 0", b->count_name);
    if (b->nattrs == 0 || b->nattrs > b->count)
        return fail(rules.bad_value, "numAttrs %zu not in [1, %s=%zu]", b->nattrs, b->count_name,
                    b->count);
    if (b->attr_idxs[0] != 0) return fail(rules.bad_value, "%s[0] must be 0", b->idxs_name);
    for (size_t j = 1; j < b->nattrs; j++)
        if (b->attr_idxs[j] <= b->attr_idxs[j - 1] || b->attr_idxs[j] >= b->count)
            return fail(rules.bad_value,
                        "%s must increase strictly and stay below %s (index %zu)", b->idxs_name,
                        b->count_name, j);
    return 0;
}

/* Check every entry of a batch and queue the copies on stream h as one operation; the first
 * failing entry's index goes to b->fail_index. */
static int copy_batch(void *h, int dev, const struct batch_args *b)
{
    struct seg *segs = calloc(b->count, sizeof *segs);
    if (!segs) return fail(rules.no_memory, "out of host memory");
    int err = 0;
    pthread_mutex_lock(&g_mu);
    struct stream *s = stream_get_locked(h, dev, &err);
    size_t nseg = 0, ai = 0;
    for (size_t i = 0; s && i < b->count && !err; i++) {
        while (ai + 1 < b->nattrs && b->attr_idxs[ai + 1] <= i) ai++;
        const char *attr = (const char *)b->attrs + ai * b->attr_size;
        size_t n = b->sizes[i];
        if (b->dest_maxs && n > b->dest_maxs[i]) {
            err = fail(rules.bad_range, "entry %zu: size %zu > destMax %zu", i, n,
                       b->dest_maxs[i]);
        } else if (n && (!b->dsts[i] || !b->srcs[i])) {
            err = fail(rules.bad_value, "entry %zu: NULL dst or src", i);
        } else if (n) {
            struct seg *g = &segs[nseg];
            struct copy_args c = copy_line(b->dsts[i], b->srcs[i], n, K_DEFAULT, 1, dev);
            err = check_copy_locked(g, &c);
            if (!err) err = check_loc_locked("dst", i, attr + b->dst_loc_at, g->da);
            if (!err) err = check_loc_locked("src", i, attr + b->src_loc_at, g->sa);
            if (!err) nseg++;
        }
        if (err && b->fail_index) *b->fail_index = i;
    }
    if (s && !err && nseg)
        err = enqueue_copies_locked(s, segs, nseg);
    else
        free(segs);
    if (s) stream_put_locked(s);
    pthread_mutex_unlock(&g_mu);
    return err;
}

#endif /* FAKE_COPIES_H */
