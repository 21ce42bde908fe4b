"""The small edges a new user meets first (issue 16, item 6), through the CLI's ``main``:
usage errors name the flag and carry no debug hint, missing calibration text fails before
any model is read, a Hub id is told that only local models are read, and a stale reduce
lock is taken over with one plain notice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from coala_stream import models
from coala_stream.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HUB_ID = "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize("argv, flag", [
    (["solve", "{tmp}/s.zarr", "--out", "{tmp}/o", "--ratio", "1.5"], "--ratio"),
    (["solve", "{tmp}/s.zarr", "--out", "{tmp}/o", "--ratio", "0.2", "--mu", "-1"], "--mu"),
    (["solve", "{tmp}/s.zarr", "--out", "{tmp}/o", "--rank", "0"], "--rank"),
    (["solve", "{tmp}/s.zarr", "--out", "{tmp}/o", "--ratio", "0.2", "--layers", "("], "--layers"),
    (["reduce", "{tmp}/s.zarr", "--threads", "0"], "--threads"),
    (["reduce", "{tmp}/s.zarr", "--prefetch", "0"], "--prefetch"),
    (["eval", "--max-windows", "0"], "--max-windows"),
    (["eval", "--threads", "0"], "--threads"),
])
def test_usage_errors_name_the_flag_and_give_no_debug_hint(argv, flag, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"coala-stream {argv[0]}: error: ") and flag in err
    bare = flag.removeprefix("--").replace("-", "_")
    assert f" {bare}:" not in err and f" {bare.replace('_', '-')}:" not in err  # not `ratio:`
    assert "--debug" not in err and len(err.splitlines()) == 1


def test_other_errors_keep_the_debug_hint(tmp_path, capsys):
    assert main(["reduce", str(tmp_path / "missing.zarr")]) == 1
    assert "(run with --debug for the traceback)" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was read before the calibration text was checked")

    for name in ("load_config", "load_model", "load_tokenizer"):
        monkeypatch.setattr(models, name, refuse)


@pytest.mark.parametrize("command", ["capture", "eval"])
def test_missing_data_fails_before_the_model_loads(command, tiny_model_dir, tmp_path, capsys,
                                                   no_model_loading):
    missing = tmp_path / "missing.txt"
    model = str(tiny_model_dir("float32"))  # built before the capture of what main prints
    argv = [command, model, "--data", str(missing)]
    if command == "capture":
        argv += ["--out", str(tmp_path / "c.zarr")]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"coala-stream {command}: error: ") and str(missing) in err.splitlines()[0]
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("argv", [
    ["capture", HUB_ID, "--out", "c.zarr"],
    ["eval", HUB_ID],
])
def test_a_hub_id_is_told_that_only_local_models_are_read(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # HUB_ID is no relative path here
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "only local models are read" in err
    assert f"huggingface-cli download {HUB_ID} --local-dir ./SmolLM2-135M" in err
    assert "hf download" in err and "pass the directory ./SmolLM2-135M" in err


def test_stale_reduce_lock_is_taken_over_with_one_plain_notice(tiny_model_dir, tmp_path, capfd):
    from coala_stream.capture import CaptureConfig, run_capture
    from coala_stream.checkpoint import REDUCE_LOCK

    store = tmp_path / "s.zarr"
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    run_capture(CaptureConfig(out=str(store), model=str(tiny_model_dir("float32")), data=str(text),
                              samples=2, seq_len=32, device="cpu"), progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = store / "reduce" / REDUCE_LOCK
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname(),
                                "started": time.time(), "token": "t0", "what": "reduce"}))
    capfd.readouterr()
    assert main(["reduce", str(store), "--threads", "1", "--device", "cpu"]) == 0
    err = capfd.readouterr().err
    notices = [line for line in err.splitlines() if "lock" in line]
    assert len(notices) == 1, err
    assert notices[0].startswith("coala-stream: note: taking over the stale reduce lock")
    assert "Warning" not in err and "warnings.warn" not in err
    assert not lock.exists() and os.listdir(lock.parent)  # released, results written
