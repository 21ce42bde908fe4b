"""One signal policy: a signal is never dropped, nested stages share it, handlers come back."""

from __future__ import annotations

import signal

import pytest

from coala_stream import signals
from coala_stream.errors import Interrupted
from coala_stream.signals import StopRequests

pytestmark = pytest.mark.usefixtures("default_sigint")


def test_a_signal_after_the_last_safe_point_is_raised_when_the_stage_ends():
    """The defect: recorded during the last group of a reduce, then dropped on exit."""
    saved = []
    with pytest.raises(Interrupted, match="reduce interrupted by SIGTERM after reduce saved"):
        with StopRequests("reduce"):
            signal.raise_signal(signal.SIGTERM)  # lands after the last check
            saved.append("result")  # the stage still finishes and saves
    assert saved == ["result"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_nested_stage_sees_the_outer_signal_and_the_orchestrator_stops():
    ran_after = []
    with pytest.raises(Interrupted):
        with StopRequests("capture"):
            with pytest.raises(Interrupted, match="reduce interrupted by SIGINT"):
                with StopRequests("reduce") as inner:
                    signal.raise_signal(signal.SIGINT)
                    assert inner and signals.requested()
            signals.check("capture", "after block 3")
            ran_after.append("block 4")  # never reached
    assert ran_after == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_signal_no_interruption():
    with StopRequests("reduce") as stop:
        stop.check("anywhere")
    assert not signals.requested()


def test_deferred_holds_python_handlers_and_delivers_after_in_order():
    seen = []
    old = {s: signal.signal(s, lambda n, f: seen.append(signal.Signals(n).name))
           for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        with signals.deferred():
            signal.raise_signal(signal.SIGUSR2)
            signal.raise_signal(signal.SIGUSR1)
            seen.append("section done")
        assert seen == ["section done", "SIGUSR2", "SIGUSR1"]
        assert all(signal.getsignal(s) is not None and signal.getsignal(s) != signal.SIG_DFL
                   for s in old)  # the handlers are back
        signal.raise_signal(signal.SIGUSR1)
        assert seen[-1] == "SIGUSR1"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_deferred_raising_handler_raises_after_the_section_and_default_dispositions_stay():
    steps = []
    with pytest.raises(KeyboardInterrupt):  # Python's default SIGINT handler raises
        with signals.deferred():
            signal.raise_signal(signal.SIGINT)
            steps.append("rest of the section")
    assert steps == ["rest of the section"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # not turned into a Python handler


def test_deferred_puts_every_handler_back_when_a_restored_one_raises_at_once(monkeypatch):
    """A signal arriving while the handlers are put back runs its own handler at once (the
    next signal.signal call runs pending handlers first): if it raises, every other handler
    is still put back, and its exception comes out."""
    real = signal.signal
    raised = []

    def raising(signum, frame):
        raised.append(signum)
        raise RuntimeError("handler ran")

    def quiet(signum, frame):
        pass

    # SIGUSR2 and SIGTERM come after SIGUSR1 in the order handlers are put back
    old = {s: real(s, h) for s, h in ((signal.SIGUSR1, raising), (signal.SIGUSR2, quiet),
                                      (signal.SIGTERM, quiet))}
    fired = []

    def signal_then_pending(sig, handler):
        out = real(sig, handler)
        if sig == signal.SIGUSR1 and not fired:  # SIGUSR1 arrives right after it is put back
            fired.append(sig)
            signal.raise_signal(signal.SIGUSR1)
        return out

    came_out = None
    try:
        with signals.deferred():
            monkeypatch.setattr(signal, "signal", signal_then_pending)
    except RuntimeError as exc:
        came_out = exc
    finally:
        monkeypatch.undo()
        after = {s: signal.getsignal(s) for s in old}
        for s, h in old.items():
            real(s, h)
    assert came_out is not None and raised == [signal.SIGUSR1]
    assert after == {signal.SIGUSR1: raising, signal.SIGUSR2: quiet, signal.SIGTERM: quiet}


def test_deferred_puts_back_a_handler_swapped_just_before_a_raising_one_ran(monkeypatch):
    """A signal pending while the handlers are swapped runs its (not yet swapped) handler
    when a call returns, before that call's result is stored: the handler swapped by that
    call must still be put back (the recorder was once left installed for SIGINT)."""
    real = signal.signal

    def raising(signum, frame):
        raise RuntimeError("handler ran")

    old = real(signal.SIGUSR1, raising)  # swapped after SIGINT: a higher number
    fired = []

    def swap_then_pending(sig, handler):
        out = real(sig, handler)
        if sig == signal.SIGINT and not fired:
            fired.append(sig)
            signal.raise_signal(signal.SIGUSR1)  # runs `raising` now, as a return would
        return out

    monkeypatch.setattr(signal, "signal", swap_then_pending)
    try:
        with pytest.raises(RuntimeError):
            with signals.deferred():
                pytest.fail("the section ran although entering it raised")
    finally:
        monkeypatch.undo()
        after = signal.getsignal(signal.SIGINT)
        real(signal.SIGINT, signal.default_int_handler)
        real(signal.SIGUSR1, old)
    assert fired and after is signal.default_int_handler
