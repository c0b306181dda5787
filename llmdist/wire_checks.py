"""Checks of the fields a peer sends: each returns the value when it has the expected type and
range, and raises ProtocolError otherwise (the frame, and with it the link, is refused)."""

from __future__ import annotations

from enum import Enum
from typing import Type, TypeVar

from .auth import MAX_FRAME, ProtocolError

MAX_TEXT = 4096  # the longest free text a peer may send (host, reasons, ids)

E = TypeVar("E", bound=Enum)

__all__ = ["MAX_TEXT", "ProtocolError", "check_enum", "check_int", "check_list", "check_text"]


def check_int(v: object, lo: int = 0, hi: int = 2**64 - 1) -> int:
    """An integer in [lo, hi]; true and false are not integers here."""
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"bad integer {v!r:.40}")
    return v


def check_enum(cls: Type[E], v: object) -> E:
    """A member of an int-valued enum from its value; true and false are not integers here."""
    if type(v) is not int:
        raise ProtocolError(f"bad {cls.__name__} {v!r:.40}")
    try:
        return cls(v)
    except ValueError:
        raise ProtocolError(f"bad {cls.__name__} {v!r:.40}") from None


def check_text(v: object, limit: int = MAX_TEXT) -> str:
    """A string of at most limit characters that encodes as UTF-8."""
    if type(v) is not str or len(v) > limit:
        raise ProtocolError(f"bad text {v!r:.40}")
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"text that is not UTF-8 {v!r:.40}") from None
    return v


def check_list(v: object, limit: int = MAX_FRAME) -> list:
    """A list of at most limit items."""
    if type(v) is not list or len(v) > limit:
        raise ProtocolError(f"bad list {v!r:.40}")
    return v
