"""The ``llmdist`` console command (the same as ``python -m llmdist``)."""

from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command line; returns the process exit status."""
    from .__main__ import main as run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
