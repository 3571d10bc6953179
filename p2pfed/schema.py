"""One way to declare and check the keys of p2pfed's files: config, federation, scenario, status.

Each key is declared once, as data: its type, range, default and help text. For a file
read into a dataclass (``config.toml`` into :class:`~p2pfed.config.NodeConfig`, the
``[params]`` of a federation file into :class:`~p2pfed.federation.ProtocolParams`, the
tables of a scenario), the declaration is the dataclass field itself::

    @dataclass(frozen=True)
    class Link:
        latency_ms: float = setting(5.0, "float", low=0, help="one-way latency")

        def __post_init__(self) -> None:
            check_fields(self)          # raises FieldError(key, problem)

and a file read as a plain mapping (``status.json``) declares a :class:`Schema` of
:class:`Rule` objects. Either way the same :meth:`Rule.convert` checks a value and says
what is wrong in one phrase ("must be between 0 and 65535, got 70000"); each file kind
puts its own context in front (the file, the table, the key), so every error stays one
line naming the file, the key and what to write instead. Checks that relate several
keys (``keepalive_interval < idle_timeout``) stay with the class that owns them.

    >>> Rule("int", low=0, high=65535).convert(70000)
    Traceback (most recent call last):
    ...
    ValueError: must be between 0 and 65535, got 70000
    >>> Rule("float", low=0, low_open=True, unit="seconds").convert(0)
    Traceback (most recent call last):
    ...
    ValueError: must be a positive number of seconds, got 0
    >>> Rule("str", choices=("text", "json")).convert("xml")
    Traceback (most recent call last):
    ...
    ValueError: must be "text" or "json", got 'xml'
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FieldError",
    "Rule",
    "Schema",
    "check_fields",
    "rules_of",
    "setting",
    "unknown_keys_message",
]

Kind = Literal["int", "float", "bool", "str", "path", "strs", "ints", "table", "any"]
_META = "p2pfed.schema"


class FieldError(ValueError):
    """A value of key ``key`` is invalid; ``problem`` says how ("must be ..., got ...")."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _join_or(choices: Iterable[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _g(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Rule:
    """What one key accepts. ``convert`` returns the normalised value or raises ValueError.

    ``low``/``high`` bound numbers (``low_open``/``high_open`` exclude the bound);
    ``choices`` lists the strings a ``str`` accepts; ``optional`` lets ``None`` mean
    "unset"; ``required`` keys of a :class:`Schema` must be present; ``unit`` names what
    a number counts ("seconds"); ``why`` explains a bound in the error; ``check`` is a
    further check of the converted value that returns the value to keep (normalised) or
    raises ValueError with the problem; ``help`` documents the key in the files p2pfed writes;
    ``example`` is shown for keys unset by default. Infinity is a float's value only
    where ``high`` is ``math.inf``.
    """

    kind: Kind
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    required: bool = False
    unit: str = ""
    why: str = ""
    check: Callable[[Any], Any] | None = None
    example: Any = None

    def range_text(self) -> str:
        """The accepted range in words ("between 1 and 16", "> 0", "in (0, 1]"), or ""."""
        low = self.low
        high = None if self.high == math.inf else self.high
        if low is not None and high is not None:
            if self.kind in ("int", "ints") or not (self.low_open or self.high_open):
                if self.kind in ("int", "ints"):
                    return f"between {_g(low)} and {_g(high)}"
                return f"in [{_g(low)}, {_g(high)}]"
            if self.low_open and self.high_open:
                return f"strictly between {_g(low)} and {_g(high)}"
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_g(low)}, {_g(high)}{right}"
        if low is not None:
            if self.unit and low == 0:
                return "positive" if self.low_open else "non-negative"
            if self.kind in ("int", "ints") and not self.low_open:
                return f"at least {_g(low)}"
            return f"{'>' if self.low_open else '>='} {_g(low)}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {_g(high)}"
        return ""

    def _range_problem(self, value: Any) -> str:
        text = self.range_text()
        why = f" ({self.why})" if self.why else ""
        if self.unit:
            # "a positive number of seconds", "a non-negative number of seconds"
            if text in ("positive", "non-negative"):
                return f"must be a {text} number of {self.unit}{why}, got {value!r}"
            return f"must be {text} {self.unit}{why}, got {value!r}"
        return f"must be {text}{why}, got {value!r}"

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def convert(self, value: Any) -> Any:
        """``value`` checked and normalised (floats as float, lists as tuples, paths as Path)."""
        if value is None and self.optional:
            return None
        result = self._convert_kind(value)
        return result if self.check is None else self.check(result)

    def _convert_kind(self, value: Any) -> Any:
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"must be an integer, got {value!r}")
            if not self._in_range(value):
                raise ValueError(self._range_problem(value))
            return value
        if kind == "float":
            # TOML writes 8 and 8.0 differently; both mean the same number
            if isinstance(value, bool) or not isinstance(value, int | float):
                unit = f" of {self.unit}" if self.unit else ""
                raise ValueError(f"must be a number{unit}, got {value!r}")
            result = float(value)
            if math.isnan(result):
                finite = "" if self.high == math.inf else "finite "
                raise ValueError(f"must be a {finite}number, got {value!r}")
            # infinity is a value only where the rule's bound says so (uplink_mbit = inf)
            if math.isinf(result) and not (result > 0 and self.high == math.inf):
                if self.unit:
                    raise ValueError(self._range_problem(value))
                raise ValueError(f"must be a finite number, got {value!r}")
            if not self._in_range(result):
                raise ValueError(self._range_problem(value))
            return result
        if kind == "str":
            if not isinstance(value, str):
                if self.choices:
                    raise ValueError(f"must be {_join_or(self.choices)}, got {value!r}")
                raise ValueError(f"must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise ValueError(f"must be {_join_or(self.choices)}, got {value!r}")
            return value
        if kind == "path":
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise ValueError(f"must be a path, got {value!r}")
            return Path(value)
        if kind == "strs":
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ValueError(f"must be a list of strings, got {value!r}")
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"must be a list of strings, but contains {item!r}")
            return tuple(value)
        if kind == "ints":
            if not isinstance(value, list | tuple) or not all(
                isinstance(item, int) and not isinstance(item, bool) for item in value
            ):
                raise ValueError(f"must be a list of integers, got {value!r}")
            bad = [item for item in value if not self._in_range(item)]
            if bad:
                raise ValueError(
                    f"must be a list of integers {self.range_text()}, but contains {bad[0]!r}"
                )
            return tuple(value)
        if kind == "table":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"must be a table, got {value!r}")
            return dict(value)
        return value  # "any": the check, if any, does the work


