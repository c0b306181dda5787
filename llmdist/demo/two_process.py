"""Mode ``two-process``: the decode cluster in a child process on 127.0.0.1, which checks what
arrived; the prefill streams its KV cache into it by key."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
import traceback

import numpy as np

from .. import (
    BlocksCacheKey,
    CacheDesc,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferWithCacheKeyConfig,
)
from .check import (
    CANARY,
    DIGEST_BYTES,
    Verdict,
    block_digests,
    check_model_pages,
    verify_digests,
)
from .model import (
    DTYPES,
    AllReady,
    ToyModel,
    aligned_empty,
    layout_from_args,
    stream_prefill,
    tensor_views,
)
from .report import Timings, fmt_bytes, fmt_t, print_report

HOST = "127.0.0.1"
LINK_MS = 5000  # link_clusters / unlink_clusters timeout
READY_S = 60.0  # the child's start-up (spawn: a fresh interpreter imports numpy, llmdist)
REPLY_S = 60.0  # any other answer from the child (verification hashes 2 x the cache)
TASK_MS = 60_000  # bound on waiting for a transfer
CHILD_IDLE_S = 120.0  # the child gives up on a silent parent after this long
TRANSPORTS = ("auto", "direct", "mooncake")


class DemoError(Exception):
    """The demo cannot go on (the decode process failed, did not answer, or a link failed)."""


def _decode_main(conn, spec: dict) -> None:
    """Child process: a DECODER cluster listening on ``spec["host"]`` (port picked by the OS)
    that allocates the destination blocks cache under ``BlocksCacheKey(cluster_id, 0)``, fills
    it with the canary byte and serves the parent's commands over ``conn``:

        ("verify", src_table, dst_table, digests) -> ("ok", Verdict fields as a dict)
        ("reset",)                                -> ("ok", None)  (canary again)
        ("exit", prefill_cluster_id)              -> ("ok", None), then unlink, finalize, exit

    Start-up failures and failed commands answer ("err", traceback). Without a command for
    ``spec["idle_s"]`` seconds, or when the parent's end closes, it finalizes and exits."""
    cluster_id = spec["cluster_id"]
    dd = LLMDataDist(LLMRole.DECODER, cluster_id)
    views: list[np.ndarray] = []
    try:
        try:
            cfg = LLMConfig()
            cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
            cfg.enable_cache_manager = True
            cfg.enable_remote_cache_accessible = True
            cfg.listen_ip_info = f"{spec['host']}:0"
            options = cfg.generate_options()
            if spec.get("auth_key"):
                options["llmdist.auth_key"] = spec["auth_key"]
            dd.init(options)
            dtype, data_type = DTYPES[spec["dtype"]]
            elems = spec["block_size"] // np.dtype(dtype).itemsize
            desc = CacheDesc(
                num_tensors=spec["num_tensors"],
                shape=[spec["pool_blocks"], elems],
                data_type=data_type,
                placement=Placement.DEVICE,
            )
            cache = dd.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(cluster_id, 0))
            views = tensor_views(
                cache.tensor_addrs, spec["pool_blocks"] * spec["block_size"], spec["block_size"]
            )
            for v in views:
                v.fill(spec["canary"])
        except BaseException:  # noqa: BLE001 - any start-up failure goes to the parent
            conn.send(("err", traceback.format_exc()))
            return
        conn.send(("ready", dd.listen_port, os.getpid()))
        while True:
            try:
                if not conn.poll(spec["idle_s"]):
                    break
                cmd, *params = conn.recv()
            except (EOFError, OSError):
                break
            try:
                result = None
                if cmd == "verify":
                    src_table, dst_table, digests = params
                    result = verify_digests(
                        views, src_table, dst_table, digests, spec["canary"]
                    ).__dict__
                elif cmd == "reset":
                    for v in views:
                        v.fill(spec["canary"])
                elif cmd == "exit":
                    info = LLMClusterInfo()
                    info.remote_cluster_id = params[0]
                    dd.unlink_clusters([info], LINK_MS, force=True)
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                reply = ("ok", result)
            except Exception:  # noqa: BLE001 - a failed command is answered, the child goes on
                reply = ("err", traceback.format_exc())
            try:
                conn.send(reply)
            except (EOFError, OSError):
                break
            if cmd == "exit":
                break
    finally:
        views.clear()  # no view may outlive the shared memory finalize frees
        dd.finalize()


