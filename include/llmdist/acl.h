/* The subset of the Ascend ACL runtime (libascendcl.so) that llmdist calls, declared from the
 * public documentation. llmdist never links it: the symbols are looked up with dlsym into an
 * llmd_acl_api table. Enum parameters are plain ints. */
#ifndef LLMDIST_ACL_H
#define LLMDIST_ACL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int aclError;
typedef void *aclrtStream;
typedef void *aclrtEvent;
typedef void *aclrtContext;

#define LLMD_ACL_REPEAT_INITIALIZE 100002
#define LLMD_ACL_FEATURE_NOT_SUPPORT 207000
#define LLMD_ACL_EVENT_SYNC 0x1u
#define LLMD_ACL_EVENT_COMPLETE 1
#define LLMD_ACL_MEM_MALLOC_HUGE_FIRST 0
#define LLMD_ACL_MEM_LOCATION_HOST 0
#define LLMD_ACL_MEM_LOCATION_DEVICE 1
#define LLMD_ACL_IPC_HANDLE_SIZE 65
#define LLMD_ACL_IPC_EXPORT_NO_PID_CHECK 1u
#define LLMD_ACL_IPC_IMPORT_PEER_ACCESS 1u

/* Field order {id, type}: not CUDA's {type, id}. */
typedef struct { uint32_t id; int type; } llmd_aclrtMemLocation;
typedef struct { llmd_aclrtMemLocation dstLoc; llmd_aclrtMemLocation srcLoc; uint8_t rsv[16]; } llmd_aclrtMemcpyBatchAttr;

typedef struct llmd_acl_api {
    aclError (*aclInit)(const char *configPath);
    aclError (*aclrtSetDevice)(int32_t deviceId);
    aclError (*aclrtGetDeviceCount)(uint32_t *count);
    aclError (*aclrtCreateStream)(aclrtStream *stream);
    aclError (*aclrtDestroyStream)(aclrtStream stream);
    aclError (*aclrtSynchronizeStream)(aclrtStream stream);
    aclError (*aclrtStreamWaitEvent)(aclrtStream stream, aclrtEvent event);
    aclError (*aclrtCreateEvent)(aclrtEvent *event);
    aclError (*aclrtDestroyEvent)(aclrtEvent event);
    aclError (*aclrtRecordEvent)(aclrtEvent event, aclrtStream stream);
    aclError (*aclrtQueryEventStatus)(aclrtEvent event, int *status);
    aclError (*aclrtSynchronizeEvent)(aclrtEvent event);
    aclError (*aclrtMalloc)(void **devPtr, size_t size, int policy);
    aclError (*aclrtFree)(void *devPtr);
    aclError (*aclrtMallocHost)(void **hostPtr, size_t size);
    aclError (*aclrtFreeHost)(void *hostPtr);
    aclError (*aclrtMemcpyAsync)(void *dst, size_t destMax, const void *src, size_t count,
                                 int kind, aclrtStream stream);
    const char *(*aclGetRecentErrMsg)(void);
    /* Optional: NULL when this CANN lacks them. */
    aclError (*aclrtCreateEventExWithFlag)(aclrtEvent *event, uint32_t flag);
    aclError (*aclrtSynchronizeEventWithTimeout)(aclrtEvent event, int32_t timeout);
    aclError (*aclrtMemcpyBatchAsync)(void **dsts, size_t *destMaxs, void **srcs, size_t *sizes,
                                      size_t numBatches, llmd_aclrtMemcpyBatchAttr *attrs,
                                      size_t *attrsIndexes, size_t numAttrs, size_t *failIndex,
                                      aclrtStream stream);
    aclError (*aclrtGetVersion)(int32_t *major, int32_t *minor, int32_t *patch);
    /* Device IPC (newer CANN): exporter GetExportKey + SetImportPid, importer ImportByKey; both
     * sides Close (the importer first); GetBareTgid gives the pid an exporter whitelists. */
    aclError (*aclrtIpcMemGetExportKey)(void *devPtr, size_t size, char *key, size_t len,
                                        uint64_t flags);
    aclError (*aclrtIpcMemSetImportPid)(const char *key, int32_t *pid, size_t num);
    aclError (*aclrtIpcMemImportByKey)(void **devPtr, const char *key, uint64_t flags);
    aclError (*aclrtIpcMemClose)(const char *key);
    aclError (*aclrtDeviceGetBareTgid)(int32_t *pid);
} llmd_acl_api;

#ifdef __cplusplus
}
#endif
#endif
