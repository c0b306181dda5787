"""Argument checks shared by the API, so every entry point reports bad input the same way."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

from .status import LLMException, LLMStatusCode

_TypeSpec = Union[type, Sequence[type]]


def _type_list(types: _TypeSpec) -> Tuple[type, ...]:
    return (types,) if isinstance(types, type) else tuple(types)


def check_isinstance(name: str, value: Any, types: _TypeSpec, *, allow_none: bool = False) -> Any:
    """Raise TypeError unless value is one of types; bool passes only when bool is listed."""
    if value is None and allow_none:
        return value
    tl = _type_list(types)
    ok = isinstance(value, tl)
    if ok and isinstance(value, bool) and bool not in tl:
        ok = False  # bool is an int subclass; an int parameter must not take True/False
    if not ok:
        raise TypeError(f"{name} only support {[t.__name__ for t in tl]}, but got {type(value)}")
    return value


def _check_int(name: str, value: Any, lo: int, hi: int, kind: str) -> int:
    check_isinstance(name, value, int)
    if not lo <= value <= hi:
        raise ValueError(f"{name}'s value {value} is out of the {kind} range [{lo}, {hi}]")
    return value


def check_uint16(name: str, value: Any) -> int:
    """Check that value is an int in [0, 2**16-1] (a port number, for instance)."""
    return _check_int(name, value, 0, 2**16 - 1, "uint16")


def check_uint32(name: str, value: Any) -> int:
    """Check that value is an int in [0, 2**32-1]."""
    return _check_int(name, value, 0, 2**32 - 1, "uint32")


def check_int32(name: str, value: Any) -> int:
    """Check that value is an int in [-2**31, 2**31-1]."""
    return _check_int(name, value, -(2**31), 2**31 - 1, "int32")


def check_uint64(name: str, value: Any) -> int:
    """Check that value is an int in [0, 2**64-1] (ids, addresses, sizes)."""
    return _check_int(name, value, 0, 2**64 - 1, "uint64")


def check_int64(name: str, value: Any) -> int:
    """Check that value is an int in [-2**63, 2**63-1]."""
    return _check_int(name, value, -(2**63), 2**63 - 1, "int64")


def check_int_list(
    name: str, value: Any, check: Callable[[str, Any], Any] = check_uint64, allow_none: bool = False
) -> Optional[Tuple[int, ...]]:
    """Check a list/tuple of ints element by element and return it as a tuple (a snapshot)."""
    if value is None and allow_none:
        return None
    check_isinstance(name, value, (list, tuple))
    for i, v in enumerate(value):
        check(f"{name}[{i}]", v)
    return tuple(value)


def require(
    condition: Any, message: str, status_code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID
) -> None:
    """Raise LLMException(message, status_code) when condition is false (illegal values)."""
    if not condition:
        raise LLMException(message, status_code=status_code)


def check_layer_range(name: str, value: Any, allow_none: bool = True) -> Optional[range]:
    """Check a layer range: None (if allowed) or a range with step 1 and 0 <= start < stop."""
    if value is None and allow_none:
        return None
    check_isinstance(name, value, range)
    require(value.step == 1, f"{name} must have step 1, but got {value}")
    require(
        0 <= value.start < value.stop, f"{name} must satisfy 0 <= start < stop, but got {value}"
    )
    return value
