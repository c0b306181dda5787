"""The figures of a benchmark run: one `Result` per measured case, each holding the llmdist
path and its same-run baselines; the JSON file (schema in docs/bench.md) and `--compare`."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

SCHEMA = "llmdist-bench/1"
SUBJECT = "llmdist"  # the name of the measured path in every result


@dataclass
class Path:
    """One way of doing the case's work: its median time over the timed rounds (seconds), every
    round's time, and the bandwidth when the case moves bytes."""

    seconds: float
    samples: List[float]
    gbps: Optional[float] = None


@dataclass
class Result:
    """One measured case. `paths` holds "llmdist" and each baseline measured in the same rounds;
    `ratios[b]` is paths[b].seconds / paths["llmdist"].seconds (above 1: llmdist is faster; for
    the contiguous copy, the share of that path's limit llmdist reaches). `skipped` names the
    baselines or paths that could not run, with the reason."""

    scenario: str
    case: str
    block_size: Optional[int]
    bytes: int
    paths: Dict[str, Path]
    ratios: Dict[str, float] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    verified: Optional[bool] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def finish(self) -> "Result":
        """Fill the ratios from the paths."""
        me = self.paths.get(SUBJECT)
        if me is not None and me.seconds > 0:
            self.ratios = {k: p.seconds / me.seconds for k, p in self.paths.items() if k != SUBJECT}
        return self


def path_of(samples: List[float], nbytes: int = 0) -> Path:
    """A Path from round times (seconds), median and bandwidth (decimal GB/s) of nbytes."""
    med = statistics.median(samples)
    return Path(med, list(samples), nbytes / med / 1e9 if nbytes and med > 0 else None)


@dataclass
class Run:
    """Everything the JSON file holds."""

    machine: dict
    runtime: dict
    versions: dict
    settings: dict
    memory: dict
    results: List[Result] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    seconds: float = 0.0

    def note(self, text: str) -> None:
        if text and text not in self.notes:
            self.notes.append(text)

    def to_json(self) -> dict:
        d = asdict(self)
        return {"schema": SCHEMA, **d}


def machine_info() -> dict:
    """Host name, CPU, memory and load (the machine may be shared: compare runs of one machine)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem_total,
        "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0],
    }


def save(run: Run, path: str) -> None:
    with open(path, "w") as f:
        json.dump(run.to_json(), f, indent=1)
        f.write("\n")


def load(path: str) -> dict:
    """A JSON file written by `save`; ValueError when it is not one."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(
            f"{path}: not an llmdist benchmark file (schema {SCHEMA!r} expected, "
            f"got {data.get('schema') if isinstance(data, dict) else type(data).__name__!r})"
        )
    return data


def _key(r: dict):
    return (r["scenario"], r["case"], r.get("block_size"))


def compare(old: dict, new: dict) -> List[dict]:
    """Per (scenario, case, block size, path) found in both files: old and new median seconds and
    the speed change new/old (above 1: faster now). Cases in only one file are listed with the
    missing side as None."""
    olds = {_key(r): r for r in old["results"]}
    news = {_key(r): r for r in new["results"]}
    rows = []
    for key in list(olds) + [k for k in news if k not in olds]:
        o, n = olds.get(key), news.get(key)
        names = list((o or n)["paths"]) + [
            p for p in (n or {}).get("paths", {}) if o is not None and p not in o["paths"]
        ]
        for name in names:
            po = o["paths"].get(name) if o else None
            pn = n["paths"].get(name) if n else None
            change = (po["seconds"] / pn["seconds"]) if po and pn and pn["seconds"] > 0 else None
            rows.append(
                {
                    "scenario": key[0],
                    "case": key[1],
                    "block_size": key[2],
                    "path": name,
                    "old_seconds": po["seconds"] if po else None,
                    "new_seconds": pn["seconds"] if pn else None,
                    "old_gbps": po.get("gbps") if po else None,
                    "new_gbps": pn.get("gbps") if pn else None,
                    "speed_change": change,
                }
            )
    return rows
