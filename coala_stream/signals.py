"""One signal policy for every long-running stage (capture, reduce, sequential capture).

SIGINT / SIGTERM set a flag; the stage checks it at its safe points (between
batches, between fold groups), saves its state there and raises `Interrupted`
(exit code 75: schedulers requeue such a job, and the same command resumes).
Nothing is ever interrupted half-way through a write: no exception is raised
from the signal handler itself.

No signal is dropped: a signal that arrives after the stage's last safe point
(say, during the last fold group of the last input) is raised as `Interrupted`
when the stage's `StopRequests` block ends, after the stage saved its result.
An orchestrator running stages inside a longer job (a propagating capture runs
reduce once per block) therefore stops as well, instead of going on until the
scheduler's SIGKILL.

Nested blocks share the outermost one's flag: a reduce run inside a sequential
capture sees the signal the capture received, saves, and raises; the capture
lets that `Interrupted` through (its own progress record is already saved). A second signal restores the
previous handlers and re-raises itself, so a user can always force an exit
(whatever was saved stays valid). Handlers are installed only from the main
thread (signal's rule); elsewhere the block is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Iterator

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: list["StopRequests"] = []  # the blocks entered in the main thread, outermost first


class StopRequests:
    """``with StopRequests("reduce") as stop: ... stop.check("at chunk 4")``; see the module doc."""

    def __init__(self, what: str = "the run"):
        self.what = what
        self._signame: str | None = None
        self._old: dict = {}
        self._outer: StopRequests | None = None
        self._entered = False

    @property
    def signame(self) -> str | None:
        """Name of the first signal received (SIGTERM, SIGINT), None if none."""
        return self._outer.signame if self._outer is not None else self._signame

    def __bool__(self) -> bool:
        return self.signame is not None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            if _active:
                self._outer = _active[0]
            else:
                for sig in SIGNALS:
                    self._old[sig] = signal.signal(sig, self._handle)
            _active.append(self)
            self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._entered:
            _active.remove(self)
            self._restore()
        if exc_type is None and self.signame is not None:
            raise self.interrupted(f"after {self.what} saved its work")

    def check(self, where: str) -> None:
        """Raise `Interrupted` naming ``where`` if a signal arrived (call after saving state)."""
        if self.signame is not None:
            raise self.interrupted(where)

    def interrupted(self, where: str) -> Interrupted:
        return Interrupted(f"{self.what} interrupted by {self.signame} {where}; rerun the same "
                           f"command to resume")

    def _handle(self, signum, frame) -> None:
        if self._signame is not None:  # the second one: act as if we were not here
            self._restore()
            signal.raise_signal(signum)
            return
        self._signame = signal.Signals(signum).name

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside every stage's block (start-up, loading a model): raised like Ctrl-C's
    KeyboardInterrupt, so the same clean-up runs and the CLI ends in one line, exit 143."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside the block (main thread only; the CLI's whole run):
    the default would end the process with no word and no clean-up. A stage's `StopRequests`
    takes over inside its own block and puts this back when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check(what: str, where: str) -> None:
    """`StopRequests.check` for code running inside some stage's block (a helper that was not
    handed the block): raise `Interrupted` if the outermost active block got a signal."""
    if _active and _active[0].signame is not None:
        raise Interrupted(f"{what} interrupted by {_active[0].signame} {where}; rerun the same "
                          f"command to resume")


def requested() -> bool:
    """True once the outermost active block got a signal (for loops that stop at their next
    safe point and then `check`)."""
    return bool(_active) and _active[0].signame is not None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold off every Python-level signal handler for a short critical section (a store's
    commit), then deliver what arrived, in order, once it is over.

    A handler that raises (Python's default SIGINT handler does, and so do a library
    user's) would otherwise interrupt a metadata write half-way: zarr's synchronous API
    waits on a coroutine in another thread, and an exception there leaves the coroutine's
    effect unknown. Deferred, the section completes or a kill -9 stops it, which the
    store's commit protocol already survives. Signals whose disposition is the OS default
    or ignore are left as they are (no Python code runs for them). Main thread only
    (signal's rule); elsewhere a no-op, since handlers run in the main thread anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def record(signum, frame) -> None:
        caught.append(signum)

    held = {}
    try:
        # Inside the try, and each handler noted BEFORE it is swapped: a pending signal's
        # handler runs (and may raise) when any call returns, so the swap can be done with
        # its result not yet stored; whatever was swapped must still be put back.
        for sig in _DEFERRABLE:
            handler = signal.getsignal(sig)
            if callable(handler):
                held[sig] = handler
                signal.signal(sig, record)
        yield
    finally:
        _put_back(held, caught)


def _put_back(held: dict, caught: list[int]) -> None:
    """Reinstall the held handlers, then deliver the caught signals, each once, in arrival
    order (as the OS would). A handler put back can run at once (signal.signal runs pending
    handlers first) and raise: the rest are still put back and delivered, and the first
    exception comes out at the end."""
    error = None
    for sig, handler in held.items():
        # A pending handler can run (and raise) inside the call, before the swap or as it
        # returns after it: install again until a call returns (installing twice is harmless).
        while True:
            try:
                signal.signal(sig, handler)
                break
            except BaseException as exc:
                error = error or exc
    for sig in dict.fromkeys(caught):
        try:
            signal.raise_signal(sig)  # runs the handler inside the call
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


_DEFERRABLE = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))


def deferring(function):
    """Decorator: run ``function`` inside `deferred` (a store's writing methods)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with deferred():
            return function(*args, **kwargs)
    return wrapper
