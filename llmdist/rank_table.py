"""Rank-table links: LLMDataDist.link / query_register_mem_status / unlink.

Every member of a comm (2 to 4 clusters) calls link(comm_name, {cluster_id: rank}, rank_table)
with the same arguments; the links made are ordinary cluster links (cluster.py), the same ones
link_clusters makes. The table is HCCL's rank-table JSON; llmdist reads from it only where each
rank runs (server_list[].device[].rank_id and the server's address), because the table carries
no llmdist port. Members find each other by a rendezvous every member can compute alone:

- host of rank r: its server's "host_ip" when present, else the server's "server_id" when that is
  an IPv4 address, else this host (127.0.0.1): server ids that are not addresses (the upstream
  samples use "1" and "2") name servers of this host.
- port of rank r: llmdist.rendezvous_port + 4 * slot + position, where slot = crc32(comm_name)
  modulo llmdist.rendezvous_slots and position is the rank's index among the comm's ranks in
  ascending order (0 to 3). Defaults: base 26100 and 100 slots, so ports 26100-26499.
- every member except the lowest listens on its port while the comm is forming; each member
  links to every member above it and accepts the members below it, retrying after 1, 2, 4 ...
  ms and then every 20 ms. A listener admits only members of the same comm name linking from a
  lower position; anything else is refused and the caller retries. A port that is busy (another comm whose name falls in the same slot, or a comm
  of the same name still forming) is retried until the comm's deadline.

The comm is PREPARING until this member is linked to every other member (a link's handshake
carries both sides' caches; a lower member's link counts from the moment it is accepted, also
when that member is done and unlinks before this member looks again), then OK; when the deadline (llm.LinkTotalTime seconds; 0 or unset:
HCCL_CONNECT_TIMEOUT or 120 s) passes first it is FAILED, the reason is logged and the links it
made are taken down. Listeners close as soon as the comm is OK or FAILED, so a name may be used
again by a later comm."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
import zlib
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple, Union

from . import auth
from ._check import check_isinstance, check_uint32, check_uint64, require
from .descs import RegisterMemStatus
from .status import LLMException, LLMStatusCode

if TYPE_CHECKING:
    from .cluster import ClusterNode
    from .frames import Hello

log = logging.getLogger(__name__)

MAX_MEMBERS = 4
MAX_NAME = 128
DEFAULT_RENDEZVOUS_PORT = 26100
DEFAULT_RENDEZVOUS_SLOTS = 100
DEFAULT_LINK_TOTAL_S = 120
RETRY_FIRST_S = 0.001  # the first retries come quickly (a member is usually about to listen),
RETRY_S = 0.02  # then every 20 ms
UNLINK_TIMEOUT_MS = 3000


class Member(NamedTuple):
    """One member of a comm and where it can be reached."""

    cluster_id: int
    rank: int
    position: int  # index among the comm's ranks in ascending order
    host: str  # IPv4 address of its server


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def parse_rank_table(rank_table: str) -> Dict[int, str]:
    """rank id -> host address, from HCCL rank-table JSON (other fields are ignored)."""
    try:
        table = json.loads(rank_table)
    except ValueError as exc:
        raise LLMException(
            f"rank_table is not JSON: {exc}", status_code=LLMStatusCode.LLM_PARAM_INVALID
        ) from None
    require(
        isinstance(table, dict) and isinstance(table.get("server_list"), list),
        'rank_table needs a "server_list" list',
    )
    hosts: Dict[int, str] = {}
    for i, server in enumerate(table["server_list"]):
        require(isinstance(server, dict), f"rank_table server_list[{i}] is not an object")
        host_ip = server.get("host_ip")
        server_id = server.get("server_id")
        if isinstance(host_ip, str) and _is_ipv4(host_ip):
            host = host_ip
        elif isinstance(server_id, str) and _is_ipv4(server_id):
            host = server_id
        else:
            host = "127.0.0.1"
        devices = server.get("device")
        require(isinstance(devices, list), f'rank_table server_list[{i}] needs a "device" list')
        for j, dev in enumerate(devices):
            where = f"rank_table server_list[{i}].device[{j}]"
            require(isinstance(dev, dict), f"{where} is not an object")
            rank = dev.get("rank_id")
            if isinstance(rank, str) and rank.isdigit() and rank.isascii():
                rank = int(rank)
            require(
                type(rank) is int and 0 <= rank < 2**32,
                f"{where}.rank_id must be a decimal rank number, got {dev.get('rank_id')!r}",
            )
            require(rank not in hosts, f"rank_table lists rank {rank} twice")
            hosts[rank] = host
    return hosts


def check_link_args(comm_name, cluster_rank_info, rank_table) -> None:
    """Types and shapes of link()'s arguments, as upstream checks them."""
    check_isinstance("comm_name", comm_name, str)
    require(
        0 < len(comm_name) < MAX_NAME,
        f"comm_name must be 1 to {MAX_NAME - 1} characters, got {len(comm_name)}",
    )
    check_isinstance("cluster_rank_info", cluster_rank_info, dict)
    for k, v in cluster_rank_info.items():
        check_isinstance("cluster_rank_info key", k, int)
        check_isinstance("cluster_rank_info value", v, int)
        check_uint64("cluster_rank_info key", k)
        check_uint32("cluster_rank_info value", v)
    check_isinstance("rank_table", rank_table, str)
    require(
        1 < len(cluster_rank_info) <= MAX_MEMBERS,
        f"cluster_rank_info must name 2 to {MAX_MEMBERS} clusters, got {len(cluster_rank_info)}",
    )
    ranks = list(cluster_rank_info.values())
    require(
        ranks == sorted(ranks) and len(set(ranks)) == len(ranks),
        f"ranks in cluster_rank_info must be distinct and in ascending order, got {ranks}",
    )


