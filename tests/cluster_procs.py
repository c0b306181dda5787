"""Child-process entry points for the multi-process cluster tests (tests/test_cluster.py).

multiprocessing's 'spawn' start method needs importable functions, so they live here.  A child
runs one ``LLMDataDist`` (by default a DECODER listening on 127.0.0.1, port picked by the OS) and
obeys commands from the parent over a ``multiprocessing`` Pipe:

    parent -> child: (command, *args)
    child -> parent: ("ok", result) | ("err", exception type name, status code or None, text)
                     and, for the "*_watch" commands, a ("mid", ...) message first.

Caches are named by the parent.  For each cache the child reports its ``cache_id``, its tensor
addresses (in the child's address space), and how its bytes are laid out in named buffers
(``tensors[i] = (buffer key, byte offset)``, the reference model's convention); ``read`` returns
copies of every buffer.  Registered caches are backed by numpy arrays with ``guard`` canary bytes
before and after every tensor (outside the registered memory), so the parent can check that no
byte outside the registered tensors changes.

The child never waits for the parent without a bound: if no command comes for ``idle_s`` seconds
(or the parent's end of the pipe closes) it finalizes and exits.
"""

from __future__ import annotations

import ctypes
import os
import time
import traceback


def _host_view(addr: int, nbytes: int):
    import numpy as np

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def _key(spec, cluster_id: int):
    """A cache key from a picklable spec: ("blocks", model_id) or ("cache", req_id)."""
    from llmdist import BlocksCacheKey, CacheKey

    if spec is None:
        return None
    if spec[0] == "blocks":
        return BlocksCacheKey(cluster_id, spec[1])
    if spec[0] == "cache":
        return CacheKey(cluster_id, spec[1])
    raise ValueError(f"bad key spec {spec!r}")


