"""The deadlines of synchronous transfers run on their caller's thread: one thread cancels each
job still running when its deadline passes, as a caller waiting for a worker would."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import List, Optional

from .status import LLMStatusCode


class Deadlines:
    """Cancels jobs (LLM_TIMEOUT) that have not finished by their deadline. Adding one costs a
    lock and a heap push; the thread starts with the first job and sleeps until the earliest
    deadline. A job that ends in time is dropped (done), so that none is kept until its
    deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: List[list] = []  # [deadline, sequence, job or None once done]
        self._dropped = 0
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def add(self, job, seconds: float) -> list:
        """Cancel job with LLM_TIMEOUT unless it is done within seconds from now; returns the
        entry to hand to done."""
        entry = [time.monotonic() + seconds, next(self._seq), job]
        with self._cond:
            if self._closed:
                return entry
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name="llmdist-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()  # earlier than what the thread sleeps for
        return entry

    def done(self, entry: list) -> None:
        """The job of entry ended: forget it (the heap is compacted once half of it is such)."""
        with self._cond:
            if entry[2] is None:
                return
            entry[2] = None
            self._dropped += 1
            if self._dropped > 64 and 2 * self._dropped > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dropped = 0

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                    else:
                        wait = None
                    self._cond.wait(wait)
                if self._closed:
                    return
                entry = heapq.heappop(self._heap)
                job = entry[2]
                if job is None:
                    self._dropped -= 1
                    continue
                entry[2] = None
            if not job.done.is_set():
                job.cancel(LLMStatusCode.LLM_TIMEOUT)

    def close(self) -> None:
        """Stop the thread; deadlines not reached are dropped."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._dropped = 0
            self._cond.notify()
