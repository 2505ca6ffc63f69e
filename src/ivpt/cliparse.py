"""The command line's parser: an option given twice is never silently half-applied.

argparse keeps the last value of an option given twice (``--output a --output b``) and, for an
option that takes several values (``--set a=1 --set b=2``), the last group only. Here options that
collect values (``--set``) collect every group, and any other option given twice with different
values is refused, naming both.
"""
from __future__ import annotations

import argparse
import warnings


class StoreOnce(argparse.Action):
    """argparse's ``store``, refusing a second, different value for the same option."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given_once", None)
        if given is None:
            given = {}
            setattr(namespace, "_given_once", given)
        if option_string and self.dest in given and given[self.dest][1] != values:
            first, value = given[self.dest]
            parser.error(f"{option_string} is given twice ({first} {_shown(value)} and {option_string} "
                         f"{_shown(values)}); give it once")
        given[self.dest] = (option_string, values)
        setattr(namespace, self.dest, values)


def _shown(values) -> str:
    return " ".join(map(str, values)) if isinstance(values, list) else str(values)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose plain options refuse being given twice with different values; its
    subcommands' parsers are of this class too (argparse makes them of the parent's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, StoreOnce)
        self.register("action", "store", StoreOnce)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if hasattr(parsed, "_given_once"):
            delattr(parsed, "_given_once")
        return parsed


def one_line_warnings() -> None:
    """Warnings as one clean line each (``ivpt: warning: ...``), without the source file and line that
    Python prints by default: they say what the user's input does, not where ivpt noticed it."""
    def show(message, category, filename, lineno, file=None, line=None):
        import sys

        text = " ".join(str(message).split())
        try:
            print(f"ivpt: warning: {text}", file=file or sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed stream: nothing to say it to
            pass

    warnings.showwarning = show