def members_of(cluster_rank_info: Dict[int, int], rank_table: str) -> List[Member]:
    hosts = parse_rank_table(rank_table)
    members = []
    for position, (cid, rank) in enumerate(sorted(cluster_rank_info.items(), key=lambda kv: kv[1])):
        require(rank in hosts, f"rank {rank} of cluster {cid} is not in rank_table")
        members.append(Member(cid, rank, position, hosts[rank]))
    return members


def _options(options: Dict[str, str]) -> Tuple[int, int, float]:
    def number(key: str, default: int, lo: int, hi: int) -> int:
        text = options.get(key)
        if text is None or text == "":
            return default
        require(
            str(text).isdigit() and lo <= int(text) <= hi,
            f"option {key} must be an integer in [{lo}, {hi}], got {text!r}",
        )
        return int(text)

    base = number("llmdist.rendezvous_port", DEFAULT_RENDEZVOUS_PORT, 1, 65535)
    slots = number("llmdist.rendezvous_slots", DEFAULT_RENDEZVOUS_SLOTS, 1, 16383)
    require(
        base + MAX_MEMBERS * slots <= 65536,
        f"llmdist.rendezvous_port {base} with {slots} slots runs past port 65535",
    )
    total = number("llm.LinkTotalTime", 0, 0, 2**32 - 1)
    if total == 0:
        env = os.environ.get("HCCL_CONNECT_TIMEOUT", "")
        total = int(env) if env.isdigit() and int(env) > 0 else DEFAULT_LINK_TOTAL_S
    return base, slots, float(total)


