"""Status codes and the exception type that the whole llmdist API reports errors with."""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Union

__all__ = ["LLMStatusCode", "LLMException", "Status"]

_BASE = 0x5010B000


class NamedIntEnum(IntEnum):
    """IntEnum whose str() is "Class.NAME" on every Python version, so messages stay readable."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __format__(self, format_spec: str) -> str:
        # f"{code}" reads like str(code); an explicit spec such as "x" formats the number.
        return str(self) if not format_spec else int.__format__(int(self), format_spec)


class LLMStatusCode(NamedIntEnum):
    """Result codes of LLM-DataDist, with the upstream numeric values so codes can be compared."""

    LLM_SUCCESS = 0
    LLM_FAILED = 0xFFFFFFFF
    LLM_WAIT_PROCESS_TIMEOUT = _BASE + 0x001
    LLM_KV_CACHE_NOT_EXIST = _BASE + 0x002
    LLM_REPEAT_REQUEST = _BASE + 0x003
    LLM_REQUEST_ALREADY_COMPLETED = _BASE + 0x004
    LLM_PARAM_INVALID = _BASE + 0x005
    LLM_ENGINE_FINALIZED = _BASE + 0x006
    LLM_NOT_YET_LINK = _BASE + 0x007
    LLM_ALREADY_LINK = _BASE + 0x008
    LLM_LINK_FAILED = _BASE + 0x009
    LLM_UNLINK_FAILED = _BASE + 0x00A
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = _BASE + 0x00B
    LLM_CLUSTER_NUM_EXCEED_LIMIT = _BASE + 0x00C
    LLM_PROCESSING_LINK = _BASE + 0x00D
    LLM_DEVICE_OUT_OF_MEMORY = _BASE + 0x00E
    LLM_PREFIX_ALREADY_EXIST = _BASE + 0x00F
    LLM_PREFIX_NOT_EXIST = _BASE + 0x010
    LLM_SEQ_LENOVERLIMIT = _BASE + 0x011
    LLM_NO_FREE_BLOCK = _BASE + 0x012
    LLM_BLOCKS_OUT_OF_MEMORY = _BASE + 0x013
    LLM_EXIST_LINK = _BASE + 0x018
    LLM_FEATURE_NOT_ENABLED = _BASE + 0x019
    LLM_TIMEOUT = _BASE + 0x01A
    LLM_LINK_BUSY = _BASE + 0x01B
    LLM_OUT_OF_MEMORY = _BASE + 0x01C
    LLM_DEVICE_MEM_ERROR = 507053
    LLM_SUSPECT_REMOTE_ERROR = 507057
    LLM_UNKNOWN_ERROR = -1


class LLMException(RuntimeError):
    """Error raised by llmdist; carries the LLMStatusCode that tells callers what went wrong."""

    def __init__(
        self, *args: Any, status_code: Union[LLMStatusCode, int] = LLMStatusCode.LLM_SUCCESS
    ) -> None:
        super().__init__(*args)
        # Keep a plain int from C code comparable and printable as a named code when it is one.
        try:
            status_code = LLMStatusCode(status_code)
        except ValueError:
            pass
        self._status_code = status_code

    @property
    def status_code(self) -> Union[LLMStatusCode, int]:
        """The status code this error stands for (read-only)."""
        return self._status_code

    def __repr__(self) -> str:
        return f"LLMException({super().__str__()!r}, status_code={self._status_code})"


class Status:
    """A status code with upstream's is_ok() test (returned by a few upstream calls)."""

    def __init__(self, status: Union[LLMStatusCode, int]) -> None:
        try:
            status = LLMStatusCode(status)
        except ValueError:
            pass
        self._status_code = status

    def is_ok(self) -> bool:
        """True for LLM_SUCCESS."""
        return self._status_code == LLMStatusCode.LLM_SUCCESS

    @property
    def status_code(self) -> Union[LLMStatusCode, int]:
        """The code (read-only)."""
        return self._status_code

    def __repr__(self) -> str:
        return f"Status({self._status_code})"
