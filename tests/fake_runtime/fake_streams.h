/* The stream worker of the fake runtimes: every stream is a thread that runs the operations
 * queued on it one at a time, in order; an operation stays at the head of the queue until it is
 * done, so a synchronizing caller can wait for the count of done operations. Each fake includes
 * it once, after fake_engine.h (g_mu) and after defining:
 *
 *   struct stream   with mu, cv (work queued or stop), done_cv (an operation finished),
 *                   head, tail, stop, enq and done
 *   struct op       with next and segs (freed with it)
 *   op_run(s, o)    runs one operation; op_release_locked(o) drops what it pinned (g_mu held)
 */
#ifndef FAKE_STREAMS_H
#define FAKE_STREAMS_H

static inline void *stream_main(void *arg)
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
static inline void stream_push_locked(struct stream *s, struct op *o)
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

#endif /* FAKE_STREAMS_H */
