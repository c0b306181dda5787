"""Child processes of the two-process benchmarks (``python -m llmdist bench cluster`` and
bench/test_bench_cluster.py, bench/test_bench_pull_push.py).

multiprocessing's 'spawn' start method needs importable functions, so they live here. Every
child obeys ``(command, *args)`` tuples from the parent over a Pipe and answers ``("ok",
result)`` or ``("err", traceback)``; without a command for ``idle_s`` seconds, or when the
parent's end closes, it cleans up and exits. `Child` is the parent's handle on one.

- ``decode_main``: a DECODER cluster listening on 127.0.0.1 (port picked by the OS), with a
  shared key (``llmdist.auth_key``) when given, that allocates or registers blocks caches under ``BlocksCacheKey(cluster_id, model_id)``, clears and frees
  them, returns per-block digests of what they hold, and exposes a cache's memory to the peers'
  own engines: a raw Mooncake Transfer Engine (``mooncake_init``) or a NIXL agent (``nixl_init``).
- ``nixl_prefill_main``: the NIXL side of the NIXL baseline: its own source memory (the same
  pattern as the benchmark's source) and the layer-wise B2B writes into the decode's memory
  through NIXL (UCX backend).

NIXL 1.5.1's UCX backend crashes at process exit (a destructor of its bundled libnl-route runs
after the library it needs is gone: SIGSEGV in ``rtnl_tc_unregister`` from ``_dl_fini``), so
NIXL is only ever loaded in these children, which leave with ``os._exit`` once NIXL is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

DIGEST_BYTES = 16
MiB = 1 << 20
REPLY_S = 120.0
IDLE_S = 300.0  # a child with no command for this long cleans up and exits
CTX = mp.get_context("spawn")


# ------------------------------------------------------------------------------------------
# Helpers shared with the parent


def start_cluster(
    role,
    cluster_id: int,
    transport: Optional[str] = None,
    listen: Optional[str] = None,
    device_id: int = 0,
    sync_timeout: Optional[int] = None,
    auth_key: Optional[str] = None,
):
    """A benchmark cluster: cache manager on, remote-accessible mode, on llmdist.transport when
    given, listening on listen ("ip:port") when given, keyed with auth_key when given. Returns
    the LLMDataDist."""
    from llmdist import LLMConfig, LLMDataDist

    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.device_id = device_id
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = True
    if listen is not None:
        cfg.listen_ip_info = listen
    if sync_timeout is not None:
        cfg.sync_kv_timeout = sync_timeout
    opts = cfg.generate_options()
    if transport is not None:
        opts["llmdist.transport"] = transport
    if auth_key is not None:
        opts["llmdist.auth_key"] = auth_key
    dd.init(opts)
    return dd


def aligned_empty(nbytes: int, align: int = 4096):
    """An uninitialised uint8 array of nbytes whose data starts on an `align` boundary."""
    import numpy as np

    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes]


def fill_pattern(flat, start: int = 1, chunk: int = 64 * MiB) -> None:
    """Distinct 64-bit words (the source pattern of the B2B benchmarks; touches every page)."""
    import numpy as np

    words = flat.view(np.uint64)
    for lo in range(0, words.size, chunk // 8):
        hi = min(words.size, lo + chunk // 8)
        words[lo:hi] = np.arange(start + lo, start + hi, dtype=np.uint64)


def host_view(addr: int, nbytes: int):
    import numpy as np

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def block_digests(tensors, idx, threads: int = 2):
    """Per tensor ([blocks, block_size] uint8), the BLAKE2b digests of blocks idx, concatenated
    in idx order. hashlib drops the GIL on large buffers: tensors are hashed on `threads`
    threads."""
    idx = [int(i) for i in idx]

    def one(t):
        return b"".join(hashlib.blake2b(t[i], digest_size=DIGEST_BYTES).digest() for i in idx)

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(one, tensors))


def quiet_nixl() -> None:
    """NIXL_LOG_LEVEL=WARN before NIXL loads (its INFO lines, one per agent and backend, would
    interleave with the table's progress); a user's value stays."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")


def _serve(conn, obj, idle_s: float) -> None:
    """Run obj.cmd_<name>(*args) for each command until "exit", silence or a closed pipe."""
    while True:
        try:
            if not conn.poll(idle_s):
                return
            cmd, *args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", getattr(obj, "cmd_" + cmd)(*args))
        except Exception:  # noqa: BLE001 - report, keep serving
            reply = ("err", traceback.format_exc())
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        if cmd == "exit":
            return


