"""Logging: every module logs to ``logging.getLogger(__name__)`` under the ``llmdist`` logger,
which has a NullHandler (a program that configures no logging sees nothing) and the level of
``LLMDIST_LOG_LEVEL`` when set (a value that is no level is ignored with a RuntimeWarning at
import; the command line refuses it). Mooncake Transfer Engine's own log level is WARNING unless
``MC_LOG_LEVEL`` is set: its INFO lines (several per transfer) would flood a program's output."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Optional

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

package_logger = logging.getLogger("llmdist")
_cli_handler = None


def environment_level() -> Optional[int]:
    """The level LLMDIST_LOG_LEVEL names (a name or a number), None when it is unset or empty;
    ValueError naming the variable and the rule when it is neither."""
    text = os.environ.get("LLMDIST_LOG_LEVEL", "").strip()
    if not text:
        return None
    if text.upper() in LEVELS:
        return logging.getLevelName(text.upper())
    if text.isdigit():
        return int(text)
    raise ValueError(
        f"LLMDIST_LOG_LEVEL must be one of {', '.join(LEVELS)} or a number, got {text!r}"
    )


def level_from_environment() -> None:
    """The package logger's level from LLMDIST_LOG_LEVEL. A bad value must not stop a program
    from importing llmdist: it is ignored, with a RuntimeWarning naming the variable."""
    try:
        level = environment_level()
    except ValueError as exc:
        warnings.warn(f"{exc}; ignored", RuntimeWarning, stacklevel=2)
        return
    if level is not None:
        package_logger.setLevel(level)


def quiet_mooncake() -> None:
    """MC_LOG_LEVEL=WARNING for Mooncake's engine, read when it loads (a user's value stays)."""
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")


def configure_cli_logging(verbosity: int) -> None:
    """The command line's logging: llmdist's messages to stderr, WARNING and up by default, INFO
    with -v, DEBUG with -vv (LLMDIST_LOG_LEVEL, when set, wins over the default)."""
    global _cli_handler
    if _cli_handler is None:
        _cli_handler = logging.StreamHandler()
        _cli_handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
        )
        package_logger.addHandler(_cli_handler)
    if verbosity >= 2:
        package_logger.setLevel(logging.DEBUG)
    elif verbosity == 1:
        package_logger.setLevel(logging.INFO)
    elif environment_level() is None:
        package_logger.setLevel(logging.WARNING)


package_logger.addHandler(logging.NullHandler())
quiet_mooncake()
