/* Phase timing of the host copy engine and the layer gate, for profiling. Off unless the
 * environment variable LLMDIST_HOST_TRACE names a file when the library loads; then every batch,
 * team part, single copy, gate mark and gate wake-up is kept in memory (up to LLMD_TRACE_MAX
 * records) and written to that file when the process exits; "%p" in the name stands for the
 * process id, for programs whose child processes load llmdist too. When off, a hook costs one
 * branch. */
#ifndef LLMDIST_HOST_TRACE_H
#define LLMDIST_HOST_TRACE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLMD_TRACE_MAX ((size_t)1 << 20)

/* What a record times. arg: see each kind. */
typedef enum llmd_trace_kind {
    /* a batch of copies here shared with the copy team: arg = the parts the issuing thread ran */
    LLMD_TRACE_BATCH = 1,
    LLMD_TRACE_BATCH_SOLO = 2, /* a batch run by the issuing thread alone (arg 0) */
    LLMD_TRACE_PART = 3,       /* one part of a team batch: arg = the part's index */
    LLMD_TRACE_COPY = 4,       /* one single copy (memcpy_async) */
    LLMD_TRACE_GATE_MARK = 5,  /* a layer gate marked: arg = layer (t_start == t_end) */
    LLMD_TRACE_GATE_WAKE = 6,  /* a blocking gate wait returned: arg = layer, from its start */
    /* a process_vm_writev/readv batch shared with the copy team: arg as for LLMD_TRACE_BATCH */
    LLMD_TRACE_PROCESS_BATCH = 7,
    LLMD_TRACE_PROCESS_BATCH_SOLO = 8, /* a process_vm batch run by the issuing thread alone */
} llmd_trace_kind;

/* Nonzero while tracing (set once, when the library loads). */
extern int llmd_trace_enabled;

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t llmd_trace_now(void);
/* Keep one record (dropped once LLMD_TRACE_MAX are kept). */
void llmd_trace_add(llmd_trace_kind kind, uint64_t t_start, uint64_t t_end, size_t bytes,
                    int64_t arg);

#define LLMD_TRACING() __builtin_expect(llmd_trace_enabled, 0)

#ifdef __cplusplus
}
#endif
#endif