class ChildError(Exception):
    pass


class Child:
    """A spawned child obeying (command, *args) over a Pipe; every wait is bounded."""

    def __init__(self, target, *args, name: str):
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child, *args), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.proc.pid
        self.name = name

    def recv(self, timeout: float = REPLY_S):
        try:
            ready = self.conn.poll(timeout)
            msg = self.conn.recv() if ready else None
        except (EOFError, OSError):
            self.proc.join(1)
            raise ChildError(
                f"{self.name} (pid {self.pid}) ended, exit code {self.proc.exitcode}"
            ) from None
        if msg is None:
            raise ChildError(f"{self.name} (pid {self.pid}) did not answer within {timeout} s")
        if msg[0] == "err":
            raise ChildError(f"{self.name} failed:\n{msg[1]}")
        return msg

    def call(self, *cmd, timeout: float = REPLY_S):
        try:
            self.conn.send(cmd)
        except (EOFError, OSError) as exc:
            raise ChildError(f"{self.name} (pid {self.pid}) is gone: {exc}") from None
        return self.recv(timeout)[1]

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                try:
                    self.call("exit", timeout=15)
                except ChildError:
                    pass
                self.proc.join(15)
        finally:
            if self.proc.is_alive():
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.join(10)
            self.conn.close()


# ------------------------------------------------------------------------------------------
# The decode cluster


