"""Status codes and messages of a transfer's configs, made from the raw outcomes the core's
layer loop reports (one place for every per-config status a task returns)."""

from __future__ import annotations

import errno
import os
from typing import List, Optional, Tuple

from . import _core
from .status import LLMStatusCode

_F = _core.Failure


def config_results(
    job: "_core.TransferJob",
) -> Tuple[List[Optional[LLMStatusCode]], List[Optional[str]]]:
    """Per config of a finished job: its status (None when none of its layers was attempted)
    and the text of its failure (None when it did not fail)."""
    results: List[Optional[LLMStatusCode]] = []
    errors: List[Optional[str]] = []
    for o in job.outcomes:
        status, text = _one(job, o)
        results.append(status)
        errors.append(text)
    return results, errors


def _one(
    job: "_core.TransferJob", o: "_core.Outcome"
) -> Tuple[Optional[LLMStatusCode], Optional[str]]:
    f = o.failure
    if f == _F.FAIL_NONE:
        return (LLMStatusCode.LLM_SUCCESS if o.attempted else None), None
    if f == _F.FAIL_LINK:
        return (
            LLMStatusCode.LLM_LINK_FAILED,
            "the link to the destination cluster went down during the transfer",
        )
    if f == _F.FAIL_ENGINE:  # the engine channel classified its own code
        return o.engine_status, o.detail
    if f == _F.FAIL_PROCESS:
        verb = "writing into" if o.direction == _core.Direction.WRITE else "reading from"
        status = (
            LLMStatusCode.LLM_LINK_FAILED
            if o.os_error == errno.ESRCH  # the process is gone
            else LLMStatusCode.LLM_FAILED
        )
        return status, (
            f"{verb} process {o.pid} failed: {os.strerror(o.os_error)} (errno {o.os_error})"
        )
    if f == _F.FAIL_RUNTIME:
        return o.runtime_error.status_code, str(o.runtime_error)
    if f == _F.FAIL_SYNC_FALSE:
        return (
            LLMStatusCode.LLM_PARAM_INVALID,
            f"layer synchronizer returned {job.sync_value!r} for layer {job.sync_layer}",
        )
    if f == _F.FAIL_SYNC_RAISED:
        return (
            LLMStatusCode.LLM_FAILED,
            f"layer synchronizer raised at layer {job.sync_layer}: {job.exception!r}",
        )
    if f == _F.FAIL_SYNC_TIMEOUT:
        return (
            LLMStatusCode.LLM_TIMEOUT,
            f"a layer's event was not recorded within {job.sync_timeout} ms "
            f"(llm.SyncKvCacheWaitTime)",
        )
    if f == _F.FAIL_CANCELLED:
        if not o.attempted:
            return None, None
        return o.cancel_status, f"transfer cancelled: {o.cancel_status}"
    raise AssertionError(f"unknown failure {f!r}")