class Comm:
    """One rank-table comm as this member sees it."""

    def __init__(
        self,
        comm_id: int,
        name: str,
        members: List[Member],
        me: Member,
        ports: Dict[int, int],
        deadline: float,
    ) -> None:
        self.comm_id = comm_id
        self.name = name
        self.members = members
        self.me = me
        self.ports = ports  # cluster id -> rendezvous port
        self.deadline = deadline
        self.status = RegisterMemStatus.PREPARING
        self.reason = ""
        self.stop = threading.Event()
        self.wake = threading.Event()  # a member's link arrived (or stop)
        self.arrived: set = set()  # lower members whose link this member accepted
        self.thread: Optional[threading.Thread] = None
        self.listener = None
        self.lower = {m.cluster_id for m in members if m.position < me.position}
        self.higher = [m for m in members if m.position > me.position]
        self.others = {m.cluster_id for m in members if m.cluster_id != me.cluster_id}

    def admit(self, hello: "Hello") -> Optional[Tuple[int, str]]:
        """Refuse handshakes that do not belong to this comm on its rendezvous port."""
        if hello.comm != self.name:
            return (
                int(LLMStatusCode.LLM_LINK_FAILED),
                f"this rendezvous port serves comm {self.name!r}, not {hello.comm!r}",
            )
        if hello.cluster_id not in self.lower:
            return (
                int(LLMStatusCode.LLM_LINK_FAILED),
                f"cluster {hello.cluster_id} is not a lower-ranked member of comm {self.name!r}",
            )
        return None


