"""The ``llmdist`` command (also ``python -m llmdist``): ``demo``, ``bench``, ``info``, ``--version``.

A user error (an unknown runtime, a device runtime that cannot be used, a bad option, an output
that cannot be written) is one line on stderr and exit status 2, found before any work starts;
``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import traceback
from typing import Any, Dict, List, NoReturn, Optional

from . import __version__
from .logs import configure_cli_logging, environment_level

RUNTIMES = ("auto", "host", "acl", "cuda")


class UsageError(Exception):
    """A mistake in the command line or the environment: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a parse error as one line (the usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _common(debug_default: Any) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=debug_default,
        help="runtime to use (sets LLMDIST_RUNTIME; default: LLMDIST_RUNTIME, else auto)",
    )
    p.add_argument(
        "--device",
        type=int,
        default=debug_default,
        metavar="N",
        help="device id (sets LLMDIST_DEVICE; default: LLMDIST_DEVICE, else 0)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=debug_default,
        help="log llmdist's INFO messages (-vv: DEBUG) to stderr",
    )
    p.add_argument(
        "--debug", action="store_true", default=debug_default, help="show the traceback of an error"
    )
    return p


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from . import demo

    demo.add_arguments(p)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from . import bench

    bench.add_arguments(p)


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _demo_run(args: argparse.Namespace) -> int:
    from . import demo

    return int(demo.main(args))


def _bench_run(args: argparse.Namespace) -> int:
    from . import bench

    check_bench_outputs(args)
    return int(bench.main(args))


def _info_run(args: argparse.Namespace) -> int:
    report = info_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_info(report))
    return 0


COMMANDS = {
    "demo": (
        "simulated prefill that streams its KV cache layer by layer into a decode "
        "process, which verifies every byte",
        _demo_arguments,
        _demo_run,
    ),
    "bench": (
        "the benchmark suite: llmdist against same-run baselines on the chosen runtime; "
        "a table, and optionally JSON, a plot and a comparison",
        _bench_arguments,
        _bench_run,
    ),
    "info": (
        "the runtimes llmdist can use on this machine (runtime_info()), and why each other "
        "one cannot be used",
        _info_arguments,
        _info_run,
    ),
}


def build_parser(prog: str = "llmdist") -> Parser:
    parser = Parser(
        prog=prog,
        parents=[_common(None)],
        description="llmdist: layer-wise KV cache transfer with the LLM-DataDist CacheManager API.",
    )
    parser.add_argument("--version", action="version", version=f"llmdist {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=Parser
    )
    for name, (help_text, add_args, run) in COMMANDS.items():
        # SUPPRESS: an option given before the command name is not reset after it
        p = sub.add_parser(
            name, help=help_text, description=help_text, parents=[_common(argparse.SUPPRESS)]
        )
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def _writable(path: str, option: str) -> None:
    """UsageError unless path can be written: opened for appending (and removed again when
    this check created it)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot be written: {exc.strerror}") from exc
    if not existed:
        os.unlink(path)


def check_bench_outputs(args: argparse.Namespace) -> None:
    """Every output of a bench run checked before it starts (a run takes minutes)."""
    if getattr(args, "json", None):
        _writable(args.json, "--json")
    if getattr(args, "plot", None):
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'llmdist[plot]'")
        _writable(args.plot, "--plot")


def _check_log_level() -> None:
    """LLMDIST_LOG_LEVEL must name a level here (importing llmdist only warns about it)."""
    try:
        environment_level()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _apply_environment(args: argparse.Namespace) -> None:
    """--runtime/--device into the environment (child processes inherit it), then the runtime
    itself checked: an unknown name or a device runtime that cannot be used stops here."""
    if args.runtime is not None:
        os.environ["LLMDIST_RUNTIME"] = args.runtime
    if args.device is not None:
        if args.device < 0:
            raise UsageError(f"--device must be >= 0, got {args.device}")
        os.environ["LLMDIST_DEVICE"] = str(args.device)
    choice = os.environ.get("LLMDIST_RUNTIME", "auto") or "auto"
    if choice not in RUNTIMES:
        raise UsageError(f"LLMDIST_RUNTIME must be one of {', '.join(RUNTIMES)}, got {choice!r}")
    device = os.environ.get("LLMDIST_DEVICE", "0")
    if not device.isdigit():
        raise UsageError(f"LLMDIST_DEVICE must be a device id (an integer >= 0), got {device!r}")
    if choice in ("acl", "cuda"):
        from . import runtimes
        from .status import LLMException

        try:
            runtimes.load(choice, int(device))
        except LLMException as exc:
            raise UsageError(str(exc)) from exc


def info_report() -> Dict[str, Any]:
    """runtime_info() on the chosen runtime, with the versions around it."""
    from . import runtimes
    from .bench.peers import peer_versions

    runtimes.load(None, int(os.environ.get("LLMDIST_DEVICE", "0")))
    import numpy

    return {
        "llmdist": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "numpy": numpy.__version__,
        "peers": {k: v for k, v in peer_versions().items() if k != "matplotlib"},
        **runtimes.runtime_info(),
    }


def render_info(report: Dict[str, Any]) -> str:
    lines = [
        f"llmdist {report['llmdist']} on CPython {report['python']} ({report['machine']}), "
        f"numpy {report['numpy']}",
        f"active runtime: {report['active']}",
    ]
    for name, rt in report["runtimes"].items():
        if rt["available"]:
            extra = f", device copies: {rt['device_copy']}" if rt.get("device_copy") else ""
            if rt.get("device_copy_reason"):
                extra += f" ({rt['device_copy_reason']})"
            lines.append(f"  {name:5} available: version {rt['version']}, {rt['library']}{extra}")
        else:
            lines.append(f"  {name:5} not available: {rt['reason']}")
    peers = ", ".join(
        f"{k} {v}" if v else f"{k} (not installed)" for k, v in report["peers"].items()
    )
    lines.append(f"peers: {peers}")
    return "\n".join(lines)


def _user_error(exc: BaseException) -> bool:
    """A bad command line or environment, or an LLMException saying the caller asked for what
    cannot be done here (a bad parameter, a feature or runtime that is not available)."""
    if isinstance(exc, UsageError):
        return True
    from .status import LLMException, LLMStatusCode

    return isinstance(exc, LLMException) and exc.status_code in (
        LLMStatusCode.LLM_PARAM_INVALID,
        LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
    )


def main(argv: Optional[List[str]] = None, prog: str = "llmdist") -> int:
    """Run one command line; returns the process exit status."""
    args: Optional[argparse.Namespace] = None
    raw = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(prog)
        args = parser.parse_args(raw)
        _check_log_level()
        configure_cli_logging(args.verbose or 0)
        if not getattr(args, "_run", None):
            parser.print_help(sys.stderr)
            return 2
        _apply_environment(args)
        return int(args._run(args))
    except Exception as exc:  # noqa: BLE001 - user errors become one line, others propagate
        if not _user_error(exc):
            raise
        if (args is not None and args.debug) or "--debug" in raw:
            traceback.print_exc()
        print(f"llmdist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
