"""Child-process roles for tests/test_client_flows.py: real clients' and upstream samples' call
sequences, each run in its own process on 127.0.0.1 with numpy arrays in place of NPU tensors.

A role is a function ``role(ctx, **kwargs)``; ``ctx.barrier()`` stands in for the samples'
``torch.distributed.barrier()`` and ``ctx.check(cond, text)`` records a failed expectation. The
parent starts roles with ``start_role`` and reads each one's outcome (its return value, or the
exception and traceback) from a queue. Every wait is bounded.
"""

from __future__ import annotations

import time
import traceback

BARRIER_S = 60.0


class Ctx:
    """What a role gets from the parent: a barrier shared by the roles of one flow, a queue for
    messages to the parent, and the list of failed expectations."""

    def __init__(self, name: str, barrier, queue) -> None:
        self.name = name
        self._barrier = barrier
        self.queue = queue
        self.failures = []

    def barrier(self) -> None:
        self._barrier.wait(BARRIER_S)

    def check(self, cond: bool, text: str) -> None:
        if not cond:
            self.failures.append(text)

    def tell(self, *msg) -> None:
        self.queue.put((self.name, "msg") + msg)


def run_role(name: str, func: str, kwargs: dict, barrier, queue) -> None:
    """Child entry point: run roles.<func>(ctx, **kwargs) and report ("done", result,
    failures) or ("error", text)."""
    ctx = Ctx(name, barrier, queue)
    try:
        from . import flow_roles

        result = getattr(flow_roles, func)(ctx, **kwargs)
        queue.put((name, "done", result, ctx.failures))
    except BaseException:
        queue.put((name, "error", traceback.format_exc(), ctx.failures))
        try:
            barrier.abort()  # the other roles stop waiting for this one
        except Exception:
            pass
    finally:
        time.sleep(0.05)  # let the queue's feeder thread flush
