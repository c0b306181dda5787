"""A fixed pool of transfer workers; each owns a runtime stream and runs one job at a time."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import List, Optional

from . import _core
from .status import LLMStatusCode

log = logging.getLogger(__name__)


class TransferWorkers:
    """Threads that run TransferJob.run (the nogil layer loop) on their own streams."""

    def __init__(self, runtime: "_core.Runtime", size: int) -> None:
        self._runtime = runtime
        self._size = size
        self._queue: "queue.SimpleQueue[Optional[_core.TransferJob]]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._idle = 0  # threads waiting for a job

    @property
    def idle(self) -> int:
        """How many workers wait for a job (then nothing queued waits for them)."""
        return self._idle

    def start(self) -> None:
        """Start the threads and wait until each has its stream, so that the first transfer
        does not pay for thread and stream creation."""
        ready = threading.Barrier(self._size + 1)
        with self._lock:
            if self._closed or self._threads:
                return
            for i in range(self._size):
                t = threading.Thread(
                    target=self._main, args=(ready,), name=f"llmdist-transfer-{i}", daemon=True
                )
                t.start()
                self._threads.append(t)
        try:
            ready.wait(timeout=30)
        except threading.BrokenBarrierError:
            log.warning("transfer workers started slowly")

    def submit(self, job: "_core.TransferJob") -> None:
        """Queue a job for the next free worker."""
        with self._lock:
            if self._closed:
                raise RuntimeError("transfer workers are shut down")
        if not self._threads:
            self.start()
        self._queue.put(job)

    def _main(self, ready: threading.Barrier) -> None:
        try:
            self._runtime.bind_device()
            stream = _core.Stream(self._runtime)
            # Host-to-host copies of a device runtime run on the host copy engine's own stream.
            host_stream = None if self._runtime.is_host else _core.Stream(_core.Runtime.host())
            # idle from here on: counted before start() returns, so that the first call after
            # it sees every worker free
            with self._lock:
                self._idle += 1
        finally:
            try:
                ready.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
        try:
            while True:
                job = self._queue.get()
                with self._lock:
                    self._idle -= 1
                if job is None:
                    break
                try:
                    job.run(stream, host_stream)
                except BaseException:  # a bug in the loop must still end the task
                    log.exception("transfer job failed unexpectedly")
                    job.cancel(LLMStatusCode.LLM_FAILED)
                with self._lock:
                    self._idle += 1
        finally:
            stream.close()
            if host_stream is not None:
                host_stream.close()

    def shutdown(self, timeout: float) -> None:
        """Stop the threads after their current job; wait up to timeout seconds in all.
        A worker still inside a user's synchronizer is left to exit when it returns."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
