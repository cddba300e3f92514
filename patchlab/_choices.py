"""String options as enums whose unknown values are clear errors.

Every option patchlab takes as a string (``site=``, ``direction=``, ``metric=``,
``channel=``, ...) is a `Choice` member. Calling the enum on a string that names no
member raises a ``ValueError`` that lists every valid value and suggests the
closest one, instead of Python's bare "'resid' is not a valid Site".
"""

from __future__ import annotations

import difflib
import enum
import re

__all__ = ["Choice", "check_choice"]


def _unknown(value, what: str, valid) -> ValueError:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{value!r} is not a valid {what}: choose one of {', '.join(repr(v) for v in valid)}{hint}")


def check_choice(value, what: str, valid) -> str:
    """`value` if it is one of the strings `valid`.

    Raises:
        ValueError: it is not; the message lists `valid` (what the option is: `what`).
    """
    if value not in valid:
        raise _unknown(value, what, valid)
    return value


class Choice(enum.Enum):
    """An enum of string values; ``Cls("value")`` accepts a member, its value in any case,
    or its name, and otherwise raises ``ValueError`` listing the valid values."""

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, str):
            for member in cls:
                if value.lower() in (member.value.lower(), member.name.lower()):
                    return member
        what = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # NodeKind -> "node kind"
        raise _unknown(value, what, [member.value for member in cls])
