r"""TOML values for the files p2pfed writes (config.toml, federation.toml), rendered by tomli_w.

The files p2pfed writes carry comments that document every key for the user, which no
TOML writer produces. So the comment lines are written by hand and every value is rendered
by ``tomli_w``: escaping, floats and booleans are its job, not ours. Arrays are kept on one
line (tomli_w splits them over several) so that a commented-out example ``# key = [...]``
is a single line a user can uncomment.

    >>> print(toml_value('C:\\say "hi"'))
    "C:\\say \"hi\""
    >>> toml_value(["127.0.0.1:7447", 3, 0.5, True])
    '["127.0.0.1:7447", 3, 0.5, true]'
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import tomli_w

__all__ = ["toml_line", "toml_value"]


def toml_value(value: Any) -> str:
    """``value`` (bool, int, float, str, path, or a list/tuple of them) as one line of TOML.

    Raises :class:`TypeError` for anything else (tables included: they need a header).
    """
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, bool | int | float | str):
        raise TypeError(f"cannot write {value!r} as a TOML value")
    text = tomli_w.dumps({"v": value})
    prefix = "v = "
    assert text.startswith(prefix) and text.endswith("\n") and text.count("\n") == 1
    return text[len(prefix) : -1]


def toml_line(key: str, value: Any) -> str:
    """``key = value`` for a bare ``key`` (letters, digits, ``_`` and ``-``), no newline."""
    return f"{key} = {toml_value(value)}"
