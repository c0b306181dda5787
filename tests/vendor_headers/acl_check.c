/* Checks include/llmdist/acl.h against the vendor's ACL headers (from the torch-npu wheel):
 * every function of our symbol list is assigned to its member of our table with the vendor's
 * types in place of our names for them (a signature mismatch is a compile error), and struct
 * layouts and constants are compared. Built and run by tests/test_vendor_headers.py. */
#include <stddef.h>
#include <stdio.h>

#include "acl/acl_rt.h"
#include "acl/error_codes/rt_error_codes.h"

#define LLMD_ACL_VENDOR_TYPES
typedef aclError llmd_aclError;
typedef aclrtStream llmd_aclrtStream;
typedef aclrtEvent llmd_aclrtEvent;
typedef aclrtEventRecordedStatus llmd_aclrtEventRecordedStatus;
typedef aclrtMemMallocPolicy llmd_aclrtMemMallocPolicy;
typedef aclrtMemcpyKind llmd_aclrtMemcpyKind;
typedef aclrtMemAttr llmd_aclrtMemAttr;
typedef aclrtMemcpyBatchAttr llmd_aclrtMemcpyBatchAttr;
#include "llmdist/acl.h"

#define SAME_TYPE(a, b) _Static_assert(__builtin_types_compatible_p(a, b), #a " is not " #b)
#define SAME(a, b) _Static_assert((long long)(a) == (long long)(b), #a " != " #b)
/* Our declarations pass enums as int: same size, so the same calling convention. */
#define INT_ENUM(e) _Static_assert(sizeof(e) == sizeof(int), #e " is not int-sized")

SAME_TYPE(aclError, int);
SAME_TYPE(aclrtStream, void *);
SAME_TYPE(aclrtEvent, void *);
INT_ENUM(aclrtEventRecordedStatus);
INT_ENUM(aclrtMemMallocPolicy);
INT_ENUM(aclrtMemcpyKind);
INT_ENUM(aclrtMemLocationType);
INT_ENUM(aclrtMemAttr);

SAME(sizeof(struct llmd_acl_mem_location), sizeof(aclrtMemLocation));
SAME(offsetof(struct llmd_acl_mem_location, id), offsetof(aclrtMemLocation, id));
SAME(offsetof(struct llmd_acl_mem_location, type), offsetof(aclrtMemLocation, type));
SAME(sizeof(struct llmd_acl_memcpy_batch_attr), sizeof(aclrtMemcpyBatchAttr));
SAME(offsetof(struct llmd_acl_memcpy_batch_attr, dstLoc), offsetof(aclrtMemcpyBatchAttr, dstLoc));
SAME(offsetof(struct llmd_acl_memcpy_batch_attr, srcLoc), offsetof(aclrtMemcpyBatchAttr, srcLoc));
SAME(offsetof(struct llmd_acl_memcpy_batch_attr, rsv), offsetof(aclrtMemcpyBatchAttr, rsv));

SAME(LLMD_MEMCPY_H2H, ACL_MEMCPY_HOST_TO_HOST);
SAME(LLMD_MEMCPY_H2D, ACL_MEMCPY_HOST_TO_DEVICE);
SAME(LLMD_MEMCPY_D2H, ACL_MEMCPY_DEVICE_TO_HOST);
SAME(LLMD_MEMCPY_D2D, ACL_MEMCPY_DEVICE_TO_DEVICE);
SAME(LLMD_MEMCPY_DEFAULT, ACL_MEMCPY_DEFAULT);
SAME(LLMD_ACL_FEATURE_NOT_SUPPORT, ACL_ERROR_RT_FEATURE_NOT_SUPPORT);
SAME(LLMD_ACL_MEMORY_ALLOCATION, ACL_ERROR_RT_MEMORY_ALLOCATION);
SAME(LLMD_ACL_DEVICE_OOM, ACL_ERROR_RT_DEVICE_OOM);
SAME(LLMD_ACL_STREAM_SYNC_TIMEOUT, ACL_ERROR_RT_STREAM_SYNC_TIMEOUT);
SAME(LLMD_ACL_EVENT_SYNC_TIMEOUT, ACL_ERROR_RT_EVENT_SYNC_TIMEOUT);
SAME(LLMD_ACL_DEVICE_MEM_ERROR, ACL_ERROR_RT_DEVICE_MEM_ERROR);
SAME(LLMD_ACL_EVENT_SYNC, ACL_EVENT_SYNC);
SAME(LLMD_ACL_EVENT_RECORDED_STATUS_COMPLETE, ACL_EVENT_RECORDED_STATUS_COMPLETE);
SAME(LLMD_ACL_MEM_MALLOC_HUGE_FIRST, ACL_MEM_MALLOC_HUGE_FIRST);
SAME(LLMD_ACL_MEM_LOCATION_HOST, ACL_MEM_LOCATION_TYPE_HOST);
SAME(LLMD_ACL_MEM_LOCATION_DEVICE, ACL_MEM_LOCATION_TYPE_DEVICE);
SAME(LLMD_ACL_HBM_MEM, ACL_HBM_MEM);
SAME(LLMD_ACL_IPC_EXPORT_NO_PID_CHECK, ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION);
SAME(LLMD_ACL_IPC_IMPORT_PEER_ACCESS, ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS);

/* Each vendor function into our table's member of the same name. The references are weak:
 * nothing is linked, the program only runs the checks in main. */
#define PRAGMA(text) _Pragma(#text)
#define WEAK(group, ret, name, params) PRAGMA(weak name)
LLMD_ACL_SYMBOLS(WEAK)

void llmd_acl_check(llmd_acl_api *api)
{
#define ASSIGN(group, ret, name, params) api->name = name;
    LLMD_ACL_SYMBOLS(ASSIGN)
}

int main(void)
{
    /* A static const int in the vendor's header: not a constant expression in C. */
    if (LLMD_ACL_REPEAT_INITIALIZE != ACL_ERROR_REPEAT_INITIALIZE) {
        fprintf(stderr, "LLMD_ACL_REPEAT_INITIALIZE != ACL_ERROR_REPEAT_INITIALIZE\n");
        return 1;
    }
    printf("ok\n");
    return 0;
}
