/* The Ascend ACL runtime (libascendcl.so): the subset llmdist calls, declared from the public
 * documentation, and its loader. llmdist never links it: LLMD_ACL_SYMBOLS, written once, makes
 * the llmd_acl_api table, the dlsym loop and the missing-symbol report (src/acl_runtime.c).
 * tests/vendor_headers checks every signature and layout here against the vendor's header. */
#ifndef LLMDIST_ACL_H
#define LLMDIST_ACL_H

#include <stddef.h>
#include <stdint.h>

#include "llmdist/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLMD_ACL_REPEAT_INITIALIZE 100002
#define LLMD_ACL_FEATURE_NOT_SUPPORT 207000
#define LLMD_ACL_MEMORY_ALLOCATION 207001
#define LLMD_ACL_DEVICE_OOM 207018
#define LLMD_ACL_STREAM_SYNC_TIMEOUT 507046
#define LLMD_ACL_EVENT_SYNC_TIMEOUT 507047
#define LLMD_ACL_DEVICE_MEM_ERROR 507053
#define LLMD_ACL_EVENT_SYNC 0x1u
#define LLMD_ACL_EVENT_RECORDED_STATUS_COMPLETE 1
#define LLMD_ACL_MEM_MALLOC_HUGE_FIRST 0
#define LLMD_ACL_MEM_LOCATION_HOST 0
#define LLMD_ACL_MEM_LOCATION_DEVICE 1
#define LLMD_ACL_HBM_MEM 1
#define LLMD_ACL_IPC_KEY_SIZE 65
#define LLMD_ACL_IPC_EXPORT_NO_PID_CHECK 0x1u
#define LLMD_ACL_IPC_IMPORT_PEER_ACCESS 0x1u
/* An export key's region starts on a page (RUNTIMES.md). */
#define LLMD_ACL_IPC_ALIGN 4096

/* Field order {id, type}: not CUDA's {type, id}. */
struct llmd_acl_mem_location {
    uint32_t id;
    int type;
};
struct llmd_acl_memcpy_batch_attr {
    struct llmd_acl_mem_location dstLoc;
    struct llmd_acl_mem_location srcLoc;
    uint8_t rsv[16];
};

/* The types in the signatures below. Enums are ints here; the header check defines
 * LLMD_ACL_VENDOR_TYPES and maps these names to the vendor's own types. */
#ifndef LLMD_ACL_VENDOR_TYPES
typedef int llmd_aclError;
typedef void *llmd_aclrtStream;
typedef void *llmd_aclrtEvent;
typedef int llmd_aclrtEventRecordedStatus;
typedef int llmd_aclrtMemMallocPolicy;
typedef int llmd_aclrtMemcpyKind;
typedef int llmd_aclrtMemAttr;
typedef struct llmd_acl_memcpy_batch_attr llmd_aclrtMemcpyBatchAttr;
#endif

/* X(group, return type, name, parameters). REQUIRED: loading fails without it; OPTIONAL: used
 * when present; IPC: device IPC (newer CANN), reported by ipc_unavailable when missing. */
