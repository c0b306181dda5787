/* The bare process_vm_writev/readv baseline (see include/llmdist/process_vm_baseline.h). */
#define _GNU_SOURCE
#include "llmdist/process_vm_baseline.h"

#include <errno.h>
#include <pthread.h>
#include <sys/types.h>

#define BASELINE_IOV_MAX 1024
#define BASELINE_MAX_THREADS 64

typedef struct baseline_share {
    int pid, write;
    const struct iovec *local, *remote;
    size_t count;
    int err;
} baseline_share;

static void *baseline_run(void *arg)
{
    baseline_share *b = (baseline_share *)arg;
    for (size_t i = 0; i < b->count && !b->err; i += BASELINE_IOV_MAX) {
        size_t k = b->count - i < BASELINE_IOV_MAX ? b->count - i : BASELINE_IOV_MAX;
        size_t want = 0;
        for (size_t j = 0; j < k; j++) want += b->local[i + j].iov_len;
        ssize_t got = b->write
            ? process_vm_writev((pid_t)b->pid, b->local + i, k, b->remote + i, k, 0)
            : process_vm_readv((pid_t)b->pid, b->local + i, k, b->remote + i, k, 0);
        if (got < 0) b->err = errno ? errno : EIO;
        else if ((size_t)got != want) b->err = EFAULT;
    }
    return NULL;
}

int llmd_process_vm_baseline(int pid, int write, const struct iovec *local,
                             const struct iovec *remote, size_t count, int threads)
{
    baseline_share share[BASELINE_MAX_THREADS];
    pthread_t th[BASELINE_MAX_THREADS];
    int started[BASELINE_MAX_THREADS] = {0};
    if (threads < 1) threads = 1;
    if (threads > BASELINE_MAX_THREADS) threads = BASELINE_MAX_THREADS;
    for (int t = 0; t < threads; t++) {
        size_t a = count * (size_t)t / (size_t)threads, b = count * (size_t)(t + 1) / (size_t)threads;
        share[t] = (baseline_share){pid, write, local + a, remote + a, b - a, 0};
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&th[t], NULL, baseline_run, &share[t]) == 0;
    baseline_run(&share[0]);
    int err = share[0].err;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else baseline_run(&share[t]);
        if (!err) err = share[t].err;
    }
    return err;
}
