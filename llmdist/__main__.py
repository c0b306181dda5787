"""``python -m llmdist <command>``: the same as the ``llmdist`` command (see llmdist.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m llmdist"))
