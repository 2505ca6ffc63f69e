"""Validation of user-facing options: every error names the option and what was expected."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable


class OptionError(ValueError):
    """An option has an unknown name or a value outside what it accepts."""


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(f"option {name!r}: got {value!r}, expected one of {', '.join(map(repr, choices))}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"option {name!r}: got {value!r}, expected True or False")
    return value


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"option {name!r}: got {value!r}, expected an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        raise OptionError(f"option {name!r}: got {value}, expected an integer in [{low}, {high if high is not None else 'inf'}]")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"option {name!r}: got {value!r}, expected a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise OptionError(
            f"option {name!r}: got {value}, expected a number in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        )
    return float(value)


def config_from_options(cls, method: str, options: dict[str, Any]):
    """Build a method's config dataclass, refusing options it does not know."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) if allowed else "none"
        raise OptionError(f"unknown option {unknown[0]!r} for method {method!r}; allowed options: {listed}")
    return cls(**options)