class _Decode:
    def __init__(self, cluster_id: int, auth_key: Optional[str] = None) -> None:
        from llmdist import LLMRole, _core

        self.cluster_id = cluster_id
        self.dd = start_cluster(
            LLMRole.DECODER,
            cluster_id,
            listen="127.0.0.1:0",
            device_id=int(os.environ.get("LLMDIST_DEVICE", "0")),
            auth_key=auth_key,
        )
        self.cm = self.dd.cache_manager
        self.rt = self.dd.runtime
        self.stream = _core.Stream(self.rt)
        self.caches = {}  # model id -> (cache, owner array or None)
        self.nixl = {}  # model id -> (NIXL agent, registration) of that cache's memory
        self.nixl_loaded = False
        self.mooncake = {}  # model id -> raw Mooncake engine holding that cache's memory

    def _desc(self, num_tensors, shape, data_type, placement):
        from llmdist import CacheDesc, DataType, Placement

        return CacheDesc(
            num_tensors=num_tensors,
            shape=list(shape),
            data_type=DataType(data_type),
            placement=Placement(placement),
        )

    def _host(self, cache) -> bool:
        from llmdist import Placement

        return self.rt.is_host or cache.cache_desc.placement == Placement.HOST

    def _tensor(self, cache, t: int):
        """A host copy of tensor t, as [blocks, block] uint8."""
        n = cache.cache_desc.size
        blocks = cache.cache_desc.shape[0]
        if self._host(cache):
            return host_view(cache.tensor_addrs[t], n).reshape(blocks, -1)
        from llmdist import CacheDesc, DataType, Placement

        stage = self.cm.allocate_cache(CacheDesc(1, [n], DataType.DT_UINT8, Placement.HOST))
        try:
            self.rt.memcpy(stage.tensor_addrs[0], cache.tensor_addrs[t], n, self.stream)
            self.stream.synchronize()
            return host_view(stage.tensor_addrs[0], n).copy().reshape(blocks, -1)
        finally:
            self.cm.deallocate_cache(stage)

    def cmd_alloc(self, model_id, num_tensors, shape, data_type, placement):
        """allocate_blocks_cache (shared memory, or exported device memory, on a listening
        cluster), zeroed; returns its tensor addresses."""
        from llmdist import BlocksCacheKey

        cache = self.cm.allocate_blocks_cache(
            self._desc(num_tensors, shape, data_type, placement),
            BlocksCacheKey(self.cluster_id, model_id),
        )
        self.caches[model_id] = (cache, None)
        self.cmd_clear(model_id)
        return list(cache.tensor_addrs)

    def cmd_register(self, model_id, num_tensors, shape, data_type, placement):
        """register_blocks_cache over page-aligned numpy memory, zeroed (pre-faulted)."""
        from llmdist import BlocksCacheKey

        desc = self._desc(num_tensors, shape, data_type, placement)
        mem = aligned_empty(num_tensors * desc.size)
        mem.fill(0)
        t = mem.reshape(num_tensors, desc.size)
        cache = self.cm.register_blocks_cache(
            desc,
            [int(t[i].ctypes.data) for i in range(num_tensors)],
            BlocksCacheKey(self.cluster_id, model_id),
            remote_accessible=True,
        )
        self.caches[model_id] = (cache, mem)
        return list(cache.tensor_addrs)

    def cmd_clear(self, model_id):
        import numpy as np

        cache, _ = self.caches[model_id]
        n = cache.cache_desc.size
        if self._host(cache):
            for a in cache.tensor_addrs:
                host_view(a, n).fill(0)
            return
        from llmdist import CacheDesc, DataType, Placement

        stage = self.cm.allocate_cache(CacheDesc(1, [n], DataType.DT_UINT8, Placement.HOST))
        try:
            host_view(stage.tensor_addrs[0], n)[:] = np.zeros(n, dtype=np.uint8)
            for a in cache.tensor_addrs:
                self.rt.memcpy(a, stage.tensor_addrs[0], n, self.stream)
            self.stream.synchronize()
        finally:
            self.cm.deallocate_cache(stage)

    def cmd_digests(self, model_id, idx, tensors=None):
        cache, _ = self.caches[model_id]
        tensors = range(len(cache.tensor_addrs)) if tensors is None else tensors
        return block_digests([self._tensor(cache, t) for t in tensors], idx)

    def cmd_free(self, model_id):
        """Withdraw cache model_id (and its raw Mooncake and NIXL registrations)."""
        engine = self.mooncake.pop(model_id, None)
        agent_reg = self.nixl.pop(model_id, None)
        if agent_reg is not None:
            agent_reg[0].deregister_memory(agent_reg[1])
        cache, mem = self.caches.pop(model_id)
        if engine is not None:
            for a in cache.tensor_addrs:
                engine.unregister_memory(int(a))
        if mem is not None:
            self.cm.unregister_cache(cache.cache_id)
        else:
            self.cm.deallocate_blocks_cache(cache)

    def cmd_mooncake_init(self, model_id):
        """A raw Mooncake engine (TCP, P2P handshake) of its own, with cache model_id's tensors
        registered; returns its session id for the peer's writes."""
        from mooncake.engine import TransferEngine

        cache, _ = self.caches[model_id]
        engine = TransferEngine()
        rc = engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(f"Mooncake initialize returned {rc}")
        for a in cache.tensor_addrs:
            rc = engine.register_memory(int(a), cache.cache_desc.size)
            if rc != 0:
                raise RuntimeError(f"Mooncake register_memory returned {rc}")
        self.mooncake[model_id] = engine
        return f"127.0.0.1:{engine.get_rpc_port()}"

    def cmd_nixl_init(self, model_id):
        """A NIXL agent (UCX backend) of its own name with the memory of cache model_id
        registered (DRAM); returns the agent's metadata for the NIXL prefill."""
        self.nixl_loaded = True
        quiet_nixl()
        from nixl._api import nixl_agent, nixl_agent_config

        cache, mem = self.caches[model_id]
        agent = nixl_agent(
            f"decode-{self.cluster_id}-{model_id}", nixl_agent_config(backends=["UCX"])
        )
        n = cache.cache_desc.size
        if mem is not None:
            regions = [(int(mem.ctypes.data), int(mem.nbytes), 0, "")]
        else:
            regions = [(int(a), n, 0, "") for a in cache.tensor_addrs]
        reg = agent.register_memory(regions, "DRAM")
        self.nixl[model_id] = (agent, reg)
        return agent.get_agent_metadata()

    def cmd_ping(self):
        return os.getpid()

    def cmd_exit(self):
        return None

    def close(self) -> None:
        for model_id in list(self.caches):
            try:
                self.cmd_free(model_id)
            except Exception:  # noqa: BLE001 - finalize frees the rest
                pass
        self.stream.close()
        self.dd.finalize()


def decode_main(
    conn, cluster_id: int, idle_s: float = IDLE_S, auth_key: Optional[str] = None
) -> None:
    """Child entry point: report ("ready", port, pid), then serve commands."""
    try:
        node = _Decode(cluster_id, auth_key)
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ready", node.dd.listen_port, os.getpid()))
    try:
        _serve(conn, node, idle_s)
    finally:
        node.close()
        if node.nixl_loaded:  # see the module doc: NIXL crashes at a normal exit
            conn.close()
            os._exit(0)


# ------------------------------------------------------------------------------------------
# The NIXL prefill


