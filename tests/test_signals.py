"""One signal policy: a signal is never dropped, nested stages share it, handlers come back."""

from __future__ import annotations

import signal

import pytest

from coala_stream import signals
from coala_stream.errors import Interrupted
from coala_stream.signals import StopRequests


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