class _Decode:
    """The child's state: one LLMDataDist and the caches the parent asked for."""

    def __init__(self, conn, cluster_id: int, role: int, options, listen: bool) -> None:
        import numpy as np

        from llmdist import LLMConfig, LLMDataDist, LLMRole

        self.np = np
        self.conn = conn
        self.cluster_id = cluster_id
        self.dd = LLMDataDist(LLMRole(role), cluster_id)
        cfg = LLMConfig()
        cfg.device_id = 0
        cfg.enable_cache_manager = True
        cfg.enable_remote_cache_accessible = True
        if listen:
            cfg.listen_ip_info = "127.0.0.1:0"
        opts = cfg.generate_options()
        opts.update(options or {})
        self.dd.init(opts)
        self.cm = self.dd.cache_manager
        self.caches = {}  # name -> dict(cache, buffers, tensors, allocated, key)

    # ---- caches ---------------------------------------------------------------------------
    def _desc(self, num_tensors, shape, dtype, placement):
        from llmdist import CacheDesc, DataType, Placement

        return CacheDesc(num_tensors, list(shape), DataType[dtype], Placement[placement])

    def _report(self, name: str) -> dict:
        c = self.caches[name]
        cache = c["cache"]
        return {
            "cache_id": cache.cache_id,
            "addrs": list(cache.tensor_addrs),
            "size": cache.cache_desc.size,
            "tensors": list(c["tensors"]),
            "buffers": {k: v.copy() for k, v in c["buffers"].items()},
            "allocated": c["allocated"],
        }

    def cmd_alloc(
        self,
        name,
        num_tensors,
        shape,
        blocks=False,
        key=None,
        seed=0,
        dtype="DT_FLOAT16",
        placement="DEVICE",
    ):
        """allocate_cache / allocate_blocks_cache, filled with random bytes."""
        np = self.np
        desc = self._desc(num_tensors, shape, dtype, placement)
        k = _key(key, self.cluster_id)
        if blocks:
            cache = self.cm.allocate_blocks_cache(desc, k)
        else:
            cache = self.cm.allocate_cache(desc, [k] if k is not None else [])
        rng = np.random.default_rng(seed)
        buffers, tensors = {}, []
        for i, a in enumerate(cache.tensor_addrs):
            bk = f"{self.cluster_id}:{name}.{i}"
            view = _host_view(a, desc.size)
            view[:] = rng.integers(0, 256, desc.size, dtype=np.uint8)
            buffers[bk] = view
            tensors.append((bk, 0))
        self.caches[name] = dict(
            cache=cache, buffers=buffers, tensors=tensors, allocated=True, key=k
        )
        return self._report(name)

    def cmd_register(
        self,
        name,
        num_tensors,
        shape,
        blocks=False,
        key=None,
        seed=0,
        guard=64,
        dtype="DT_FLOAT16",
        placement="DEVICE",
        remote_accessible=None,
    ):
        """register_cache / register_blocks_cache over numpy arrays with guard bytes."""
        np = self.np
        desc = self._desc(num_tensors, shape, dtype, placement)
        rng = np.random.default_rng(seed)
        buffers, tensors = {}, []
        for i in range(num_tensors):
            bk = f"{self.cluster_id}:{name}.{i}"
            buffers[bk] = rng.integers(0, 256, desc.size + 2 * guard, dtype=np.uint8)
            tensors.append((bk, guard))
        addrs = [buffers[bk][off:].ctypes.data for bk, off in tensors]
        k = _key(key, self.cluster_id)
        if blocks:
            cache = self.cm.register_blocks_cache(desc, addrs, k, remote_accessible)
        else:
            cache = self.cm.register_cache(
                desc, addrs, [k] if k is not None else [], remote_accessible
            )
        self.caches[name] = dict(
            cache=cache, buffers=buffers, tensors=tensors, allocated=False, key=k
        )
        return self._report(name)

    def cmd_register_device(
        self, name, num_tensors, shape, key=None, seed=0, offset=4096, gap=0, vmm=False
    ):
        """register_blocks_cache over device memory from the runtime's allocator (as a
        framework's tensors): one allocation, the tensors offset bytes into it, gap bytes
        apart; vmm: an allocation the fake CUDA runtime cannot export (as cuMem VMM memory).
        The whole allocation is the cache's one buffer, so every byte outside the tensors is
        checked too."""
        np = self.np
        desc = self._desc(num_tensors, shape, "DT_FLOAT16", "DEVICE")
        total = offset + num_tensors * desc.size + (num_tensors - 1) * gap + 4096
        rt = self.dd.runtime
        if vmm:
            fake = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
            ptr = ctypes.c_void_p()
            assert fake.fake_cuda_malloc_vmm(ctypes.byref(ptr), ctypes.c_size_t(total)) == 0
            base = ptr.value
        else:
            base = rt.malloc(total, True)
        bk = f"{self.cluster_id}:{name}"
        view = _host_view(base, total)
        view[:] = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8)
        tensors = [(bk, offset + i * (desc.size + gap)) for i in range(num_tensors)]
        k = _key(key, self.cluster_id)
        cache = self.cm.register_blocks_cache(desc, [base + off for _, off in tensors], k, True)
        self.caches[name] = dict(
            cache=cache,
            buffers={bk: view},
            tensors=tensors,
            allocated=False,
            key=k,
            device_alloc=base,
        )
        return self._report(name)

    def cmd_read(self, name):
        return {k: v.copy() for k, v in self.caches[name]["buffers"].items()}

    def _release(self, name):
        c = self.caches[name]
        cache = c["cache"]
        if not c["allocated"]:
            self.cm.unregister_cache(cache.cache_id)
        elif cache.is_blocks_cache:
            self.cm.deallocate_blocks_cache(cache)
        else:
            self.cm.deallocate_cache(cache)

    def cmd_release(self, name):
        """unregister_cache / deallocate_(blocks_)cache; the cache's buffers are forgotten."""
        self._release(name)
        c = self.caches.pop(name)
        if c["allocated"]:
            c["buffers"].clear()  # freed memory: never read it again
        if c.get("device_alloc"):
            c["buffers"].clear()
            self.dd.runtime.free(c["device_alloc"], True)
        return None

    def cmd_device_live(self, what):
        """fake_cuda_live / fake_acl_live(what) of the fake runtime this child loaded."""
        if os.environ.get("LLMDIST_RUNTIME") == "acl":
            return self.cmd_acl_live(what)
        fake = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
        fake.fake_cuda_live.argtypes = [ctypes.c_char_p]
        fake.fake_cuda_live.restype = ctypes.c_long
        return fake.fake_cuda_live(what.encode())

    def cmd_remove_key(self, name):
        self.cm.remove_cache_key(self.caches[name]["key"])
        return None

    def _watch(self, name, action, watch_s):
        """Run action(), then snapshot the cache's (registered) buffers, tell the parent
        ("mid", seconds the action took), wait watch_s, snapshot again and report both."""
        bufs = self.caches[name]["buffers"]
        t0 = time.monotonic()
        result = action()
        took = time.monotonic() - t0
        first = {k: v.copy() for k, v in bufs.items()}
        self.conn.send(("mid", took))
        time.sleep(watch_s)
        second = {k: v.copy() for k, v in bufs.items()}
        return {"result": result, "took": took, "first": first, "second": second}

    def cmd_unregister_watch(self, name, watch_s=0.5):
        """unregister_cache of a registered cache while the parent may be writing into it."""
        c = self.caches[name]
        assert not c["allocated"]
        out = self._watch(name, lambda: self._release(name), watch_s)
        self.caches.pop(name)
        return out

    def cmd_unlink_watch(self, name, remote_id, watch_s=0.5):
        """unlink_clusters from this side while the parent may be writing into cache name."""
        out = self._watch(name, lambda: self._unlink(remote_id), watch_s)
        return out

    # ---- pull and push ------------------------------------------------------------------
    @staticmethod
    def _any_key(spec):
        """A key naming a cache of any cluster: ("blocks", cluster, model_id),
        ("cache", cluster, req_id) or ("id", cluster, cache_id, batch_index)."""
        from llmdist import BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex

        kind, *rest = spec
        return {"blocks": BlocksCacheKey, "cache": CacheKey, "id": CacheKeyByIdAndIndex}[kind](
            *rest
        )

    def cmd_pull_blocks(self, key, name, src_blocks, dst_blocks, **kwargs):
        self.cm.pull_blocks(
            self._any_key(key), self.caches[name]["cache"], src_blocks, dst_blocks, **kwargs
        )
        return None

    def cmd_pull_cache(self, key, name, batch_index=0, size=-1, **kwargs):
        self.cm.pull_cache(
            self._any_key(key), self.caches[name]["cache"], batch_index, size, **kwargs
        )
        return None

    def cmd_push_blocks(self, key, name, src_blocks, dst_blocks, **kwargs):
        self.cm.push_blocks(
            self._any_key(key), self.caches[name]["cache"], src_blocks, dst_blocks, **kwargs
        )
        return None

    def cmd_push_cache(self, key, name, src_batch_index=0, **kwargs):
        self.cm.push_cache(
            self._any_key(key), self.caches[name]["cache"], src_batch_index, **kwargs
        )
        return None

    # ---- notifications ------------------------------------------------------------------
    def cmd_notify(self, remote_id, payload):
        self.dd.send_notification(remote_id, payload)
        return None

    def cmd_notifications(self, timeout_ms=0):
        """wait_notifications(timeout_ms) (0: get_notifications)."""
        if timeout_ms:
            return self.dd.wait_notifications(timeout_ms)
        return self.dd.get_notifications()

    def cmd_notified_read(self, name, timeout_ms):
        """Wait for a notification, then at once copy cache name's buffers: what the memory
        held when the notification arrived."""
        got = self.dd.wait_notifications(timeout_ms)
        return got, self._report(name)["buffers"]

    def cmd_register_unmapped(self, name, num_tensors, shape, blocks=False, key=None):
        """A registered cache at addresses that are not mapped in this process (reads and
        writes of another process through them fail)."""
        desc = self._desc(num_tensors, shape, "DT_FLOAT16", "DEVICE")
        addrs = [0x10000 + i * 0x100000 for i in range(num_tensors)]
        k = _key(key, self.cluster_id)
        if blocks:
            cache = self.cm.register_blocks_cache(desc, addrs, k)
        else:
            cache = self.cm.register_cache(desc, addrs, [k] if k is not None else [])
        return cache.cache_id

    # ---- links ----------------------------------------------------------------------------
    def _unlink(self, remote_id):
        from llmdist import LLMClusterInfo

        info = LLMClusterInfo()
        info.remote_cluster_id = remote_id
        code, codes = self.dd.unlink_clusters([info], 5000, force=True)
        return int(code), [int(c) for c in codes]

    def cmd_unlink(self, remote_id):
        return self._unlink(remote_id)

    def cmd_link(self, remote_id, port, timeout=5000):
        from llmdist import LLMClusterInfo

        info = LLMClusterInfo()
        info.remote_cluster_id = remote_id
        info.append_remote_ip_info("127.0.0.1", port)
        code, codes = self.dd.link_clusters([info], timeout)
        return int(code), [int(c) for c in codes]

    def cmd_linked(self, remote_id):
        """Whether this cluster still holds a link to remote_id (read-only, unlike unlink)."""
        node = self.dd._node
        return node is not None and node.peer(remote_id) is not None

    def cmd_ping(self):
        return os.getpid()

    def cmd_acl_live(self, what):
        """fake_acl_live(what) of the fake ACL runtime this child loaded (LLMDIST_ACL_LIBRARY)."""
        fake = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
        fake.fake_acl_live.argtypes = [ctypes.c_char_p]
        fake.fake_acl_live.restype = ctypes.c_long
        return fake.fake_acl_live(what.encode())

    def cmd_share(self, name):
        """How this cluster describes cache name to peers (its share), as the wire has it."""
        entry = self.cm._mem.entries[self.caches[name]["cache"].cache_id]
        from llmdist.shares import share_to_wire

        return share_to_wire(entry.share, [])

    def cmd_finalize(self):
        self.dd.finalize()
        return None

    def cmd_exit(self):
        return None


def decode_main(
    conn, cluster_id: int, role: int = 2, options=None, listen: bool = True, idle_s: float = 120.0
) -> None:
    """Child entry point: start the cluster, report ("ready", port, pid), then serve commands."""
    try:
        node = _Decode(conn, cluster_id, role, options, listen)
    except BaseException as exc:  # report start-up failures instead of dying silently
        conn.send(("err", type(exc).__name__, None, traceback.format_exc()))
        return
    conn.send(("ready", node.dd.listen_port, os.getpid()))
    try:
        while True:
            try:
                if not conn.poll(idle_s):
                    break
                cmd, *args = conn.recv()
            except (EOFError, OSError):
                break
            try:
                result = getattr(node, "cmd_" + cmd)(*args)
                reply = ("ok", result)
            except Exception as exc:
                code = getattr(exc, "status_code", None)
                reply = (
                    "err",
                    type(exc).__name__,
                    None if code is None else int(code),
                    f"{exc}\n{traceback.format_exc()}",
                )
            try:
                conn.send(reply)
            except (EOFError, OSError):
                break
            if cmd == "exit":
                break
    finally:
        node.dd.finalize()
