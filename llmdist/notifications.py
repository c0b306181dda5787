"""Notifications: small payloads one cluster sends a linked one on their control connection,
delivered in the order they were sent (an llmdist extension, like NIXL's notifs).

A notification travels as a "notify" message and is confirmed by a "notify_reply" carrying a
status: the receiver refuses one that would exceed the number it keeps per peer
(llmdist.notify_queue_depth) or the payload bound (MAX_PAYLOAD), so the sender learns the
failure instead of the payload vanishing. Received payloads wait in an inbox, per sending
cluster, until get_notifications drains them. notify= on the transfer calls sends one only once
the transfer's bytes are complete (see CacheManager)."""

from __future__ import annotations

import base64
import binascii
import collections
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Union

from .frames import Notify, NotifyReply
from .status import LLMException, LLMStatusCode

MAX_PAYLOAD = 64 << 10  # bytes of one notification's payload
DEFAULT_QUEUE_DEPTH = 4096  # notifications kept per sending cluster (llmdist.notify_queue_depth)
REPLY_TIMEOUT_S = 10.0  # how long a sender waits for the receiver's confirmation

_PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID


def check_payload(name: str, payload) -> bytes:
    """payload as bytes: bytes-like, at most MAX_PAYLOAD bytes."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise LLMException(
            f"{name} must be bytes, got {type(payload).__name__}", status_code=_PARAM_INVALID
        )
    data = bytes(payload)
    if len(data) > MAX_PAYLOAD:
        raise LLMException(
            f"{name} has {len(data)} bytes; a notification carries at most {MAX_PAYLOAD} bytes",
            status_code=_PARAM_INVALID,
        )
    return data


class Pending:
    """A notification sent and not yet confirmed by its receiver."""

    def __init__(self, peer, cluster_id: int, forget: Optional[Callable[[], None]] = None) -> None:
        self.peer = peer
        self.cluster_id = cluster_id
        self._forget = forget  # drops it from the sender's table when no reply will come
        self.done = threading.Event()
        self.code = LLMStatusCode.LLM_SUCCESS
        self.reason = ""

    def finish(self, code: LLMStatusCode, reason: str = "") -> None:
        self.code, self.reason = code, reason
        self.done.set()

    def wait(self, timeout_s: float = REPLY_TIMEOUT_S, final: bool = True) -> None:
        """Wait for the receiver's confirmation; raise LLMException when it refused, the link
        went down first, or none came within timeout_s (final: nobody waits for it later)."""
        deadline = time.monotonic() + timeout_s
        while not self.done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.peer is not None and self.peer.closed:
                self.finish(
                    LLMStatusCode.LLM_LINK_FAILED,
                    f"the link to cluster {self.cluster_id} went down before it "
                    f"confirmed the notification",
                )
            elif time.monotonic() >= deadline:
                if final:
                    self.finish(
                        LLMStatusCode.LLM_TIMEOUT,
                        f"cluster {self.cluster_id} did not confirm the notification "
                        f"within {timeout_s:.1f} s",
                    )
                    break
                raise LLMException(
                    f"cluster {self.cluster_id} did not confirm the notification yet",
                    status_code=LLMStatusCode.LLM_TIMEOUT,
                )
        if self.code != LLMStatusCode.LLM_SUCCESS:
            if self._forget is not None:
                self._forget()
            raise LLMException(self.reason, status_code=self.code)


class Notifications:
    """One cluster's notifications: the inbox of those received, per sending cluster, and the
    ones it sent that wait for their confirmation."""

    def __init__(self, own_id: int, queue_depth: int = DEFAULT_QUEUE_DEPTH) -> None:
        self.own_id = own_id
        self.queue_depth = queue_depth
        self._cond = threading.Condition()
        self._inbox: Dict[int, Deque[bytes]] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: Dict[int, Pending] = {}

    # -- receiving
    def deliver(self, cluster_id: int, payload: bytes) -> Optional[str]:
        """Keep a payload from cluster_id; the reason when its queue is full."""
        with self._cond:
            q = self._inbox.setdefault(cluster_id, collections.deque())
            if len(q) >= self.queue_depth:
                return (
                    f"cluster {self.own_id} holds {len(q)} undrained notifications from "
                    f"cluster {cluster_id}, the bound set by option "
                    f"llmdist.notify_queue_depth"
                )
            q.append(payload)
            self._cond.notify_all()
        return None

    def drain(self) -> Dict[int, List[bytes]]:
        """Every payload received since the last drain, per sending cluster, in arrival order."""
        with self._cond:
            out = {cid: list(q) for cid, q in self._inbox.items() if q}
            self._inbox.clear()
        return out

    def wait(self, timeout_s: Optional[float]) -> Dict[int, List[bytes]]:
        """drain(), after waiting up to timeout_s (None: without bound) for one to arrive."""
        with self._cond:
            self._cond.wait_for(lambda: any(self._inbox.values()), timeout_s)
        return self.drain()

    # -- sending
    def send(self, peer, cluster_id: int, payload: bytes) -> Pending:
        """Send payload to a linked peer (None: this cluster itself) at once; the caller waits
        on the returned Pending for the confirmation. Sends to one peer arrive in call order."""
        if peer is None:
            pending = Pending(None, cluster_id)
            refused = self.deliver(cluster_id, payload)
            pending.finish(
                LLMStatusCode.LLM_LINK_BUSY if refused else LLMStatusCode.LLM_SUCCESS, refused or ""
            )
            return pending
        with self._lock:
            self._seq += 1
            seq = self._seq
            pending = self._pending[seq] = Pending(peer, cluster_id, lambda: self._forget(seq))
        try:
            peer.send(Notify(seq, base64.b64encode(payload).decode("ascii")))
        except OSError as exc:
            with self._lock:
                self._pending.pop(seq, None)
            pending.finish(
                LLMStatusCode.LLM_LINK_FAILED,
                f"sending a notification to cluster {cluster_id} failed: {exc}",
            )
        return pending

    def _forget(self, seq: int) -> None:
        with self._lock:
            self._pending.pop(seq, None)

    # -- the control connection's messages (Peer.serve)
    def handle(self, peer, frame: Union[Notify, NotifyReply]) -> None:
        """A notification or the reply to one of ours from peer (fields checked: frames.py)."""
        seq = frame.seq
        if isinstance(frame, Notify):
            data = frame.data
            # base64 of MAX_PAYLOAD bytes is at most 4/3 as long
            if data is None or len(data) > (MAX_PAYLOAD + 2) // 3 * 4:
                reason = (
                    f"a notification carries at most {MAX_PAYLOAD} bytes "
                    f"(cluster {self.own_id} refused a larger one)"
                )
                code = _PARAM_INVALID
            else:
                try:
                    payload = base64.b64decode(data.encode("ascii"), validate=True)
                    reason = self.deliver(peer.cluster_id, payload)
                    code = LLMStatusCode.LLM_LINK_BUSY if reason else LLMStatusCode.LLM_SUCCESS
                except (binascii.Error, UnicodeEncodeError):
                    reason, code = "the notification's payload is not base64", _PARAM_INVALID
            peer.send(NotifyReply(seq, int(code), reason or ""))
            return
        with self._lock:
            pending = self._pending.get(seq)
            if pending is None or pending.peer is not peer:
                return  # one the sender stopped waiting for
            del self._pending[seq]
        try:
            status = LLMStatusCode(frame.code)
        except ValueError:
            status = LLMStatusCode.LLM_FAILED
        pending.finish(status, frame.reason)


class TaskNotice:
    """The notification a transfer_cache_async task sends each destination cluster once every
    config succeeded (none when one failed)."""

    def __init__(self, hub: Notifications, targets: list, payload: bytes) -> None:
        self.hub = hub
        self.targets = targets  # [(peer or None for this cluster, cluster id)]
        self.payload = payload
        self.sent = threading.Event()
        self.pendings: List[Pending] = []
        self.skipped = False  # the transfer failed: nothing was sent

    def fire(self, success: bool) -> None:
        """Called once when the transfer ended (on a transfer worker)."""
        try:
            if success:
                self.pendings = [
                    self.hub.send(peer, cid, self.payload) for peer, cid in self.targets
                ]
            else:
                self.skipped = True
        finally:
            self.sent.set()

    def wait(self, timeout_s: Optional[float]) -> Optional[LLMException]:
        """The failure of the notification (None when it was delivered, or not due because the
        transfer failed); waits up to timeout_s (None: REPLY_TIMEOUT_S) for confirmations."""
        limit = REPLY_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        if not self.sent.wait(limit):
            return LLMException(
                "the notification was not sent yet", status_code=LLMStatusCode.LLM_TIMEOUT
            )
        for p in self.pendings:
            try:
                p.wait(max(0.0, deadline - time.monotonic()), final=timeout_s is None)
            except LLMException as exc:
                return exc
        return None
