"""CacheTask: the handle transfer_cache_async returns."""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

from . import _core
from ._check import check_uint32
from .results import config_results
from .status import LLMStatusCode


class CacheTask:
    """A transfer in progress. Waiting with a timeout never cancels it."""

    def __init__(self, job: Optional["_core.TransferJob"], num_configs: int, notice=None) -> None:
        self._job = job
        self._notice = notice  # notifications.TaskNotice of notify=, or None
        self._num_configs = num_configs
        self._report: Optional[Tuple[list, list]] = None

    def _wait(self, timeout_in_millis: Optional[int]) -> bool:
        if timeout_in_millis is not None:
            check_uint32("timeout_in_millis", timeout_in_millis)
        if self._job is None:
            return True
        return self._job.done.wait(
            None if timeout_in_millis is None else timeout_in_millis / 1000.0
        )

    def synchronize(self, timeout_in_millis: Optional[int] = None) -> LLMStatusCode:
        """Wait for the end; LLM_TIMEOUT if still running, else the first failure or success.
        With notify= the end includes the destinations' confirmation of the notification,
        whose failure is returned when the transfer itself succeeded (notification_error)."""
        start = time.monotonic()
        if not self._wait(timeout_in_millis):
            return LLMStatusCode.LLM_TIMEOUT
        results = self._results()
        for r in results:
            if r is not None and r != LLMStatusCode.LLM_SUCCESS:
                return r
        if any(r is None for r in results):
            # Configs never started: the transfer was cancelled before it reached them.
            return self._job.cancel_code or LLMStatusCode.LLM_FAILED
        if self._notice is not None:
            left = None
            if timeout_in_millis is not None:
                left = max(0.0, timeout_in_millis / 1000.0 - (time.monotonic() - start))
            exc = self._notice.wait(left)
            if exc is not None:
                return exc.status_code
        return LLMStatusCode.LLM_SUCCESS

    @property
    def notification_error(self) -> Optional[str]:
        """Why notify= was not delivered after a successful transfer (None: delivered, still
        on its way, not asked for, or not due because the transfer failed)."""
        n = self._notice
        if n is None or not n.sent.is_set():
            return None
        exc = n.wait(0.0)
        return None if exc is None or exc.status_code == LLMStatusCode.LLM_TIMEOUT else str(exc)

    def get_results(self, timeout_in_millis: Optional[int] = None) -> List[Optional[LLMStatusCode]]:
        """One status per config, in config order (None: none of its layers was attempted);
        [LLM_TIMEOUT] * n while the transfer is still running."""
        if not self._wait(timeout_in_millis):
            return [LLMStatusCode.LLM_TIMEOUT] * self._num_configs
        return list(self._results())

    def _results(self) -> List[Optional[LLMStatusCode]]:
        return [] if self._job is None else self._finished()[0]

    def _finished(self) -> Tuple[list, list]:
        """The statuses and failure texts of a finished job (made once)."""
        if self._report is None:
            self._report = config_results(self._job)
        return self._report

    @property
    def done(self) -> bool:
        """True once every config has its result."""
        return self._job is None or self._job.done.is_set()

    @property
    def errors(self) -> List[Optional[str]]:
        """Per config, the text of its failure (None for a config that did not fail)."""
        if self._job is None or not self._job.done.is_set():
            return [None] * self._num_configs
        return list(self._finished()[1])

    @property
    def exception(self) -> Optional[BaseException]:
        """The exception the layer synchronizer raised, if it did."""
        return None if self._job is None else self._job.exception

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return f"CacheTask({self._num_configs} configs, {state})"