class DecodeChild:
    """The parent's handle on the decode process: bounded waits, clean exit, kill on failure."""

    def __init__(self, spec: dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_decode_main, args=(child, spec), name="llmdist-demo-decode", daemon=True
        )
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        self.port: int | None = None

    def _recv(self, timeout: float, what: str):
        try:
            ready = self.conn.poll(timeout)
            msg = self.conn.recv() if ready else None
        except (EOFError, OSError):
            self.proc.join(1)
            raise DemoError(
                f"the decode process (pid {self.pid}) ended (exit code "
                f"{self.proc.exitcode}) before answering {what}"
            ) from None
        if msg is None:
            raise DemoError(
                f"the decode process (pid {self.pid}) did not answer {what} within {timeout:.0f} s"
            )
        if msg[0] == "err":
            raise DemoError(f"the decode process failed at {what}:\n{msg[1]}")
        return msg

    def wait_ready(self, timeout: float = READY_S) -> int:
        _, self.port, self.pid = self._recv(timeout, "start-up")
        return self.port

    def call(self, cmd: str, *params, timeout: float = REPLY_S):
        try:
            self.conn.send((cmd, *params))
        except (EOFError, OSError) as exc:
            raise DemoError(f"the decode process (pid {self.pid}) is gone: {exc}") from None
        return self._recv(timeout, repr(cmd))[1]

    def close(self, prefill_id: int | None, graceful: bool = True) -> None:
        """Ask the child to unlink and finalize (bounded), then reap it; kill it if it does
        not end in time (or at once without ``graceful``). Its shared memory is a memfd,
        which goes with the last process holding it."""
        try:
            if graceful and self.proc.is_alive():
                try:
                    self.call("exit", prefill_id, timeout=LINK_MS / 1000.0 + 5.0)
                except DemoError:
                    pass
                self.proc.join(10.0)
        finally:
            killed = self.proc.is_alive()
            if killed:
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.join(10.0)
            self.conn.close()


def _path_description(dd: LLMDataDist, decode_id: int) -> str:
    """The data path llmdist picked for the decode (read from the link; informational)."""
    info = dd.peer_info(decode_id)
    path = info["path"] if info else None
    if path == "direct":
        return (
            "direct (same host): copies straight into the decode's shared memory (a sealed "
            "memfd it passed over a Unix socket), mapped here"
        )
    if path == "mooncake":
        return "Mooncake Transfer Engine, TCP over 127.0.0.1, one batched write per layer"
    return str(path)


