"""Progress of a conversion's stages: a tqdm bar on a terminal, log lines (INFO, with the elapsed time and an ETA)
under ``--no-progress``, so that a long calibrated conversion says how far it is either way (``-v`` shows them)."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # at most one log line per stage this often (and one at its end)


def stage(desc: str, total: int, unit: str, progress: bool, iterable=None):
    """A progress counter for one stage: ``update(n)``, ``set_postfix_str(text)``, ``close()``; iterating it walks
    ``iterable`` and counts each item."""
    if progress:
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(desc, total, unit, iterable)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class LogProgress:
    """The log-line stand-in for a tqdm bar."""

    def __init__(self, desc: str, total: int, unit: str, iterable=None, clock=time.monotonic):
        self.desc, self.total, self.unit, self.iterable, self.clock = desc, max(int(total), 0), unit, iterable, clock
        self.n = 0
        self.t0 = self.last = clock()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {_clock(elapsed)} elapsed"
        if 0 < self.n < self.total:
            text += f", about {_clock(elapsed / self.n * (self.total - self.n))} left"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= LOG_EVERY_S and self.n < self.total:
            self.last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            log.info("%s", self.line())
