"""Progress that shows in logs too (issue 16).

tqdm with ``disable=None`` hides its bar whenever stderr is not a terminal, which is every
batch job: a log then says nothing for the whole run. `bar` keeps the tqdm bar on a
terminal and, elsewhere, writes one plain line to stderr at most every ``interval``
seconds (default 30, env ``COALA_STREAM_PROGRESS_SECONDS``) plus one at close:

    capture: 12/16 sample (75%), 0.41 sample/s, ETA 0:00:09, 3 writers busy
    reduce 210 inputs: 1.21 GB/4.84 GB (25%), 20.4 MB/s, ETA 0:02:58

The plain object has the part of tqdm's API the pipeline uses: ``update(n)``,
``set_postfix_str(s, refresh=False)``, ``refresh()``, ``close()``, ``n``, a settable
``total`` and the context manager.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
ENV_SECONDS = "COALA_STREAM_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
_PREFIXES = ["", "k", "M", "G", "T", "P", "E"]


def _interval(interval: float | None) -> float:
    """Seconds between plain lines: the argument, else the environment, else 30 s."""
    if interval is not None:
        return interval
    try:
        return float(os.environ[ENV_SECONDS])
    except (KeyError, ValueError):
        return DEFAULT_SECONDS


def _scaled(value: float, unit: str, scale: bool, divisor: int = 1000) -> str:
    """'1.21 GB' / '12.3k sample' with unit_scale, else '12 sample' (integers stay integers)."""
    if not scale:
        text = f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"
        return f"{text} {unit}"  # no 2.57e+06: a log reader wants the plain number
    prefix = 0
    while abs(value) >= divisor - 0.5 and prefix < len(_PREFIXES) - 1:  # 999.7 shows as 1.00 k
        value, prefix = value / divisor, prefix + 1
    text = f"{value:.0f}" if prefix == 0 and float(value).is_integer() else f"{value:.3g}"
    if unit == "B":
        return f"{text} {_PREFIXES[prefix]}B"
    return f"{text}{_PREFIXES[prefix]} {unit}"


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds) + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """tqdm's used API, as rate-bounded plain lines on stderr (or silent)."""

    def __init__(self, total, desc: str, unit: str = "it", *, initial: int = 0,
                 unit_scale: bool = False, unit_divisor: int = 1000, leave: bool = True,
                 silent: bool = False, interval: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._initial, self._scale, self._divisor = initial, unit_scale, unit_divisor
        # leave=False sub-bars (one per input) say nothing at close: tqdm erases them too.
        self._leave, self._silent, self._interval = leave, silent, _interval(interval)
        self._start = self._last = time.monotonic()
        self._postfix, self._end = "", None  # _end: time of close, freezes the final rate

    def _fmt(self, value: float) -> str:
        return _scaled(value, self.unit, self._scale, self._divisor)

    def line(self, final: bool = False) -> str:
        """The status line: done/total (pct), rate, ETA (or the elapsed time when final), postfix."""
        elapsed = (self._end or time.monotonic()) - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        if self.total:
            # "12/16 sample", but "1.21 GB/4.84 GB": a scaled count carries its own prefix
            done = self._fmt(self.n) if self._scale else self._fmt(self.n).rsplit(" ", 1)[0]
            parts = [f"{done}/{self._fmt(self.total)} ({100 * self.n / self.total:.0f}%)"]
        else:
            parts = [self._fmt(self.n)]
        parts.append(f"{self._fmt(rate)}/s")
        if final:
            parts.append(f"in {_clock(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        else:
            parts.append("ETA ?")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _emit(self, final: bool = False) -> None:
        if not self._silent:
            print(self.line(final), file=sys.stderr, flush=True)
        self._last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self._interval:
            self._emit()

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        self._postfix = str(s)  # shown with the next line; refresh would break the rate bound

    def refresh(self) -> None:
        """Nothing to redraw: the next line shows the new state (keeps lines rate-bounded)."""

    def close(self) -> None:
        if self._end is None:
            self._end = time.monotonic()
            if self._leave:
                self._emit(final=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total, desc: str, unit: str = "it", *, enabled: bool = True, initial: int = 0,
        unit_scale: bool = False, tty: bool | None = None, interval: float | None = None, **kw):
    """A progress bar: tqdm on a terminal, rate-bounded plain lines otherwise, silent when
    not ``enabled``. ``tty`` overrides the stderr check (tests); other keywords (position,
    leave, unit_divisor, ...) go to tqdm, and leave / unit_divisor to the plain lines too."""
    if tty is None:
        tty = sys.stderr.isatty()
    if enabled and tty:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, **kw)
    return PlainProgress(total, desc, unit, initial=initial, unit_scale=unit_scale,
                         unit_divisor=kw.get("unit_divisor", 1000), leave=kw.get("leave", True),
                         silent=not enabled, interval=interval)


def track(iterable: Iterable[T], desc: str, unit: str = "it", *, total=None,
          enabled: bool = True, **kw) -> Iterator[T]:
    """``for x in track(xs, "spectra", "layer")``: `bar` around an iterable."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with bar(total, desc, unit, enabled=enabled, **kw) as b:
        for item in iterable:
            yield item
            b.update(1)


def note(msg: str) -> None:
    """One plain line on stderr (closing summaries); above any live tqdm bar on a terminal."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
