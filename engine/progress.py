"""Progress of long loops: a tqdm bar on a terminal, plain lines in a log.

A bar redrawn with carriage returns is one unreadable, unfinished line in a Ray job log, a CI log or a
file. When stderr is not a terminal, or ``TQDM_DISABLE`` is set, the loop prints one line every
``lines`` th of the way instead (``distill: 150/300 it, 1.9 it/s, loss=0.1234``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm


def progress(iterable: Iterable[Any] = (), *, desc: str, total: int, initial: int = 0, unit: str = "it",
             enabled: bool = True, lines: int = 20) -> tqdm | LogLines:
    """Wrap ``iterable`` (``total`` items, ``initial`` of them done before) with a bar or log lines;
    nothing at all when not ``enabled`` (a worker that is not rank 0)."""
    if enabled and on_terminal():
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, dynamic_ncols=True)
    return LogLines(iterable, desc, total, initial, unit, every=max(1, total // lines) if enabled else 0)


def on_terminal() -> bool:
    disabled = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return not disabled and sys.stderr.isatty()


class LogLines:
    """The part of tqdm's interface the engine uses: iteration and ``set_postfix``."""

    def __init__(self, iterable: Iterable[Any], desc: str, total: int, initial: int, unit: str, every: int):
        self.iterable, self.desc, self.total, self.unit, self.every = iterable, desc, total, unit, every
        self.n = self.initial = initial
        self.started = time.perf_counter()
        self.postfix: dict[str, Any] = {}

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.every and (self.n // self.every > before // self.every or self.n == self.total):
            rate = (self.n - self.initial) / max(time.perf_counter() - self.started, 1e-9)
            extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s{extra}", flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
