"""Progress that reads well where it is written: tqdm on a terminal, plain periodic lines in a log file.

A cluster job's stderr is a file: tqdm's carriage-return redraws there pile up (a 20-epoch run of 25
steps an epoch left 1,161 redraws around 21 useful lines). Off a terminal, ``progress`` prints a
plain line every ``interval`` seconds, and at each tenth of the way once a loop has run a third of
that; a loop that printed anything prints its end. Loops of a few seconds stay silent.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 30.0


class PlainProgress:
    """tqdm's small interface (iteration, set_postfix, close) as plain lines on a stream."""

    def __init__(self, iterable: Iterable[T], desc: str = "", total: int | None = None, stream=None,
                 interval: float = LOG_INTERVAL_S, clock=time.monotonic):
        self.iterable, self.desc, self.stream, self.interval, self.clock = iterable, desc, stream, interval, clock
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, done: int, started: float) -> None:
        elapsed = self.clock() - started
        where = f"{done}/{self.total} ({100 * done / self.total:.0f}%)" if self.total else f"{done}"
        rate = f", {done / elapsed:.2f} it/s" if elapsed > 0 and done else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {where}, {elapsed:.0f} s{rate}{extra}", file=self.stream or sys.stderr, flush=True)

    def __iter__(self) -> Iterator[T]:
        started = last = self.clock()
        tenth = max(1, self.total // 10) if self.total else None
        done, printed = 0, False
        for item in self.iterable:
            yield item
            done += 1
            now = self.clock()
            at_tenth = (tenth is not None and done % tenth == 0 and done != self.total
                        and now - started >= self.interval / 3)
            if now - last >= self.interval or at_tenth:
                self._line(done, started)
                last, printed = now, True
        if printed or self.clock() - started >= self.interval:
            self._line(done, started)

    def close(self) -> None:
        pass


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False,
             disable: bool = False, stream=None):
    """tqdm when the stream (stderr) is a terminal, plain periodic lines otherwise; nothing if disabled."""
    stream = stream or sys.stderr
    if disable:
        return tqdm(iterable, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, leave=leave, file=stream)
    return PlainProgress(iterable, desc=desc, total=total, stream=stream)
