# The host copy engine's knobs.

def host_tuning():
    """The host copy engine's knobs as a dict."""
    cdef llmd_host_tuning *t = llmd_host_tuning_get()
    return {"copy_threads": t.copy_threads, "split_min_bytes": t.split_min_bytes,
            "stream_store_min_bytes": t.stream_store_min_bytes,
            "stream_store_short_batch_bytes": t.stream_store_short_batch_bytes}


def set_host_tuning(copy_threads=None, split_min_bytes=None, stream_store_min_bytes=None,
                    stream_store_short_batch_bytes=None):
    """Set the host copy engine's knobs: threads sharing a batch, the smallest batch worth
    splitting, the smallest run copied with streaming stores (0 disables them), and the
    smallest batch of short runs (under 256 B on average) whose runs all use them (0: none)."""
    cdef llmd_host_tuning *t = llmd_host_tuning_get()
    if copy_threads is not None:
        if type(copy_threads) is not int or not 1 <= copy_threads <= 64:
            raise ValueError(f"copy_threads must be an int in [1, 64], got {copy_threads!r}")
        t.copy_threads = copy_threads
    if split_min_bytes is not None:
        if type(split_min_bytes) is not int or split_min_bytes < 0:
            raise ValueError(f"split_min_bytes must be an int >= 0, got {split_min_bytes!r}")
        t.split_min_bytes = split_min_bytes
    if stream_store_min_bytes is not None:
        if type(stream_store_min_bytes) is not int or stream_store_min_bytes < 0:
            raise ValueError(f"stream_store_min_bytes must be an int >= 0, got {stream_store_min_bytes!r}")
        t.stream_store_min_bytes = stream_store_min_bytes
    if stream_store_short_batch_bytes is not None:
        if type(stream_store_short_batch_bytes) is not int or stream_store_short_batch_bytes < 0:
            raise ValueError(f"stream_store_short_batch_bytes must be an int >= 0, got "
                             f"{stream_store_short_batch_bytes!r}")
        t.stream_store_short_batch_bytes = stream_store_short_batch_bytes