#define LLMD_ACL_SYMBOLS(X)                                                                       \
    X(REQUIRED, llmd_aclError, aclInit, (const char *configPath))                                 \
    X(REQUIRED, llmd_aclError, aclrtSetDevice, (int32_t deviceId))                                \
    X(REQUIRED, llmd_aclError, aclrtGetDeviceCount, (uint32_t *count))                            \
    X(REQUIRED, llmd_aclError, aclrtCreateStream, (llmd_aclrtStream *stream))                     \
    X(REQUIRED, llmd_aclError, aclrtDestroyStream, (llmd_aclrtStream stream))                     \
    X(REQUIRED, llmd_aclError, aclrtSynchronizeStream, (llmd_aclrtStream stream))                 \
    X(REQUIRED, llmd_aclError, aclrtStreamWaitEvent,                                              \
      (llmd_aclrtStream stream, llmd_aclrtEvent event))                                           \
    X(REQUIRED, llmd_aclError, aclrtCreateEvent, (llmd_aclrtEvent *event))                        \
    X(REQUIRED, llmd_aclError, aclrtDestroyEvent, (llmd_aclrtEvent event))                        \
    X(REQUIRED, llmd_aclError, aclrtRecordEvent, (llmd_aclrtEvent event, llmd_aclrtStream stream)) \
    X(REQUIRED, llmd_aclError, aclrtQueryEventStatus,                                             \
      (llmd_aclrtEvent event, llmd_aclrtEventRecordedStatus *status))                             \
    X(REQUIRED, llmd_aclError, aclrtSynchronizeEvent, (llmd_aclrtEvent event))                    \
    X(REQUIRED, llmd_aclError, aclrtMalloc,                                                       \
      (void **devPtr, size_t size, llmd_aclrtMemMallocPolicy policy))                             \
    X(REQUIRED, llmd_aclError, aclrtFree, (void *devPtr))                                         \
    X(REQUIRED, llmd_aclError, aclrtMallocHost, (void **hostPtr, size_t size))                    \
    X(REQUIRED, llmd_aclError, aclrtFreeHost, (void *hostPtr))                                    \
    X(REQUIRED, llmd_aclError, aclrtMemcpyAsync,                                                  \
      (void *dst, size_t destMax, const void *src, size_t count, llmd_aclrtMemcpyKind kind,       \
       llmd_aclrtStream stream))                                                                  \
    X(REQUIRED, const char *, aclGetRecentErrMsg, (void))                                         \
    X(OPTIONAL, llmd_aclError, aclrtCreateEventExWithFlag, (llmd_aclrtEvent *event, uint32_t flag)) \
    X(OPTIONAL, llmd_aclError, aclrtSynchronizeEventWithTimeout,                                  \
      (llmd_aclrtEvent event, int32_t timeout))                                                   \
    X(OPTIONAL, llmd_aclError, aclrtMemcpyBatchAsync,                                             \
      (void **dsts, size_t *destMaxs, void **srcs, size_t *sizes, size_t numBatches,              \
       llmd_aclrtMemcpyBatchAttr *attrs, size_t *attrsIndexes, size_t numAttrs,                   \
       size_t *failIndex, llmd_aclrtStream stream))                                               \
    X(OPTIONAL, llmd_aclError, aclrtGetVersion,                                                   \
      (int32_t *majorVersion, int32_t *minorVersion, int32_t *patchVersion))                      \
    X(OPTIONAL, llmd_aclError, aclrtDeviceGetBareTgid, (int32_t *pid))                            \
    X(OPTIONAL, llmd_aclError, aclrtGetMemInfo,                                                   \
      (llmd_aclrtMemAttr attr, size_t *free, size_t *total))                                      \
    X(IPC, llmd_aclError, aclrtIpcMemGetExportKey,                                                \
      (void *devPtr, size_t size, char *key, size_t len, uint64_t flags))                         \
    X(IPC, llmd_aclError, aclrtIpcMemSetImportPid, (const char *key, int32_t *pid, size_t num))   \
    X(IPC, llmd_aclError, aclrtIpcMemImportByKey, (void **devPtr, const char *key, uint64_t flags)) \
    X(IPC, llmd_aclError, aclrtIpcMemClose, (const char *key))

#define LLMD_ACL_API_MEMBER(group, ret, name, params) ret (*name) params;
typedef struct llmd_acl_api {
    LLMD_ACL_SYMBOLS(LLMD_ACL_API_MEMBER)
} llmd_acl_api;

/* Open libascendcl from the first of paths that loads (with try_loaded, first as already
 * loaded by someone else: torch_npu), initialise ACL and check that device_id exists. The
 * library is loaded once per process; the device check runs on every call. NULL with
 * report->error saying why. */
const llmd_runtime *llmd_acl_load(const char *const *paths, size_t count, int try_loaded,
                                  int32_t device_id, llmd_load_report *report);

#ifdef __cplusplus
}
#endif
#endif
