"""checkpoint.py: atomic writes, the safetensors + JSON state format, the store lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from coala_stream import checkpoint
from coala_stream.checkpoint import StoreLock, atomic_write, load_state, read_lock, save_state
from coala_stream.errors import DataError, LockedError, UsageError


# -- atomic writes ------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces_without_leftovers(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # temp file removed


def test_remove_temp_files_only_removes_temporaries(tmp_path):
    (tmp_path / ".a.safetensors.tmp-xyz").write_bytes(b"partial")  # what a kill -9 leaves
    (tmp_path / "a.safetensors").write_bytes(b"keep")
    (tmp_path / "lock").write_text("{}")
    removed = checkpoint.remove_temp_files(tmp_path)
    assert [p.name for p in removed] == [".a.safetensors.tmp-xyz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "lock"]


# -- state files ----------------------------------------------------------------------------


def test_state_round_trip_keeps_bits_dtypes_and_meta(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "R": torch.randn(5, 7, generator=g, dtype=torch.float64).triu(),
        "abs_sum": torch.rand(7, generator=g, dtype=torch.float64),
        "gram": torch.randn(7, 7, generator=g),
        "view": torch.randn(7, 7, generator=g).T,  # non-contiguous input is fine
    }
    meta = {"fingerprint": "sha256:ab", "next_chunk": 3, "complete": False,
            "settings": {"dtype": "float64", "group_chunks": 2}, "seconds": 1.5}
    save_state(tmp_path / "s.safetensors", tensors, meta)
    got, got_meta = load_state(tmp_path / "s.safetensors")
    assert got_meta == meta
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)


def test_state_metadata_is_json_under_coala_key(tmp_path):
    """Other readers (store.factor, status) read the header alone: the layout is a contract."""
    from safetensors import safe_open

    save_state(tmp_path / "s.safetensors", {"R": torch.eye(2)}, {"complete": True})
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["coala"]) == {"complete": True}


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_load_state_of_garbage_is_a_data_error_naming_the_file(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="bad.safetensors"):
        load_state(bad)


def test_save_state_refuses_meta_that_is_not_json(tmp_path):
    with pytest.raises(UsageError, match="meta"):
        save_state(tmp_path / "s.safetensors", {"R": torch.eye(2)}, {"x": object()})
    assert not (tmp_path / "s.safetensors").exists()


# -- the lock ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path, pid, hostname=None, age=0.0):
    path.write_text(json.dumps({"pid": pid, "hostname": hostname or socket.gethostname(),
                                "started": time.time() - age, "token": "t0", "what": "reduce"}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    path = tmp_path / "lock"
    with StoreLock(path, what="reduce"):
        record = read_lock(path)
        assert record["pid"] == os.getpid() and record["hostname"] == socket.gethostname()
        with pytest.raises(LockedError, match=f"pid {os.getpid()} on host"):
            StoreLock(path, what="reduce").acquire()
    assert not path.exists()  # released


def test_stale_lock_of_a_dead_pid_is_taken_over_with_one_plain_notice(tmp_path, capfd):
    path = tmp_path / "lock"
    _write_lock(path, _dead_pid())
    lock = StoreLock(path).acquire()
    err = capfd.readouterr().err
    assert "no longer running" in err and "Warning" not in err and len(err.splitlines()) == 1
    assert read_lock(path)["token"] == lock.token
    lock.release()


def test_lock_of_another_host_is_stale_only_after_the_heartbeat_timeout(tmp_path, capfd):
    path = tmp_path / "lock"
    _write_lock(path, 1, hostname="elsewhere.example", age=5)
    with pytest.raises(LockedError, match="elsewhere.example"):
        StoreLock(path, stale_after=60).acquire()
    _write_lock(path, 1, hostname="elsewhere.example", age=600)
    StoreLock(path, stale_after=60).acquire().release()
    assert "no heartbeat" in capfd.readouterr().err


def test_heartbeat_refreshes_the_lock_and_notices_a_stolen_lock(tmp_path):
    path = tmp_path / "lock"
    lock = StoreLock(path, heartbeat=0.05, stale_after=10).acquire()
    try:
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(0.3)
        assert read_lock(path)["_age"] < 5  # refreshed by the heartbeat thread
        lock.check()
        _write_lock(path, os.getpid())  # someone replaced our lock file
        time.sleep(0.3)
        with pytest.raises(LockedError, match="taken over"):
            lock.check()
    finally:
        lock.release()
    assert path.exists()  # a lock that is not ours is left alone


def test_take_over_never_removes_a_fresh_lock(tmp_path):
    """Two processes judged the same stale lock; the slower must not delete the winner's lock."""
    path = tmp_path / "lock"
    _write_lock(path, _dead_pid())
    stale = read_lock(path)
    winner = StoreLock(path)
    winner.acquire()
    try:
        loser = StoreLock(path)
        assert loser._take_over(stale) is False
        assert read_lock(path)["token"] == winner.token
    finally:
        winner.release()


def test_acquire_cleans_up_locks_set_aside_by_a_killed_takeover(tmp_path):
    (tmp_path / "lock.stale-123-abcd").write_text("{}")
    with StoreLock(tmp_path / "lock"):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.bin", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_load_meta_reads_the_header_alone(tmp_path):
    save_state(tmp_path / "s.safetensors", {"R": torch.eye(3)}, {"next_chunk": 2})
    assert checkpoint.load_meta(tmp_path / "s.safetensors") == {"next_chunk": 2}
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(DataError, match="bad.safetensors"):
        checkpoint.load_meta(tmp_path / "bad.safetensors")


def test_a_damaged_state_file_names_a_fix_its_command_has(tmp_path):
    """Only reduce has --restart: the scores of the gradient pass, a pending chunk of the
    propagation and the applied factors are redone by rerunning the same command."""
    from coala_stream.reduce import result

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    for read in (load_state, checkpoint.load_meta):
        with pytest.raises(DataError) as caught:
            read(bad)
        assert "rerun the same command" in str(caught.value)
        assert "--restart" not in str(caught.value)
    with pytest.raises(DataError, match="rerun reduce with --restart"):
        result.read_meta(bad)
