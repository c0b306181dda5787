/* Layer gate (see include/llmdist/layer_gate.h). */
#define _GNU_SOURCE
#include "llmdist/layer_gate.h"
#include "llmdist/host_trace.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct llmd_gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int32_t num_layers;
    unsigned char *marked;
};

llmd_gate *llmd_gate_create(int32_t num_layers)
{
    if (num_layers <= 0) return NULL;
    llmd_gate *g = (llmd_gate *)calloc(1, sizeof(llmd_gate));
    if (!g) return NULL;
    g->marked = (unsigned char *)calloc((size_t)num_layers, 1);
    if (!g->marked) { free(g); return NULL; }
    g->num_layers = num_layers;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    return g;
}

void llmd_gate_destroy(llmd_gate *g)
{
    if (!g) return;
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g->marked);
    free(g);
}

void llmd_gate_mark(llmd_gate *g, int32_t layer)
{
    if (layer < 0 || layer >= g->num_layers) return;
    if (LLMD_TRACING()) {
        uint64_t t = llmd_trace_now();
        llmd_trace_add(LLMD_TRACE_GATE_MARK, t, t, 0, layer);
    }
    pthread_mutex_lock(&g->mu);
    g->marked[layer] = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

void llmd_gate_reset(llmd_gate *g)
{
    pthread_mutex_lock(&g->mu);
    memset(g->marked, 0, (size_t)g->num_layers);
    pthread_mutex_unlock(&g->mu);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

int llmd_gate_wait(llmd_gate *g, int32_t layer, int32_t timeout_ms, const volatile int *stop)
{
    if (layer < 0 || layer >= g->num_layers) return LLMD_GATE_STOPPED;
    uint64_t t0 = LLMD_TRACING() ? llmd_trace_now() : 0;
    double deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : 0;
    int rc = LLMD_GATE_OK;
    pthread_mutex_lock(&g->mu);
    while (!g->marked[layer]) {
        if (stop && *stop) { rc = LLMD_GATE_STOPPED; break; }
        if (timeout_ms >= 0 && now_ms() >= deadline) { rc = LLMD_GATE_TIMEOUT; break; }
        /* Wake at least every 5 ms to notice a stop request. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 5000000L;
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    pthread_mutex_unlock(&g->mu);
    /* Polls (timeout 0) are not wake-ups. */
    if (LLMD_TRACING() && timeout_ms != 0)
        llmd_trace_add(LLMD_TRACE_GATE_WAKE, t0, llmd_trace_now(), 0, layer);
    return rc;
}
