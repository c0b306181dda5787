"""Clusters in child processes, as the parent tests see them: DecodeProc runs one cluster in a
spawned process (cluster_procs.decode_main) and forwards commands to it; DCache is a cache in
such a child; Cleanup releases what one test made."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from llmdist import BlocksCacheKey, LLMClusterInfo, LLMRole, LLMStatusCode

from . import cluster_procs
from .helpers import SPAWNED

HOST = "127.0.0.1"
REPLY_S = 20.0  # bound on any reply from a child
CTX = mp.get_context("spawn")
_names = itertools.count(1)


class ChildError(Exception):
    def __init__(self, kind: str, code: Optional[int], text: str) -> None:
        super().__init__(f"{kind} (status {code}): {text}")
        self.kind = kind
        self.status_code = None if code is None else LLMStatusCode(code)


class DecodeProc:
    """A child process running one cluster (DECODER by default) that listens on 127.0.0.1."""

    def __init__(
        self,
        cluster_id: int,
        role: LLMRole = LLMRole.DECODER,
        options: Optional[Dict[str, str]] = None,
        listen: bool = True,
    ) -> None:
        self.cluster_id = cluster_id
        self.role = role
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=cluster_procs.decode_main,
            args=(child, cluster_id, int(role), options, listen),
            name=f"cluster-{cluster_id}",
            daemon=True,
        )
        self.proc.start()
        SPAWNED.add(self.proc.pid)
        child.close()
        self.port: Optional[int] = None
        self.pid: int = self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> "DecodeProc":
        msg = self.recv(timeout)
        if msg[0] != "ready":
            raise ChildError(*msg[1:])
        _, self.port, self.pid = msg
        return self

    def recv(self, timeout: float = REPLY_S):
        if not self.conn.poll(timeout):
            raise TimeoutError(
                f"cluster {self.cluster_id} (pid {self.pid}) did not answer within {timeout} s"
            )
        return self.conn.recv()

    def send(self, *cmd) -> None:
        self.conn.send(cmd)

    def result(self, timeout: float = REPLY_S):
        msg = self.recv(timeout)
        if msg[0] == "err":
            raise ChildError(*msg[1:])
        assert msg[0] == "ok", msg
        return msg[1]

    def call(self, *cmd, timeout: float = REPLY_S):
        self.send(*cmd)
        return self.result(timeout)

    def info(self, cluster_id: Optional[int] = None, port: Optional[int] = None) -> LLMClusterInfo:
        return cluster_info(
            self.cluster_id if cluster_id is None else cluster_id,
            self.port if port is None else port,
        )

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        assert not self.proc.is_alive()

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                try:
                    self.send("exit")
                    self.recv(5)
                except (OSError, EOFError, TimeoutError, BrokenPipeError):
                    pass
                self.proc.join(5)
        finally:
            if self.proc.is_alive():
                self.kill()
            self.conn.close()


def start_all(*procs: DecodeProc) -> None:
    for p in procs:
        p.wait_ready()


@dataclass
class DCache:
    """A cache in a child process, as the parent sees it."""

    proc: DecodeProc
    name: str
    cache_id: int
    addrs: List[int]
    size: int
    tensors: List[tuple]  # (buffer key, byte offset) per tensor
    initial: Dict[Hashable, np.ndarray]  # buffer bytes right after creation
    allocated: bool
    blocks: bool
    key: Optional[object]
    stride: int  # row or block size in bytes
    inode: Optional[int] = None  # its memfd, when its memory is shared

    def read(self) -> Dict[Hashable, np.ndarray]:
        return self.proc.call("read", self.name)


class Cleanup:
    """Children and child caches made by one test; released/killed at teardown."""

    def __init__(self) -> None:
        self.procs: List[DecodeProc] = []
        self.caches: List[DCache] = []

    def spawn(self, cluster_id: int, **kwargs) -> DecodeProc:
        p = DecodeProc(cluster_id, **kwargs)
        self.procs.append(p)
        return p

    def dcache(
        self,
        proc: DecodeProc,
        mem: str,
        num_tensors: int,
        shape: Sequence[int],
        blocks: bool = False,
        key=None,
        seed: int = 0,
        placement: str = "DEVICE",
        remote_accessible: Optional[bool] = None,
    ) -> DCache:
        name = f"c{next(_names)}"
        if mem == "allocated":
            r = proc.call(
                "alloc", name, num_tensors, list(shape), blocks, key, seed, "DT_FLOAT16", placement
            )
        else:
            r = proc.call(
                "register",
                name,
                num_tensors,
                list(shape),
                blocks,
                key,
                seed,
                64,
                "DT_FLOAT16",
                placement,
                remote_accessible,
            )
        k = None
        if key is not None:
            k = BlocksCacheKey(proc.cluster_id, key[1])
        dc = DCache(
            proc,
            name,
            r["cache_id"],
            r["addrs"],
            r["size"],
            r["tensors"],
            r["buffers"],
            r["allocated"],
            blocks,
            k,
            r["size"] // shape[0],
            memfd_at(proc.pid, r["addrs"][0]),
        )
        self.caches.append(dc)
        return dc

    def close(self) -> None:
        for dc in self.caches:
            if dc.proc.alive():
                try:
                    dc.proc.call("release", dc.name, timeout=15)
                except (ChildError, TimeoutError, OSError, EOFError):
                    pass
        for p in self.procs:
            p.close()


def cluster_info(cluster_id: int, port: Optional[int] = None, ip: str = HOST) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    if port is not None:
        info.append_remote_ip_info(ip, port)
    return info


def memfd_maps(pid) -> List[Tuple[int, int, int]]:
    """(start, end, inode) of each llmdist memfd mapping of process pid ("self": this one)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if "/memfd:llmdist" in line:
            parts = line.split()
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16), int(parts[4])))
    return out


def memfd_at(pid: int, addr: int) -> Optional[int]:
    """The inode of the llmdist memfd holding addr in process pid, if any."""
    return next((ino for lo, hi, ino in memfd_maps(pid) if lo <= addr < hi), None)
