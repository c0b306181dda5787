"""Rank tables and rendezvous ports for tests of LLMDataDist.link (shared by the in-process and
the multi-process tests). Tests pass llmdist.rendezvous_slots=1 and a base port whose four ports
are free right now, so that they do not meet comms of other test runs on this machine."""

from __future__ import annotations

import json
import random
import socket
from typing import Dict, Optional, Sequence


def free_rendezvous_base(count: int = 4) -> int:
    """A base port b with b .. b+count-1 free on 127.0.0.1 (checked by binding them)."""
    rnd = random.Random()
    for _ in range(1000):
        base = rnd.randrange(20000, 60000)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free rendezvous ports")


def rendezvous_options(base: int, link_total_s: Optional[int] = None) -> Dict[str, str]:
    opts = {"llmdist.rendezvous_port": str(base), "llmdist.rendezvous_slots": "1"}
    if link_total_s is not None:
        opts["llm.LinkTotalTime"] = str(link_total_s)
    return opts


def one_server_table(num_ranks: int, server_id: str = "127.0.0.1") -> str:
    """All ranks on one server (the vllm-ascend / MindIE same-server form)."""
    return json.dumps(
        {
            "version": "1.0",
            "status": "completed",
            "server_count": "1",
            "server_list": [
                {
                    "server_id": server_id,
                    "device": [
                        {"device_id": str(r), "device_ip": f"192.168.1.{r + 1}", "rank_id": str(r)}
                        for r in range(num_ranks)
                    ],
                }
            ],
        }
    )


def server_per_rank_table(server_ids: Sequence[str], super_pod: bool = False) -> str:
    """One server entry per rank (the two-server form), optionally with a super_pod_list."""
    table = {
        "version": "1.2" if super_pod else "1.0",
        "status": "completed",
        "server_count": str(len(server_ids)),
        "server_list": [
            {
                "server_id": sid,
                "device": [
                    {"device_id": "0", "device_ip": f"192.168.1.{r + 1}", "rank_id": str(r)}
                ],
            }
            for r, sid in enumerate(server_ids)
        ],
    }
    if super_pod:
        table["super_pod_list"] = [
            {"super_pod_id": "0", "server_list": [{"server_id": s} for s in server_ids]}
        ]
    return json.dumps(table)