def setting(
    default: Any = dataclasses.MISSING,
    kind: Kind = "any",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    hash: bool | None = None,
    repr: bool = True,
    rule: Rule | None = None,
    **rule_args: Any,
) -> Any:
    """A dataclass field declaring its key: default plus a :class:`Rule` (``kind``, ...).

    ``rule`` reuses the rule of a key declared elsewhere (:func:`rules_of`), so that a key
    two files share (a scenario's ``[dp] delta`` and a federation's ``dp_delta``) is
    checked the same way.
    """
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        hash=hash,
        repr=repr,
        metadata={_META: rule if rule is not None else Rule(kind, **rule_args)},
    )


def rules_of(cls: type[Any]) -> dict[str, Rule]:
    """The rules of a dataclass's fields declared with :func:`setting`, in field order."""
    return {f.name: f.metadata[_META] for f in dataclasses.fields(cls) if _META in f.metadata}


def check_fields(obj: Any) -> None:
    """Check and normalise every declared field of a (frozen) dataclass instance.

    Raises :class:`FieldError` naming the first invalid key.
    """
    for name, rule in rules_of(type(obj)).items():
        try:
            value = rule.convert(getattr(obj, name))
        except ValueError as exc:
            raise FieldError(name, str(exc)) from None
        object.__setattr__(obj, name, value)


def unknown_keys_message(unknown: Iterable[str], allowed: Iterable[str], noun: str = "key") -> str:
    """ "unknown key(s) X (did you mean Y?); allowed keys are: ..." for keys not allowed."""
    unknown = sorted(unknown)
    allowed = list(allowed)
    guesses = [m for u in unknown for m in difflib.get_close_matches(u, allowed, n=1)]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return f"unknown {noun}(s) {', '.join(unknown)}{hint}; allowed keys are: {', '.join(allowed)}"


class Schema:
    """The keys of a document read as a mapping (``status.json``), each with its rule."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rules = dict(rules)

    def keys(self) -> list[str]:
        """The declared keys, in declaration order."""
        return list(self.rules)

    def unknown(self, mapping: Mapping[str, Any]) -> list[str]:
        """The keys of ``mapping`` that are not declared, sorted."""
        return sorted(set(mapping) - set(self.rules))

    def missing(self, mapping: Mapping[str, Any]) -> list[str]:
        """The required keys absent from ``mapping``, in declaration order."""
        return [key for key, rule in self.rules.items() if rule.required and key not in mapping]

    def convert(self, key: str, value: Any) -> Any:
        """``value`` of declared ``key`` checked and normalised; :class:`FieldError` if bad."""
        try:
            return self.rules[key].convert(value)
        except ValueError as exc:
            raise FieldError(key, str(exc)) from None
