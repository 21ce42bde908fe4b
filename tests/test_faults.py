"""Faults a soak of the pipeline found (issue 22): each one line, the right exit code, nothing lost.

D0 (threads of a resumed stage) and D7 (reducing an unfinished capture) are in
tests/test_reduce.py beside the other resume tests; here: capture's and compress's D0,
full disks (D1, D2), read-only locations (D3), truncated files (D4, D5), interrupts at
start-up (D6), a binary lock file (D8) and damaged applied factors (D9).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coala_stream import checkpoint
from coala_stream.capture import CaptureConfig, run_capture
from coala_stream.cli import main
from coala_stream.errors import CoalaError, LockedError, StoreError, WriteError
from coala_stream.reduce import ReduceConfig, run_reduce
from coala_stream.store import create_store, open_store

from .test_capture import text_file  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(samples=8, seq_len=32, chunk_tokens=64)
CLI = [sys.executable, "-c", "import sys; from coala_stream.cli import main; sys.exit(main())"]


def capture_cfg(model_dir, out, text_file, **kw) -> CaptureConfig:
    return CaptureConfig(out=str(out), model=str(model_dir), data=str(text_file),
                         **{**SMALL, "threads": 1, **kw})


@pytest.fixture(scope="module")
def reduced(tiny_model_dir, text_file, tmp_path_factory):
    """A finished, reduced zarr store of the tiny model."""
    out = tmp_path_factory.mktemp("faults") / "s.zarr"
    run_capture(capture_cfg(tiny_model_dir("float32"), out, text_file), progress=False)
    run_reduce(out, ReduceConfig(threads=1, device="cpu"), progress=False)
    return out


def one_line(err: str) -> str:
    """The one line a CLI run ended with (progress lines and the '--debug' hint aside); no
    traceback."""
    assert "Traceback" not in err and "Task was destroyed" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("coala-stream ")]
    assert len(lines) == 1, err
    return lines[0]


# -- D0: capture and compress resume with the thread count they started with -----------------


def test_a_resumed_capture_keeps_the_thread_counts_its_store_recorded(tiny_model_dir, text_file,
                                                                     tmp_path):
    from coala_stream.capture import capture_threads

    out = tmp_path / "s.zarr"
    run_capture(capture_cfg(tiny_model_dir("float32"), out, text_file), progress=False)
    store = open_store(out, "r+")  # as a killed capture leaves it: not complete, counts recorded
    store._update_root_attrs({"capture": {"samples_done": 4, "complete": False}})
    attrs = store.attrs["capture_settings"]
    store._update_root_attrs({"capture_settings": {**attrs, "cpu_threads": 1,
                                                   "compute_threads": 1}})
    store.close()
    notes = []
    cfg = capture_cfg(tiny_model_dir("float32"), out, text_file, threads=None)
    assert capture_threads(cfg, 2, notes.append) == (1, 1)
    cfg.threads = 2  # --threads wins, and says what it may change
    assert capture_threads(cfg, 2, notes.append) == (2, 2)
    assert any("started with 1 thread" in n for n in notes)


def test_a_resumed_compress_computes_with_the_count_its_work_directory_recorded(
        tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    from coala_stream import compress
    from coala_stream.compress import CompressConfig, run_compress

    seen = []
    monkeypatch.setattr(compress, "_steps", lambda *a: seen.append(torch.get_num_threads()) or {})
    cfg = CompressConfig(out=str(tmp_path / "m"), model=str(tiny_model_dir("float32")),
                         data=str(text_file), samples=4, seq_len=32, allocate="uniform")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_compress(cfg, progress=True)  # the first run: its count goes into compress.json
        torch.set_num_threads(2)  # the rerun after a kill, under another default count
        run_compress(cfg, progress=True)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]
    assert "resuming compress's work" in capsys.readouterr().err


# -- D1, D2: a full disk -----------------------------------------------------------------------


def test_hdf5_capture_on_a_full_disk_stops_in_one_line_and_resumes(tiny_model_dir, text_file,
                                                                  tmp_path, monkeypatch):
    """Simulated: the HDF5 writer's free-space probe reports a full disk after the first
    commit (a real full tmpfs is tools/soak.py's fault injection). HDF5 itself never sees
    ENOSPC: the writer refuses first, so the file closes cleanly and keeps its commit."""
    from coala_stream.store import hdf5_store

    out = tmp_path / "c.h5"
    calls = iter(range(10_000))
    monkeypatch.setattr(hdf5_store, "free_bytes", lambda d: 1 << 40 if next(calls) < 8 else 0)
    with pytest.raises(CoalaError, match="disk is full.*nothing committed is lost.*rerun"):
        run_capture(capture_cfg(tiny_model_dir("float32"), out, text_file, backend="hdf5"),
                    progress=False)
    with open_store(out) as s:
        assert s.attrs["capture"]["samples_done"] == 2  # the first commit (64 tokens) is kept
    monkeypatch.undo()
    s = run_capture(capture_cfg(tiny_model_dir("float32"), out, text_file, backend="hdf5"),
                    progress=False)
    assert s["status"] == "complete" and s["samples_before"] == 2


def test_reduce_on_a_full_disk_is_one_line_and_keeps_finished_results(reduced, tmp_path,
                                                                     monkeypatch, capsys):
    """Simulated: os.replace, which only checkpoint.atomic_write calls while reduce runs
    (zarr only reads), fails with ENOSPC as a full disk makes the write before it fail."""
    path = tmp_path / "s.zarr"
    shutil.copytree(reduced, path)
    shutil.rmtree(path / "reduce")
    with open_store(path) as s:
        first = s.inputs[0]
    run_reduce(path, ReduceConfig(threads=1, device="cpu", inputs=f"^{first}$"), progress=False)
    good = (path / "reduce" / f"{first}.safetensors").read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert main(["reduce", str(path), "--threads", "1", "--device", "cpu"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot write" in line and "disk is full" in line and "free some space" in line
    assert (path / "reduce" / f"{first}.safetensors").read_bytes() == good
    assert not [p for p in (path / "reduce").iterdir() if checkpoint.TEMP_MARK in p.name]


def test_atomic_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "r.safetensors"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=f"cannot write {target}: the disk is full") as info:
        checkpoint.atomic_write(target, b"new")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


# -- D3: a read-only location --------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A directory that becomes a read-only bind mount of itself (root only: skipped elsewhere)."""
    d = tmp_path / "ro"
    d.mkdir()

    def seal():
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a read-only bind mount needs root")
        for cmd in (["mount", "--bind", str(d), str(d)],
                    ["mount", "-o", "remount,bind,ro", str(d), str(d)]):
            if subprocess.run(cmd, capture_output=True).returncode:
                subprocess.run(["umount", str(d)], capture_output=True)
                pytest.skip("mount refused (no CAP_SYS_ADMIN here)")
    yield d, seal
    subprocess.run(["umount", str(d)], capture_output=True)


def test_read_only_locations_are_one_line_and_a_complete_store_needs_no_write(
        read_only, reduced, tiny_model_dir, text_file, capsys):
    d, seal = read_only
    store, other = d / "s.zarr", d / "t.zarr"
    shutil.copytree(reduced, store)
    shutil.copytree(reduced, other)
    shutil.rmtree(other / "reduce")
    seal()
    model = str(tiny_model_dir("float32"))
    cap = ["capture", model, "--data", str(text_file), "--samples", "8", "--seq-len", "32",
           "--chunk-tokens", "64", "--threads", "1"]
    assert main([*cap, "--out", str(store)]) == 0  # complete: nothing to write
    assert "already complete" in capsys.readouterr().out
    for argv in ([*cap, "--out", str(d / "new.zarr")],
                 ["reduce", str(other), "--threads", "1"],
                 ["solve", str(store), "--ratio", "0.2", "--out", str(d / "m"), "--threads", "1"]):
        assert main(argv) == 1, argv
        line = one_line(capsys.readouterr().err)
        assert "read-only" in line and str(d) in line and "writable location" in line


# -- D4, D5: truncated files ---------------------------------------------------------------------


def test_a_truncated_hdf5_store_is_called_truncated_not_locked(tmp_path):
    path = tmp_path / "c.h5"
    store = create_store(path, "hdf5", {"dtype": "float32", "chunk_tokens": 4})
    store.create_input("a", 8, ["a"])
    store.commit(1, {"a": (4, [store.write_chunk("a", 0, torch.ones(4, 8))])}, complete=True)
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="is truncated") as info:
        open_store(path)
    assert "another process" not in str(info.value) and "--overwrite" in str(info.value)