def run_two_process(args, out=sys.stdout) -> int:
    """The prefill in this process, the decode in a child process on 127.0.0.1: link, stream
    the KV cache by key into the decode's allocated blocks cache, let the decode verify."""
    layout = layout_from_args(args)
    problem = layout.check()
    if problem:
        out.write(f"error: {problem}\n")
        return 2

    rng = random.Random(args.seed)
    src_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    dst_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    model = ToyModel(layout, args.seed)

    prefill_id, decode_id = args.cluster_id, args.cluster_id + 1
    notes = []
    spec = {
        "cluster_id": decode_id,
        "host": HOST,
        "dtype": args.dtype,
        "num_tensors": layout.num_tensors,
        "pool_blocks": layout.pool_blocks,
        "block_size": layout.block_size,
        "canary": CANARY,
        "idle_s": CHILD_IDLE_S,
        "auth_key": args.auth_key,
    }
    t_spawn = time.perf_counter()
    decode = DecodeChild(spec)
    dd: LLMDataDist | None = None
    graceful = False
    progress: list[str] = []  # what is known when something fails
    try:
        port = decode.wait_ready()
        ready_s = time.perf_counter() - t_spawn

        dd = LLMDataDist(LLMRole.PROMPT, prefill_id)
        cfg = LLMConfig()
        cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
        cfg.enable_cache_manager = True
        cfg.enable_remote_cache_accessible = True
        options = cfg.generate_options()
        options["llmdist.transport"] = args.transport
        if args.auth_key:
            options["llmdist.auth_key"] = args.auth_key
        dd.init(options)
        cm = dd.cache_manager

        info = LLMClusterInfo()
        info.remote_cluster_id = decode_id
        info.append_remote_ip_info(HOST, port)
        t_link = time.perf_counter()
        status, _ = dd.link_clusters([info], LINK_MS)
        link_s = time.perf_counter() - t_link
        if status != LLMStatusCode.LLM_SUCCESS:
            raise DemoError(
                f"link_clusters to cluster {decode_id} at {HOST}:{port} returned {status.name}"
            )
        path = _path_description(dd, decode_id)

        src_mem = aligned_empty(layout.num_tensors * layout.tensor_bytes)
        src_mem.fill(0)
        src_views = list(src_mem.reshape(layout.num_tensors, layout.pool_blocks, layout.block_size))
        src_cache = cm.register_blocks_cache(
            layout.cache_desc(),
            [int(v.ctypes.data) for v in src_views],
            BlocksCacheKey(prefill_id, 0),
        )
        configs = [
            TransferWithCacheKeyConfig(
                BlocksCacheKey(decode_id, 0), range(layout.layers), range(layout.layers)
            )
        ]

        # 1. prefill, streaming each layer into the decode as soon as it is written
        sync, task, t_call, t_start, t_prefill_end, kv_first, kv_last = stream_prefill(
            cm, model, layout, src_cache, src_views, configs, src_table, dst_table, TASK_MS
        )
        status_streamed = task.synchronize(TASK_MS)
        t_done = time.perf_counter()
        results = task.get_results(TASK_MS)
        progress.append(f"the streamed transfer ended {status_streamed.name}")
        # The source pages must hold the model's K/V; the decode checks its pages against them.
        model_ok = check_model_pages(
            src_views, layout, src_table, 0, *kv_first
        ) and check_model_pages(src_views, layout, src_table, layout.layers - 1, *kv_last)
        digests = block_digests(src_views, src_table)
        t_verify = time.perf_counter()
        verdict_streamed = Verdict(**decode.call("verify", src_table, dst_table, digests))
        verify_s = time.perf_counter() - t_verify

        # 2. the same transfer with every layer ready: the cost of sending after prefill
        decode.call("reset")
        t_full = time.perf_counter()
        status_full = cm.transfer_cache_async(
            src_cache, AllReady(), configs, src_table, dst_table
        ).synchronize(TASK_MS)
        full_s = time.perf_counter() - t_full
        progress.append(f"the all-ready transfer ended {status_full.name}")
        verdict_full = Verdict(**decode.call("verify", src_table, dst_table, digests))

        unlink_status, _ = dd.unlink_clusters([info], LINK_MS, force=True)
        cm.unregister_cache(src_cache.cache_id)
        graceful = True

        tm = Timings(
            prefill_s=t_prefill_end - t_start,
            tail_s=t_done - t_prefill_end,
            last_sync_tail_s=t_done - sync.returned[-1],
            streamed_total_s=t_done - t_call,
            full_s=full_s,
            call_s=t_start - t_call,
        )
        extra = [
            (
                f"clusters   prefill {prefill_id} (this process, pid {os.getpid()}) -> decode "
                f"{decode_id} (pid {decode.pid}, listening on {HOST}:{port}); decode ready in "
                f"{fmt_t(ready_s)}, linked in {fmt_t(link_s)}"
            ),
            f"path       --transport {args.transport}: {path}",
            f"auth       {'shared key: both sides proved it, every control frame is MACed' if args.auth_key else 'no key: same-host identity from the kernel (SO_PEERCRED)'}",
            (
                f"digests    {len(src_table) * layout.num_tensors} BLAKE2b-{8 * DIGEST_BYTES} block "
                f"digests ({fmt_bytes(len(src_table) * layout.num_tensors * DIGEST_BYTES)}) sent to "
                f"the decode; it checked the streamed cache in {fmt_t(verify_s)}"
            ),
        ]
        if unlink_status != LLMStatusCode.LLM_SUCCESS:
            notes.append(f"unlink_clusters returned {unlink_status.name}")
        extra += [f"note       {n}" for n in notes]
        statuses = [status_streamed, status_full] + [r for r in results if r is not None]
        ok = print_report(
            out,
            "two-process",
            layout,
            tm,
            [verdict_streamed, verdict_full],
            model_ok,
            statuses,
            extra=extra,
            checker=" (checked by the decode)",
        )
        return 0 if ok else 1
    except (DemoError, LLMException) as exc:
        out.write(f"error: {exc}\n" + "".join(f"  ({p})\n" for p in progress) + "FAIL\n")
        return 1
    finally:
        if not graceful:  # a failure: end the child first, so that nothing waits on it
            decode.close(prefill_id, graceful=False)
        try:
            if dd is not None:
                dd.finalize()
        finally:
            decode.close(prefill_id, graceful=graceful)