class _NixlPrefill:
    def __init__(self) -> None:
        # No progress thread on the initiator: check_xfer_state progresses the transfers. With
        # NIXL's default progress thread (a polling loop) the initiator ran at about half the
        # speed here, on 2 cores. The decode (target) keeps its thread: nothing else progresses
        # its side of the connection set-up.
        quiet_nixl()
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent = nixl_agent(
            f"prefill-{os.getpid()}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        )
        self.reg = None

    def cmd_setup(
        self, decode_meta, dst_addrs, layers, tensors_per_layer, pool, block, src_idx, dst_idx
    ):
        """Source memory with the benchmark's pattern (tensor after tensor, as the bench's
        `fill` writes it), registered; prepared descriptor lists of every (tensor, block) on
        both sides; per layer the index lists of its tensors' block pairs. A later setup
        replaces the earlier one."""
        import numpy as np

        self._release()
        n_t = layers * tensors_per_layer
        self.block = block
        cache_bytes = n_t * pool * block
        self.src = aligned_empty(cache_bytes)
        fill_pattern(self.src, start=1)
        self.reg = self.agent.register_memory(
            [(int(self.src.ctypes.data), cache_bytes, 0, "")], "DRAM"
        )
        self.remote = self.agent.add_remote_agent(decode_meta)
        n = n_t * pool
        loc = np.zeros((n, 3), dtype=np.uint64)
        loc[:, 0] = self.src.ctypes.data + np.arange(n, dtype=np.uint64) * block
        loc[:, 1] = block
        rem = np.zeros((n, 3), dtype=np.uint64)
        rem[:, 0] = np.repeat(np.asarray(dst_addrs, dtype=np.uint64), pool) + np.tile(
            np.arange(pool, dtype=np.uint64) * block, n_t
        )
        rem[:, 1] = block
        self.local_h = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", loc, "DRAM")
        self.remote_h = self.agent.prep_xfer_dlist(self.remote, rem, "DRAM")
        s = np.asarray(src_idx, dtype=np.int32)
        d = np.asarray(dst_idx, dtype=np.int32)
        tensors = [range(i * tensors_per_layer, (i + 1) * tensors_per_layer) for i in range(layers)]
        self.layers = [
            (np.concatenate([t * pool + s for t in ts]), np.concatenate([t * pool + d for t in ts]))
            for ts in tensors
        ]
        self.bytes_moved = n_t * len(src_idx) * block
        return self.bytes_moved

    def _release(self) -> None:
        if self.reg is not None:
            self.agent.release_dlist_handle(self.local_h)
            self.agent.release_dlist_handle(self.remote_h)
            self.agent.deregister_memory(self.reg)
            self.agent.remove_remote_agent(self.remote)
            self.reg = None
            self.src = None

    def cmd_xfer(self, timeout_s: float = 120.0):
        """Seconds for the layer-wise B2B write: per layer one prepared WRITE of its tensors'
        block pairs (made and posted in layer order, like llmdist's per-layer queueing), then
        wait until every one is DONE."""
        t0 = time.perf_counter()
        handles = []
        try:
            for li, ri in self.layers:
                h = self.agent.make_prepped_xfer("WRITE", self.local_h, li, self.remote_h, ri)
                handles.append(h)
                if self.agent.transfer(h) == "ERR":
                    raise RuntimeError("NIXL transfer() returned ERR")
            deadline = t0 + timeout_s
            for h in handles:
                while True:
                    st = self.agent.check_xfer_state(h)
                    if st == "DONE":
                        break
                    if st == "ERR":
                        raise RuntimeError("NIXL transfer ended in ERR")
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"NIXL transfer not done after {timeout_s} s")
            return time.perf_counter() - t0
        finally:
            for h in handles:
                try:
                    self.agent.release_xfer_handle(h)
                except Exception:  # noqa: BLE001 - still in flight after an error
                    pass

    def cmd_backend_info(self):
        return {
            "plugins": list(self.agent.get_plugin_list()),
            "ucx_tls": os.environ.get("UCX_TLS", "(UCX default)"),
        }

    def cmd_exit(self):
        return None


def nixl_prefill_main(conn, idle_s: float = IDLE_S) -> None:
    """Child entry point: report ("ready", pid) or ("err", why), then serve commands; leaves
    with os._exit (see the module doc)."""
    try:
        node = _NixlPrefill()
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        conn.close()
        os._exit(0)
    conn.send(("ready", os.getpid()))
    try:
        _serve(conn, node, idle_s)
    finally:
        try:
            node._release()
        finally:
            conn.close()
            os._exit(0)
