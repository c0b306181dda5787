"""`--plot FILE.png`: bandwidth against block size, one panel per scenario, one line per path
(llmdist solid, baselines dashed). Needs matplotlib (`pip install 'llmdist[plot]'`)."""

from __future__ import annotations

from typing import Dict, List, Tuple

from .results import SUBJECT
from .settings import size_name
from .table import SCENARIO_TITLES

# baselines every case of a scenario measures alike: a panel with several cases draws them once
SHARED_BASELINES = ("contiguous copy", "per-block copy loop")


def series(results: List[dict]) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """scenario -> line label -> [(block size, GB/s)], from JSON results that have a block size
    and a bandwidth. A scenario with several cases labels its lines 'case: path' and draws the
    shared baselines of its first case only (they copy the same bytes in every case)."""
    out: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for r in results:
        if not r.get("block_size"):
            continue
        cases = list(
            dict.fromkeys(
                x["case"] for x in results if x["scenario"] == r["scenario"] and x["paths"]
            )
        )
        for name, p in r["paths"].items():
            if p.get("gbps") is None:
                continue
            if len(cases) > 1 and name in SHARED_BASELINES:
                if r["case"] != cases[0]:
                    continue
                label = name
            else:
                label = f"{r['case']}: {name}" if len(cases) > 1 else name
            out.setdefault(r["scenario"], {}).setdefault(label, []).append(
                (r["block_size"], p["gbps"])
            )
    return out


def plot(data: dict, path: str) -> None:
    """Write the PNG for a run's JSON dict; ImportError naming the extra without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'llmdist[plot]'") from exc
    panels = series(data["results"])
    if not panels:
        raise ValueError("--plot: no result with a block size and a bandwidth to draw")
    names = sorted({label.rsplit(": ", 1)[-1] for lines in panels.values() for label in lines})
    colors = {
        name: f"C{i % 10}" for i, name in enumerate([SUBJECT] + [x for x in names if x != SUBJECT])
    }
    styles = {}  # case -> marker, when a panel has several cases
    n = len(panels)
    cols = min(2, n)
    crowded = any(len(lines) > 8 for lines in panels.values())
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.4 * cols + (3.5 if crowded else 0), 4.2 * rows), squeeze=False
    )
    for ax, (scenario, lines) in zip(axes.flat, panels.items()):
        for label, pts in lines.items():
            pts = sorted(pts)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            case, _, name = label.rpartition(": ")
            mine = name == SUBJECT
            marker = styles.setdefault(case, "osv^D<>ph*"[len(styles) % 10]) if case else "o"
            ax.plot(
                xs,
                ys,
                marker=marker,
                color=colors[name],
                linestyle="-" if mine else "--",
                linewidth=2.2 if mine else 1.2,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xticks(ticks)
        ax.set_xticklabels([size_name(t) for t in ticks])
        ax.set_xlabel("block size")
        ax.set_ylabel("GB/s")
        ax.set_title(SCENARIO_TITLES.get(scenario, scenario).split(":")[0], fontsize=10)
        ax.grid(True, alpha=0.3)
        if len(lines) > 8:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    rt = data.get("runtime", {})
    fig.suptitle(
        f"llmdist bench: {rt.get('name', '?')} runtime on {data['machine'].get('hostname', '?')} "
        f"({data['machine'].get('cpus')} CPUs), medians",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