def test_a_truncated_input_zarr_json_is_one_line_in_status_and_reduce(reduced, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    shutil.copytree(reduced, path)
    shutil.rmtree(path / "reduce")
    with open_store(path) as s:
        name = s.inputs[1]
    meta = path / "inputs" / name / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    for argv in (["status", str(path)], ["reduce", str(path), "--threads", "1"]):
        assert main(argv) == 1
        line = one_line(capsys.readouterr().err)
        assert str(meta) in line and "damaged" in line and "--overwrite" in line


# -- D6: interrupts at any moment ----------------------------------------------------------------


@pytest.mark.parametrize("sig, codes", [(signal.SIGTERM, (143, 75)), (signal.SIGINT, (130, 75))])
def test_an_interrupt_during_start_up_is_one_line(tiny_model_dir, text_file, tmp_path, sig, codes,
                                                  default_sigint):
    """The signal lands while the CLI imports torch and parses (before any stage installed
    its handler) or, on a fast machine, once the capture saves (75): one line either way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(CLI + ["capture", str(tiny_model_dir("float32")), "--out",
                                   str(tmp_path / "s.zarr"), "--data", str(text_file),
                                   "--samples", "64", "--seq-len", "32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # past Python's own start-up (no code of ours can act there): the CLI installs its
    # handlers before it parses, and parsing imports torch, so wait for torch's library
    if not _torch_loaded(proc):
        time.sleep(1.5)  # no /proc: the time it takes on an idle machine
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in codes, err
    line = one_line(err)
    assert signal.Signals(sig).name in line and "rerun the same command" in line


def _torch_loaded(proc, timeout: float = 60.0) -> bool:
    """Wait until torch's library is mapped into ``proc`` (False: /proc cannot tell)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                return True
        except OSError:
            return False
        time.sleep(0.05)
    return True


def test_a_signal_while_the_interpreter_shuts_down_keeps_the_command_s_exit_code(tmp_path,
                                                                                default_sigint):
    """Python puts default handlers back while finalizing (torch makes that take seconds):
    SIGTERM/SIGINT there killed a finished command (-15/-2). An atexit sleep stands in for
    the slow shutdown; the command's own code (1: no such store) must come out."""
    code = ("import atexit, sys, time\n"
            "atexit.register(lambda: (print('EXITING', file=sys.stderr, flush=True), "
            "time.sleep(2)))\n"
            "from coala_stream.cli import main\n"
            f"sys.argv = ['coala-stream', 'status', {str(tmp_path / 'none')!r}]\n"
            "sys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        err = ""
        while "EXITING" not in err and proc.poll() is None:
            err += proc.stderr.readline()
        time.sleep(0.3)
        proc.send_signal(sig)
        err += proc.communicate(timeout=60)[1]
        assert proc.returncode == 1, (sig, err)
        assert "Traceback" not in err and "no store at" in err


# -- D8: a lock file of binary garbage -----------------------------------------------------------


def test_a_binary_garbage_reduce_lock_is_judged_like_text_garbage(reduced, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reduced, path)
    lock = path / "reduce" / checkpoint.REDUCE_LOCK
    lock.write_bytes(bytes(range(256)) * 4)
    assert checkpoint.read_lock(lock)["_age"] >= 0  # no UnicodeDecodeError
    with pytest.raises(LockedError, match="another process holds the lock"):
        run_reduce(path, ReduceConfig(threads=1, device="cpu"), progress=False)
    old = time.time() - 3600  # no heartbeat for an hour: stale, taken over
    os.utime(lock, (old, old))
    assert run_reduce(path, ReduceConfig(threads=1, device="cpu"), progress=False)["inputs"]


# -- D9: damaged applied factors in a compress work directory ------------------------------------


def test_damaged_or_deleted_applied_factors_are_found_on_resume_and_name_overwrite(
        tiny_model_dir, text_file, tmp_path, monkeypatch):
    from coala_stream.compress import CompressConfig, run_compress

    from .test_propagate import fail_reduce_of

    cfg = CompressConfig(out=str(tmp_path / "m"), model=str(tiny_model_dir("float32")),
                         data=str(text_file), samples=4, seq_len=32, refine_steps=0,
                         allocate="uniform")
    fail_reduce_of(monkeypatch, "layers.1.mlp.down_proj")  # killed in block 1: block 0 done
    with pytest.raises(RuntimeError, match="injected"):
        run_compress(cfg, progress=False)
    monkeypatch.undo()
    block0 = tmp_path / "m.work" / "prop.zarr" / "applied" / "block-00000.safetensors"
    good = block0.read_bytes()
    block0.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(StoreError, match="block-00000.*--overwrite") as info:
        run_compress(cfg, progress=False)
    assert "--restart" not in str(info.value)
    block0.unlink()  # what the old message told users to do: must not give a half-dense model
    with pytest.raises(StoreError, match="block-00000.safetensors is missing.*--overwrite"):
        run_compress(cfg, progress=False)
    assert not Path(cfg.out).exists()
    cfg.overwrite = True  # the fix the message names works
    report = run_compress(cfg, progress=False)["report"]
    assert all(not layer["kept_dense"] for layer in report["layers"])


def test_compress_killed_after_its_output_appeared_finishes_on_rerun(tiny_model_dir, text_file,
                                                                    tmp_path, monkeypatch, capsys):
    """Found by tools/soak.py: a kill between solve publishing the output (a rename) and
    compress returning left a rerun refusing "output ... already exists"."""
    from coala_stream import compress

    real = compress.run_solve

    def killed_after(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("killed after the output appeared")

    monkeypatch.setattr(compress, "run_solve", killed_after)
    out = tmp_path / "m"
    argv = ["compress", str(tiny_model_dir("float32")), "--data", str(text_file), "--samples", "4",
            "--seq-len", "32", "--refine-steps", "0", "--allocate", "uniform", "--out", str(out)]
    with pytest.raises(RuntimeError, match="killed after"):
        main(argv)
    model = (out / "model.safetensors").read_bytes()
    monkeypatch.undo()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == model
    assert not out.with_name("m.work").exists()  # the clean-up that was left is done


def test_a_finished_compress_is_not_taken_for_a_rerun_with_other_settings(tiny_model_dir,
                                                                           text_file, tmp_path,
                                                                           capsys):
    """With --keep-work the work directory's mark outlives the run: a rerun with the same
    settings finds its output complete, one with another --ratio is refused as an existing
    output (it must not be handed the first run's model)."""
    out = tmp_path / "m"
    argv = ["compress", str(tiny_model_dir("float32")), "--data", str(text_file), "--samples", "4",
            "--seq-len", "32", "--refine-steps", "0", "--allocate", "uniform", "--keep-work", "--out", str(out),
            "--threads", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main([*argv, "--ratio", "0.4"]) == 2
    assert "already exists" in capsys.readouterr().err
