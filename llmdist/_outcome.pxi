# What the layer loop reports for each config when a transfer ends: raw facts, which
# llmdist.results turns into status codes and messages.

cpdef enum Failure:
    FAIL_NONE = 0
    FAIL_RUNTIME = 1        # a runtime call failed: runtime_error says which and why
    FAIL_SYNC_FALSE = 2     # the layer synchronizer returned a false value
    FAIL_SYNC_RAISED = 3    # the layer synchronizer raised
    FAIL_CANCELLED = 4      # cancel() ended the config: cancel_status
    FAIL_SYNC_TIMEOUT = 5   # a layer's event was not recorded in time
    FAIL_LINK = 6           # the link to the other cluster went down (or its process is gone)
    FAIL_PROCESS = 7        # a transfer with another process failed: os_error is the errno
    FAIL_ENGINE = 8         # the transfer engine refused or failed a transfer: code, detail


cdef class Outcome:
    """How one config of a transfer ended. attempted: some layer's copies were issued (a config
    that never started has failure FAIL_NONE or FAIL_CANCELLED with attempted False)."""

    def __repr__(self):
        return (f"Outcome(failure={Failure(self.failure).name}, attempted={self.attempted}, "
                f"lane={Lane(self.lane).name})")
