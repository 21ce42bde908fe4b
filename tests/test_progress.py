"""coala_stream.progress: plain rate-bounded lines when stderr is not a terminal, tqdm on one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from coala_stream import progress
from coala_stream.progress import PlainProgress, bar, note, track

SCRIPT = textwrap.dedent("""
    import time
    from coala_stream.progress import bar
    with bar(15, "job", "sample") as b:
        for i in range(15):
            time.sleep(0.05)
            b.update()
            if i == 7:
                b.set_postfix_str("half way")
""")


def test_plain_lines_in_a_log_are_bounded_and_say_enough():
    # stderr is a pipe, as in a batch job: the old tqdm(disable=None) printed nothing here
    env = {**os.environ, progress.ENV_SECONDS: "0.2"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    lines = res.stderr.strip().splitlines()
    # 0.75 s of work at most one line per 0.2 s, plus the closing line
    assert 2 <= len(lines) <= 5, lines
    assert all(line.startswith("job: ") for line in lines)
    assert all("/15 sample (" in line and "sample/s" in line for line in lines)
    assert all("ETA " in line for line in lines[:-1])
    assert lines[-1].startswith("job: 15/15 sample (100%)") and ", in 0:00:0" in lines[-1]
    assert "half way" in lines[-1]


def test_every_update_within_the_interval_prints_nothing(capsys):
    b = bar(100, "quiet", tty=False, interval=3600)
    for _ in range(100):
        b.update()
    assert capsys.readouterr().err == ""
    b.close()
    b.close()  # closing twice prints once
    assert capsys.readouterr().err.splitlines() == [b.line(final=True)]


def test_bytes_are_human_readable_and_total_can_shrink(capsys):
    with bar(4_840_000_000, "reduce", "B", unit_scale=True, unit_divisor=1000, position=0,
             tty=False, interval=0) as b:
        b.update(1_210_000_000)
        b.total -= 840_000_000  # what earlier runs did leaves the total, as reduce does
        b.refresh()
        b.update(0)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("reduce: 1.21 GB/4.84 GB (25%), ") and "B/s, ETA " in err[0]
    assert err[1].startswith("reduce: 1.21 GB/4 GB (30%)")
    assert len(err) == 3


def test_line_without_a_total_or_progress():
    b = PlainProgress(None, "scan", "file")
    assert b.line() == "scan: 0 file, 0 file/s, ETA ?"


def test_disabled_prints_nothing(capsys):
    for tty in (False, True):
        with bar(3, "off", enabled=False, tty=tty, interval=0) as b:
            b.update(3)
            b.set_postfix_str("x")
    assert capsys.readouterr().err == ""


def test_leave_false_sub_bar_has_no_closing_line(capsys):
    with bar(2, "input 3/9", leave=False, tty=False, interval=3600) as b:
        b.update(2)
    assert capsys.readouterr().err == ""


def test_tty_gives_a_tqdm_bar():
    from tqdm import tqdm

    b = bar(10, "tty", "sample", tty=True, initial=2, leave=False)
    try:
        assert isinstance(b, tqdm)
        assert (b.n, b.total) == (2, 10)
    finally:
        b.close()


def test_track_and_note(capsys):
    assert list(track(range(3), "spectra", "layer", tty=False, interval=3600)) == [0, 1, 2]
    note("solve: 3 layers in 0:00:01")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("spectra: 3/3 layer (100%)")
    assert err[1] == "solve: 3 layers in 0:00:01"
