/* The bare process_vm_writev/readv baseline of the benchmarks: the same iovecs llmdist moves to
 * or from another process, issued straight to the kernel on a few threads, so that a benchmark
 * measures llmdist against the syscalls' own limit on this machine. */
#ifndef LLMDIST_PROCESS_VM_BASELINE_H
#define LLMDIST_PROCESS_VM_BASELINE_H

#include <stddef.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Move count runs between this process (local) and process pid (remote): write (nonzero) copies
 * local into remote, else remote into local. The runs are cut into `threads` equal ranges by
 * count, one per thread (the calling thread takes the first), each issued in calls of up to
 * 1024 iovecs. Returns 0, or the errno of the first failure (EFAULT for a short transfer). */
int llmd_process_vm_baseline(int pid, int write, const struct iovec *local,
                             const struct iovec *remote, size_t count, int threads);

#ifdef __cplusplus
}
#endif
#endif
