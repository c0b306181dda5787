/* The host's own limits for the copies llmdist makes, without llmdist: one contiguous copy
 * against the same bytes as 256 random blocks per tensor of 64 tensors (the bench's B2B shape),
 * on one and two threads, between anonymous memory on 2 MiB huge pages (what the host runtime
 * allocates) and a shared memfd mapping (what a mapped peer's cache is; shmem huge pages are
 * usually off, so it is on 4 KiB pages). Copies use streaming stores and prefetch the source
 * four blocks ahead, as the host copy engine does. Prints the best and the median of ROUNDS
 * interleaved rounds (the best is the least disturbed by other processes on a shared machine).
 * It takes three buffers of 64 x 512 blocks (6 GiB at 64 KiB blocks).
 *
 *   cc -O2 -o /tmp/host_copy_limits bench/host_copy_limits.c -lpthread
 *   /tmp/host_copy_limits BLOCK_BYTES [ROUNDS]
 */
#define _GNU_SOURCE
#include <emmintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <xmmintrin.h>

#define TENSORS 64
#define PAIRS 256
#define AHEAD 4

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void copy_streaming(char *dst, const char *src, size_t n)
{
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head; src += head; n -= head;
    while (n >= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
        dst += 64; src += 64; n -= 64;
    }
    memcpy(dst, src, n);
}

static void prefetch(const char *p, size_t n)
{
    for (size_t o = 0; o < n && o < 4096; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

/* One thread's share of a copy: blocks [lo, hi) (contiguous: one block of all the bytes). */
typedef struct job {
    char **dsts, **srcs;
    size_t block, lo, hi;
} job;

static void *run_job(void *arg)
{
    job *j = (job *)arg;
    for (size_t i = j->lo; i < j->hi; i++) {
        if (i + AHEAD < j->hi) prefetch(j->srcs[i + AHEAD], j->block);
        copy_streaming(j->dsts[i], j->srcs[i], j->block);
    }
    _mm_sfence();
    return NULL;
}

static double timed(char **dsts, char **srcs, size_t block, size_t count, int threads)
{
    job a = {dsts, srcs, block, 0, threads > 1 ? count / 2 : count};
    job b = {dsts, srcs, block, count / 2, count};
    pthread_t t;
    double t0 = now_s();
    if (threads > 1 && pthread_create(&t, NULL, run_job, &b) != 0) threads = 1, a.hi = count;
    run_job(&a);
    if (threads > 1) pthread_join(t, NULL);
    return now_s() - t0;
}

static char *anon(size_t n)
{
    void *m = NULL;
    if (posix_memalign(&m, (size_t)2 << 20, n) != 0) return NULL;
    madvise(m, n, MADV_HUGEPAGE);
    memset(m, 1, n);
    return (char *)m;
}

static char *shared(size_t n)
{
    int fd = memfd_create("host_copy_limits", 0);
    if (fd < 0 || ftruncate(fd, (off_t)n) != 0) return NULL;
    char *m = (char *)mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return NULL;
    memset(m, 1, n);
    return m;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s BLOCK_BYTES [ROUNDS]\n", argv[0]);
        return 2;
    }
    size_t block = strtoull(argv[1], NULL, 0);
    int rounds = argc > 2 ? atoi(argv[2]) : 21;
    if (block < 64 || rounds < 1) return 2;
    size_t pool = 2 * PAIRS, per_tensor = pool * block, total = TENSORS * per_tensor;
    size_t count = (size_t)TENSORS * PAIRS, moved = count * block;
    /* anonymous source, anonymous destination, shared memory (source or destination) */
    char *a_src = anon(total), *a_dst = anon(total), *shm = shared(total);
    if (!a_src || !a_dst || !shm) {
        fprintf(stderr, "cannot allocate 3 x %zu bytes\n", total);
        return 1;
    }
    size_t *src_off = malloc(count * sizeof(size_t)), *dst_off = malloc(count * sizeof(size_t));
    size_t *perm = malloc(pool * sizeof(size_t));
    char **dsts = malloc(count * sizeof(char *)), **srcs = malloc(count * sizeof(char *));
    if (!src_off || !dst_off || !perm || !dsts || !srcs) return 1;
    srand(1234);
    for (int side = 0; side < 2; side++)
        for (size_t t = 0; t < TENSORS; t++) {
            for (size_t i = 0; i < pool; i++) perm[i] = i;
            for (size_t i = pool - 1; i > 0; i--) {
                size_t j = (size_t)rand() % (i + 1), x = perm[i];
                perm[i] = perm[j]; perm[j] = x;
            }
            for (size_t i = 0; i < PAIRS; i++)
                (side ? dst_off : src_off)[t * PAIRS + i] = t * per_tensor + perm[i] * block;
        }
    /* case: source memory kind, destination memory kind (0 anonymous, 1 shared), scattered,
     * threads */
    static const struct { int src, dst, scattered, threads; const char *name; } cases[] = {
        {0, 0, 0, 1, "contiguous anon -> anon, 1 thread"},
        {0, 0, 0, 2, "contiguous anon -> anon, 2 threads"},
        {0, 0, 1, 1, "blocks     anon -> anon, 1 thread"},
        {0, 0, 1, 2, "blocks     anon -> anon, 2 threads"},
        {0, 1, 0, 1, "contiguous anon -> shm,  1 thread"},
        {0, 1, 1, 1, "blocks     anon -> shm,  1 thread"},
        {0, 1, 1, 2, "blocks     anon -> shm,  2 threads"},
        {1, 0, 0, 1, "contiguous shm  -> anon, 1 thread"},
        {1, 0, 1, 1, "blocks     shm  -> anon, 1 thread"},
        {1, 0, 1, 2, "blocks     shm  -> anon, 2 threads"},
    };
    enum { NCASES = sizeof cases / sizeof cases[0] };
    double *t = calloc((size_t)NCASES * rounds, sizeof(double));
    char *chunk_d[2], *chunk_s[2];
    if (!t) return 1;
    for (int r = 0; r < rounds; r++)
        for (int c = 0; c < NCASES; c++) {
            char *s = cases[c].src ? shm : a_src, *d = cases[c].dst ? shm : a_dst;
            if (cases[c].scattered) {
                for (size_t i = 0; i < count; i++) {
                    srcs[i] = s + src_off[i];
                    dsts[i] = d + dst_off[i];
                }
                t[c * rounds + r] = timed(dsts, srcs, block, count, cases[c].threads);
            } else {
                /* alternate between the start and the end, as the bench's contiguous copy does */
                size_t off = (r & 1) ? total - moved : 0, half = moved / 2;
                chunk_s[0] = s + off; chunk_s[1] = s + off + half;
                chunk_d[0] = d + off; chunk_d[1] = d + off + half;
                int th = cases[c].threads;
                t[c * rounds + r] = th > 1 ? timed(chunk_d, chunk_s, half, 2, 2)
                                           : timed(chunk_d, chunk_s, moved, 1, 1);
            }
        }
    printf("%zu B blocks, %d tensors x %d pairs = %zu MiB per copy, %d rounds\n", block, TENSORS,
           PAIRS, moved >> 20, rounds);
    double base = 0;
    for (int c = 0; c < NCASES; c++) {
        double *v = t + (size_t)c * rounds;
        qsort(v, (size_t)rounds, sizeof(double), by_value);
        if (c == 0) base = v[0];
        printf("%-36s best %8.2f ms (%6.2f GB/s, %.2fx the first)  median %8.2f ms\n",
               cases[c].name, v[0] * 1e3, moved / v[0] / 1e9, base / v[0], v[rounds / 2] * 1e3);
    }
    return 0;
}