class RankTableLinks:
    """The rank-table comms of one LLMDataDist."""

    def __init__(self, node: "ClusterNode", cluster_id: int, options: Dict[str, str]) -> None:
        self._node = node
        self._cluster_id = cluster_id
        self._base, self._slots, self._total_s = _options(options)
        self._lock = threading.Lock()
        self._comms: Dict[int, Comm] = {}
        self._next_id = 1
        node.ready_hooks.append(self._accepted)

    def _accepted(self, cluster_id: int) -> None:
        """A link from cluster_id was accepted: comms forming that wait for it count it (it
        may be unlinked again before their next look, when its member is done)."""
        with self._lock:
            comms = [
                c
                for c in self._comms.values()
                if c.status == RegisterMemStatus.PREPARING and cluster_id in c.lower
            ]
        for c in comms:
            c.arrived.add(cluster_id)
            c.wake.set()

    def port(self, name: str, position: int) -> int:
        """The rendezvous port of the member at position of comm name."""
        slot = zlib.crc32(name.encode()) % self._slots
        return self._base + MAX_MEMBERS * slot + position

    @property
    def active(self) -> bool:
        """Whether some comm is forming or formed (switch_role refuses then)."""
        with self._lock:
            comms = list(self._comms.values())
        return any(
            c.status == RegisterMemStatus.PREPARING
            or any(self._node.peer(cid) is not None for cid in c.others)
            for c in comms
        )

    def link(
        self, comm_name: str, cluster_rank_info: Dict[int, int], rank_table: str
    ) -> Union[int, LLMStatusCode]:
        """Start forming the comm and return its id at once (poll status()); returns
        LLMStatusCode.LLM_ALREADY_LINK, and starts nothing, when this cluster is already linked
        to one of the members or forms another comm with one of them."""
        check_link_args(comm_name, cluster_rank_info, rank_table)
        require(
            self._cluster_id in cluster_rank_info,
            f"cluster_rank_info does not name this cluster ({self._cluster_id})",
        )
        members = members_of(cluster_rank_info, rank_table)
        me = next(m for m in members if m.cluster_id == self._cluster_id)
        ports = {m.cluster_id: self.port(comm_name, m.position) for m in members}
        with self._lock:
            busy = {
                cid
                for c in self._comms.values()
                if c.status != RegisterMemStatus.FAILED
                for cid in c.others
            }
            for m in members:
                if m.cluster_id != me.cluster_id and (
                    self._node.peer(m.cluster_id) is not None or m.cluster_id in busy
                ):
                    log.info("link %r: cluster %d is already linked", comm_name, m.cluster_id)
                    return LLMStatusCode.LLM_ALREADY_LINK
            comm = Comm(
                self._next_id, comm_name, members, me, ports, time.monotonic() + self._total_s
            )
            self._next_id += 1
            self._comms[comm.comm_id] = comm
        comm.thread = threading.Thread(
            target=self._form, args=(comm,), name=f"llmdist-comm-{comm.comm_id}", daemon=True
        )
        comm.thread.start()
        return comm.comm_id

    def status(self, comm_id: int) -> RegisterMemStatus:
        return self._comm(comm_id).status

    def _comm(self, comm_id: int) -> Comm:
        with self._lock:
            comm = self._comms.get(comm_id)
        if comm is None:
            raise LLMException(
                f"comm {comm_id} does not exist (never linked, or unlinked)",
                status_code=LLMStatusCode.LLM_NOT_YET_LINK,
            )
        return comm

    def unlink(self, comm_id: int) -> None:
        """End the comm: stop forming it and unlink its members (a member the other side
        already unlinked counts as unlinked)."""
        comm = self._comm(comm_id)
        self._end(comm)
        with self._lock:
            self._comms.pop(comm_id, None)

    def _end(self, comm: Comm) -> None:
        comm.stop.set()
        comm.wake.set()
        if comm.thread is not None and comm.thread is not threading.current_thread():
            comm.thread.join()
        for cid in comm.others:
            code = self._node.unlink(cid, UNLINK_TIMEOUT_MS, True)
            if code not in (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_NOT_YET_LINK):
                log.warning("comm %r: unlinking cluster %d gave %s", comm.name, cid, code)

    def close(self) -> None:
        """End every comm (finalize)."""
        with self._lock:
            comms = list(self._comms.values())
            self._comms.clear()
        for comm in comms:
            comm.stop.set()
            comm.wake.set()
        for comm in comms:
            if comm.thread is not None:
                comm.thread.join()

    # -- forming a comm (its own thread)
    def _bind_host(self, comm: Comm) -> str:
        """The rendezvous listens on the table's own address of this member, nothing wider."""
        return comm.me.host

    def _form(self, comm: Comm) -> None:
        node = self._node
        pending = {m.cluster_id: m for m in comm.higher}
        listen_error = ""
        delay = RETRY_FIRST_S
        try:
            while not comm.stop.is_set():
                now = time.monotonic()
                if now >= comm.deadline:
                    break
                if comm.lower and comm.listener is None:
                    address = (self._bind_host(comm), comm.ports[comm.me.cluster_id])
                    try:
                        comm.listener = node.open_listener(
                            address, comm.admit, auth.comm_key(node.key, comm.name)
                        )
                    except OSError as exc:
                        listen_error = f"; its rendezvous port {address[1]} stayed busy ({exc})"
                for cid, m in list(pending.items()):
                    if node.peer(cid) is not None:
                        del pending[cid]
                        continue
                    left_ms = max(1, int((comm.deadline - time.monotonic()) * 1000))
                    code = node.link(
                        cid, (m.host, comm.ports[cid]), min(left_ms, 2000), comm=comm.name
                    )
                    if code == LLMStatusCode.LLM_SUCCESS or node.peer(cid) is not None:
                        del pending[cid]
                if not pending and all(
                    cid in comm.arrived or node.peer(cid) is not None for cid in comm.lower
                ):
                    comm.status = RegisterMemStatus.OK
                    log.info(
                        "comm %r (id %d): linked to clusters %s",
                        comm.name,
                        comm.comm_id,
                        sorted(comm.others),
                    )
                    return
                comm.wake.wait(delay)
                comm.wake.clear()
                delay = min(RETRY_S, delay * 2)
            if comm.stop.is_set():
                return
            missing = sorted(cid for cid in comm.others if node.peer(cid) is None)
            comm.reason = (
                f"comm {comm.name!r} (id {comm.comm_id}): clusters {missing} did not "
                f"link within {self._total_s:g} s{listen_error}"
            )
            log.warning("%s", comm.reason)
            comm.status = RegisterMemStatus.FAILED
            for cid in comm.others:
                node.unlink(cid, UNLINK_TIMEOUT_MS, True)
        except Exception as exc:  # a bug must still end the comm as FAILED
            log.exception("comm %r failed", comm.name)
            comm.reason = f"comm {comm.name!r}: {exc}"
            comm.status = RegisterMemStatus.FAILED
        finally:
            if comm.listener is not None:
                comm.listener.close()
