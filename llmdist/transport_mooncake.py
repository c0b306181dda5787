"""Inter-host data path over Mooncake Transfer Engine (optional: ``pip install llmdist[mooncake]``).

One ``MooncakeTransport`` is one Mooncake engine on the TCP transport in P2P handshake mode (no
metadata server). A peer writes into memory this side registered by naming our ``session_id``
("ip:rpc_port") and the raw addresses; the control connection of ``link_clusters`` carries those.

Mooncake facts this adapter is built on (mooncake-transfer-engine 0.3.13):
- the wheel's ``mooncake.engine`` links ``libibverbs.so.1`` even for TCP (Debian: libibverbs1);
- the receiving side rejects a write that falls outside its registered memory; the sending
  side's source memory needs no registration for TCP, but registering it is harmless;
- ``get_batch_transfer_status`` busy-waits until the batch ends or the engine's own timeout
  (``MC_TRANSFER_TIMEOUT`` seconds, default 30, at least 5, plus 1 ns per byte) passes, so
  ``wait`` runs it on a helper thread and gives up on the caller's timeout instead.

- the TCP transport queues a peer's transfers in a queue of fixed size (1024 by default) shared
  by every batch to that peer, and fails a batch that does not fit ("queue-full rejection").

Queue room: the transport counts the runs it has in flight to each peer and starts a batch only
when it fits in QUEUE_ROOM, in engine batches of at most MAX_QUEUED runs, so that one caller's
large or many batches cannot make another's fail. A batch's room comes back when the engine
gives its verdict, which a helper thread started with the batch waits for.

Handles: ``wait`` never blocks past its timeout_ms (a negative one waits for the engine's own
verdict). WAIT_TIMEOUT leaves the handle live, to be waited on again; any other result ends it.
Every handle should be waited on: ``close()`` settles the rest, blocking while a batch still
moves (at most the engine's transfer timeout) so that no source buffer is read after it returns.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .status import LLMException, LLMStatusCode

__all__ = [
    "MooncakeTransport",
    "EngineChannel",
    "WAIT_TIMEOUT",
    "WAIT_FAILED",
    "MAX_QUEUED",
    "QUEUE_ROOM",
]

WAIT_FAILED = -1  # the engine's code for a failed (or engine-timed-out) batch
WAIT_TIMEOUT = -2  # the batch was still running when wait's timeout passed; wait again later

# Runs this transport keeps queued to one peer at once: the TCP transport's per-peer queue
# (1024 transfers by default), which refuses what does not fit.
QUEUE_ROOM = 1024
# Most runs in one engine batch, and most one channel keeps queued at once: half the room, so
# that two transfers to one peer move side by side.
MAX_QUEUED = QUEUE_ROOM // 2

_P2P = "P2PHANDSHAKE"
_BAD_BATCH_IDS = (0, (1 << 64) - 1)  # what batch_transfer_async_write returns when it fails


class _Waiter:
    """A helper thread that sits in the engine's blocking status call for one batch, then
    calls done (which gives the batch's queue room back)."""

    def __init__(self, engine, batch_id: int, done: Callable[[], None]) -> None:
        self.rc: Optional[int] = None
        self._thread = threading.Thread(
            target=self._run,
            args=(engine, batch_id, done),
            name=f"mooncake-wait-{batch_id:x}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, engine, batch_id: int, done: Callable[[], None]) -> None:
        """Store the engine's verdict: 0 when every byte landed, nonzero otherwise."""
        try:
            self.rc = int(engine.get_batch_transfer_status([batch_id]))
        except Exception:  # noqa: BLE001 - a binding error must not kill the thread silently
            self.rc = WAIT_FAILED
        finally:
            done()

    def join(self, timeout_s: Optional[float]) -> Optional[int]:
        """The verdict, or None if the batch is still running after timeout_s."""
        self._thread.join(timeout_s)
        return None if self._thread.is_alive() else self.rc


class MooncakeTransport:
    """Registered memory and batched one-sided writes to peers through one Mooncake engine."""

    def __init__(self, local_ip: str) -> None:
        """Start an engine on local_ip (TCP transport, P2P handshake, no metadata server)."""
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            import importlib.util

            try:
                installed = importlib.util.find_spec("mooncake") is not None
            except (ImportError, ValueError):
                installed = False
            if not installed:
                how = (
                    "pip install 'llmdist[mooncake]' (on an Ascend host "
                    "'llmdist[mooncake-npu]', Mooncake's NPU build)"
                )
            else:
                how = (
                    "Mooncake is installed but its engine does not load: it needs the system "
                    "libraries libibverbs1, libnuma1 and libcurl4 (Debian/Ubuntu names)"
                )
            raise LLMException(
                f"the inter-host transport needs Mooncake Transfer Engine: {how}; "
                f"importing mooncake.engine failed: {exc}",
                status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            ) from exc
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when a batch gives room back
        self._queued: Dict[str, int] = {}  # peer session -> runs in flight to it
        # handle -> the waiters of its engine batches. Handles are our own numbers: the engine
        # reuses a batch id as soon as it frees it, which may be before wait() hears back.
        self._pending: Dict[int, List[_Waiter]] = {}
        self._handles = itertools.count(1)
        self._regions: List[int] = []
        try:
            engine = TransferEngine()
            rc = engine.initialize(local_ip, _P2P, "tcp", "")
            port = int(engine.get_rpc_port()) if rc == 0 else 0
        except Exception as exc:  # noqa: BLE001 - the binding may raise anything
            raise LLMException(
                f"Mooncake engine on {local_ip} failed to start: {exc}",
                status_code=LLMStatusCode.LLM_FAILED,
            ) from exc
        if rc != 0 or port <= 0:
            raise LLMException(
                f"Mooncake engine on {local_ip} failed to start: initialize returned {rc}, "
                f"rpc port {port}",
                status_code=LLMStatusCode.LLM_FAILED,
            )
        self._engine = engine
        self._session_id = f"{local_ip}:{port}"

    @property
    def session_id(self) -> str:
        """What a peer passes as target_session to write into our registered memory."""
        return self._session_id

    def _live_engine(self):
        """The engine, or an LLM_ENGINE_FINALIZED error after close()."""
        if self._engine is None:
            raise LLMException(
                "the Mooncake transport is closed", status_code=LLMStatusCode.LLM_ENGINE_FINALIZED
            )
        return self._engine

    def register(self, addr: int, length: int) -> None:
        """Let peers write into [addr, addr + length); regions must not overlap."""
        rc = self._live_engine().register_memory(int(addr), int(length))
        if rc != 0:
            raise LLMException(
                f"Mooncake register_memory({addr:#x}, {length}) returned {rc}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        with self._lock:
            self._regions.append(int(addr))

    def unregister(self, addr: int) -> None:
        """Withdraw the region that register() started at addr."""
        rc = self._live_engine().unregister_memory(int(addr))
        if rc != 0:
            raise LLMException(
                f"Mooncake unregister_memory({addr:#x}) returned {rc}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        with self._lock:
            self._regions.remove(int(addr))

    def write_batch(
        self,
        target_session: str,
        src_addrs: Sequence[int],
        dst_addrs: Sequence[int],
        lengths: Sequence[int],
        room_timeout_ms: int = -1,
    ) -> int:
        """Start writing each local src range to the peer's dst range; returns a handle for wait.
        Blocks while the peer's queue is full, at most room_timeout_ms (negative: no bound)."""
        return self._start("write", target_session, src_addrs, dst_addrs, lengths, room_timeout_ms)

    def read_batch(
        self,
        target_session: str,
        dst_addrs: Sequence[int],
        src_addrs: Sequence[int],
        lengths: Sequence[int],
        room_timeout_ms: int = -1,
    ) -> int:
        """Start reading each of the peer's src ranges into the local dst range; returns a
        handle for wait. Blocks while the peer's queue is full, as write_batch does."""
        return self._start("read", target_session, dst_addrs, src_addrs, lengths, room_timeout_ms)

    def _start(
        self,
        op: str,
        target_session: str,
        local_addrs: Sequence[int],
        peer_addrs: Sequence[int],
        lengths: Sequence[int],
        room_timeout_ms: int,
    ) -> int:
        engine = self._live_engine()
        n = len(lengths)
        if n == 0 or len(local_addrs) != n or len(peer_addrs) != n:
            raise LLMException(
                f"{op}_batch needs as many local/peer addresses as lengths, at least one "
                f"(got {len(local_addrs)}/{len(peer_addrs)}/{n})",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        start = (
            engine.batch_transfer_async_write if op == "write" else engine.batch_transfer_async_read
        )
        deadline = None if room_timeout_ms < 0 else time.monotonic() + room_timeout_ms / 1000.0
        waiters: List[_Waiter] = []
        try:
            for lo in range(0, n, MAX_QUEUED):
                hi = min(lo + MAX_QUEUED, n)
                self._take_room(target_session, hi - lo, deadline)
                try:
                    batch_id = int(
                        start(
                            target_session,
                            [int(a) for a in local_addrs[lo:hi]],
                            [int(a) for a in peer_addrs[lo:hi]],
                            [int(x) for x in lengths[lo:hi]],
                        )
                    )
                except BaseException:
                    self._give_room(target_session, hi - lo)
                    raise
                if batch_id <= 0 or batch_id in _BAD_BATCH_IDS:
                    self._give_room(target_session, hi - lo)
                    raise LLMException(
                        f"Mooncake could not start a {op} with {target_session} "
                        "(peer unreachable or unknown session)",
                        status_code=LLMStatusCode.LLM_LINK_FAILED,
                    )
                waiters.append(
                    _Waiter(engine, batch_id, lambda k=hi - lo: self._give_room(target_session, k))
                )
        finally:
            # batches already moving stay tracked even when a later one failed to start:
            # close() settles them under a handle nobody holds
            if waiters:
                with self._lock:
                    handle = next(self._handles)
                    self._pending[handle] = waiters
        return handle

    def _take_room(self, session: str, runs: int, deadline: Optional[float]) -> None:
        """Count runs against the peer's queue, waiting until they fit or the deadline."""
        with self._room:
            while self._queued.get(session, 0) + runs > QUEUE_ROOM:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise LLMException(
                        f"the transfer queue to {session} stayed full ({QUEUE_ROOM} runs in "
                        "flight) until the timeout",
                        status_code=LLMStatusCode.LLM_TIMEOUT,
                    )
                self._room.wait(left)
            self._queued[session] = self._queued.get(session, 0) + runs

    def _give_room(self, session: str, runs: int) -> None:
        """Return runs of the peer's queue (a batch ended or never started)."""
        with self._room:
            left = self._queued[session] - runs
            if left:
                self._queued[session] = left
            else:
                del self._queued[session]
            self._room.notify_all()

    def wait(self, handle: int, timeout_ms: int) -> int:
        """0 once every byte arrived, else nonzero (WAIT_TIMEOUT: still running, wait again)."""
        self._live_engine()
        with self._lock:
            waiters = self._pending.get(handle)
        if waiters is None:
            raise LLMException(
                f"unknown or finished Mooncake batch handle {handle!r}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0
        rc = 0
        for waiter in waiters:
            got = waiter.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if got is None:
                return WAIT_TIMEOUT
            if rc == 0:
                rc = got
        with self._lock:
            self._pending.pop(handle, None)
        return rc

    def close(self) -> None:
        """Settle every batch (see module doc), withdraw every region, stop the engine."""
        if self._engine is None:
            return
        with self._lock:
            waiters = [waiter for batch in self._pending.values() for waiter in batch]
            self._pending.clear()
            regions, self._regions = self._regions, []
        for waiter in waiters:
            waiter.join(None)
        for addr in regions:
            self._engine.unregister_memory(addr)
        self._engine = None

    def __enter__(self) -> "MooncakeTransport":
        """Use the transport in a with-block that closes it."""
        return self

    def __exit__(self, *exc_info) -> None:
        """Close the transport when the with-block ends."""
        self.close()


class EngineChannel:
    """One transfer config's batches to one peer through a MooncakeTransport, as the layer loop
    hands them over: at most MAX_QUEUED runs in flight (the oldest batches are waited for
    first), each wait bounded by wait_ms. Methods return 0 or the failing batch's code
    (WAIT_TIMEOUT, WAIT_FAILED, or the engine's); error keeps the text of a refusal."""

    def __init__(self, transport: MooncakeTransport, session: str, wait_ms: int) -> None:
        self._transport = transport
        self._session = session
        self._wait_ms = wait_ms
        self._handles: List[tuple] = []  # (handle, runs) in the order they were started
        self._queued = 0
        self.error: Optional[str] = None

    def write(
        self, local_addrs: Sequence[int], peer_addrs: Sequence[int], lengths: Sequence[int]
    ) -> int:
        """Queue writes of local ranges into the peer's memory."""
        return self._move("write", local_addrs, peer_addrs, lengths)

    def read(
        self, local_addrs: Sequence[int], peer_addrs: Sequence[int], lengths: Sequence[int]
    ) -> int:
        """Queue reads of the peer's ranges into local memory."""
        return self._move("read", local_addrs, peer_addrs, lengths)

    def _move(self, op: str, local_addrs, peer_addrs, lengths) -> int:
        n = len(lengths)
        for lo in range(0, n, MAX_QUEUED):
            hi = min(lo + MAX_QUEUED, n)
            while self._handles and self._queued + (hi - lo) > MAX_QUEUED:
                rc = self._wait_oldest()
                if rc != 0:
                    return rc
            start = self._transport.write_batch if op == "write" else self._transport.read_batch
            try:
                h = start(
                    self._session,
                    local_addrs[lo:hi],
                    peer_addrs[lo:hi],
                    lengths[lo:hi],
                    room_timeout_ms=self._wait_ms,
                )
            except Exception as exc:  # noqa: BLE001 - any refusal ends the config, with its text
                self.error = f"transfer engine refused a {op}: {exc}"
                timed_out = getattr(exc, "status_code", None) == LLMStatusCode.LLM_TIMEOUT
                return WAIT_TIMEOUT if timed_out else WAIT_FAILED
            self._handles.append((h, hi - lo))
            self._queued += hi - lo
        return 0

    def _wait_oldest(self) -> int:
        h, runs = self._handles.pop(0)
        self._queued -= runs
        try:
            return self._transport.wait(h, self._wait_ms)
        except Exception as exc:  # noqa: BLE001 - a closed transport or a binding error
            self.error = f"transfer engine wait failed: {exc}"
            return WAIT_FAILED

    def verdict(self, code: int) -> Tuple[LLMStatusCode, str]:
        """The status and text of a config this channel failed with code (a method's
        nonzero result): LLM_TIMEOUT when a batch was still running at its wait's end,
        LLM_LINK_FAILED otherwise."""
        timed_out = code == WAIT_TIMEOUT
        text = self.error or (
            f"the transfer engine did not deliver the bytes "
            f"({'timed out' if timed_out else f'code {code}'})"
        )
        return (LLMStatusCode.LLM_TIMEOUT if timed_out else LLMStatusCode.LLM_LINK_FAILED), text

    def settle(self) -> int:
        """Wait for every batch started so far; 0 when all arrived, else the first failure."""
        rc = 0
        while self._handles:
            got = self._wait_oldest()
            if rc == 0:
                rc = got
        return rc
