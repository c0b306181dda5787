# Runtime errors: the one place where a runtime's code becomes a status or an exception. The
# runtime itself says what a code means (llmd_runtime.error_class); this maps the meaning.

# The status each error class stands for.
ERROR_STATUS = {
    LLMD_ERROR_OTHER: LLMStatusCode.LLM_FAILED,
    LLMD_ERROR_HOST_OUT_OF_MEMORY: LLMStatusCode.LLM_OUT_OF_MEMORY,
    LLMD_ERROR_DEVICE_OUT_OF_MEMORY: LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY,
    LLMD_ERROR_DEVICE_MEMORY: LLMStatusCode.LLM_DEVICE_MEM_ERROR,
    LLMD_ERROR_TIMEOUT: LLMStatusCode.LLM_TIMEOUT,
    LLMD_ERROR_NOT_SUPPORTED: LLMStatusCode.LLM_FAILED,
}


cdef bint is_timeout(const llmd_runtime *rt, int code) noexcept:
    return code != 0 and rt.error_class(rt.ctx, code) == LLMD_ERROR_TIMEOUT


cdef object runtime_error(const llmd_runtime *rt, int code, str op):
    """The LLMException for a failed runtime call op, with the runtime's own message."""
    cdef const char *text = rt.error_string(rt.ctx, code)
    msg = text.decode("utf-8", "replace") if text != NULL else "no message"
    return LLMException(f"{op} failed on the {rt.name.decode()} runtime: error {code}: {msg}",
                        status_code=ERROR_STATUS[rt.error_class(rt.ctx, code)])
