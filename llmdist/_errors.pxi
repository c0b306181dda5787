# Runtime errors: the one place where a runtime's code becomes an exception or a status.

cdef object status_for(str runtime, int code):
    """The LLMStatusCode a runtime error code stands for."""
    if code == LLMD_TIMEOUT_CODE:
        return LLMStatusCode.LLM_TIMEOUT
    if runtime == "host":
        if code == LLMD_HOST_ENOMEM:
            return LLMStatusCode.LLM_OUT_OF_MEMORY
        if code == LLMD_HOST_ETIMEOUT:
            return LLMStatusCode.LLM_TIMEOUT
    elif runtime == "acl":
        if code in (207001, 207018):
            return LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY
        if code == 507053:
            return LLMStatusCode.LLM_DEVICE_MEM_ERROR
        if code in (507046, 507047):
            return LLMStatusCode.LLM_TIMEOUT
    elif runtime == "cuda":
        if code == LLMD_CUDA_ERROR_MEMORY_ALLOCATION:
            return LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY
    return LLMStatusCode.LLM_FAILED


cdef bint is_timeout(str runtime, int code):
    return (code == LLMD_TIMEOUT_CODE or (runtime == "host" and code == LLMD_HOST_ETIMEOUT)
            or (runtime == "acl" and code == 507047))


def runtime_error(str runtime, int code, str op, str text):
    """Build the LLMException for a failed runtime call, with the runtime's own message."""
    return LLMException(f"{op} failed on the {runtime} runtime: error {code}: {text}",
                        status_code=status_for(runtime, code))
