"""``python -m llmdist <command>``: command-line entry point.

Commands are registered in ``COMMANDS`` as ``name -> (help, add_arguments, run)``; ``run(args)``
returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys


def _demo_arguments(p):
    from . import demo
    demo.add_arguments(p)


def _demo_run(args):
    from . import demo
    return demo.main(args)


def _bench_arguments(p):
    from . import bench
    bench.add_arguments(p)


def _bench_run(args):
    from . import bench
    return bench.main(args)


COMMANDS = {
    "demo": ("simulated prefill that streams its KV cache layer by layer into a decode "
             "process, which verifies every byte",
             _demo_arguments, _demo_run),
    "bench": ("the benchmark suite: llmdist against same-run baselines on the runtime "
              "LLMDIST_RUNTIME picks; a table, and optionally JSON, a plot and a comparison",
              _bench_arguments, _bench_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmdist",
        description="llmdist: layer-wise KV cache transfer with the LLM-DataDist CacheManager API.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
