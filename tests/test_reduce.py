"""reduce: the streaming fold from a store, its checkpoints, resume, locking, signals, Dask.

Stores are built with the store's writer API from random (and ill-conditioned)
chunks; every R is checked against a float64 QR of the concatenated chunks, and
every interrupted run against the bits of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coala_stream.checkpoint import StoreLock, load_state, read_lock
from coala_stream.cli import main
from coala_stream.errors import CheckpointMismatch, DataError, LockedError, UsageError
from coala_stream.reduce import (TEST_DELAY_ENV, ChunkPrefetcher, ReduceConfig, group_chunks,
                                 plan_groups, run_reduce)
from coala_stream.store import create_store, open_store, to_stored
from coala_stream.store import crc32
from coala_stream.reduce import read_result
from coala_stream.status import store_status

CHUNK = 32  # rows per chunk: short against n, so groups hold several chunks
CLI = [sys.executable, "-c", "import sys; from coala_stream.cli import main; sys.exit(main())"]


def make_store(path: Path, inputs: dict[str, tuple[int, int]], *, dtype="bfloat16", tail=0,
               cond=1e2, seed=0, complete=True, nan_at=None, backend="zarr") -> dict[str, torch.Tensor]:
    """A store with inputs {name: (n, full chunks)} (+ a short last chunk of ``tail`` rows).

    Columns are scaled by logspace(0, -log10(cond)), so cond(X) is about ``cond``.
    ``nan_at=(name, chunk)`` puts a NaN into that chunk. Returns X (float64) per input:
    exactly the stored values.
    """
    tdtype = getattr(torch, dtype)
    store = create_store(path, backend, {"dtype": dtype, "chunk_tokens": CHUNK}, shard_chunks=4)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, chunks) in inputs.items():
        store.create_input(name, n, [name])
        scale = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n)
        sizes = [CHUNK] * chunks + ([tail] if tail else [])
        blocks = [(torch.randn(rows, n, generator=g) * scale).to(tdtype) for rows in sizes]
        if nan_at and nan_at[0] == name:
            blocks[nan_at[1]][5, 3] = float("nan")
        crcs = [store.write_chunk(name, i, b) for i, b in enumerate(blocks)]
        store.commit(1, {name: (sum(sizes), crcs)}, complete=complete)
        out[name] = torch.cat(blocks).double()
    store.close()
    return out


def reference_r(X: torch.Tensor) -> torch.Tensor:
    R = torch.linalg.qr(X, mode="r").R
    return R * torch.sign(torch.diagonal(R)).unsqueeze(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def factor(path, name):
    with open_store(path) as store:
        return read_result(store, name)


def cfg(**kw) -> ReduceConfig:
    return ReduceConfig(**{"threads": 1, "checkpoint_every": 0, "device": "cpu", **kw})


# -- pure pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("start, stop, g, expected", [
    (0, 7, 3, [(0, 3), (3, 6), (6, 7)]),      # last group short
    (3, 7, 3, [(3, 6), (6, 7)]),              # resume at a boundary: the same groups
    (4, 7, 3, [(4, 6), (6, 7)]),              # an extended result (not at a boundary) re-aligns
    (0, 0, 2, []),                            # empty input
    (0, 5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
])
def test_plan_groups_is_fixed_by_chunk_index(start, stop, g, expected):
    assert plan_groups(start, stop, g) == expected


@pytest.mark.parametrize("n, chunk_tokens, group_rows, g", [
    (64, 32, None, 4),    # default: at least 2 n rows
    (64, 512, None, 1),   # long chunks fold one at a time
    (64, 32, 100, 4),     # ceil(100 / 32)
    (64, 32, 1, 1),
])
def test_group_chunks(n, chunk_tokens, group_rows, g):
    assert group_chunks(n, chunk_tokens, group_rows) == g


def test_prefetcher_yields_in_order_and_raises_at_the_bad_chunk():
    def read(i):
        time.sleep(0.01 * (i % 3))  # out-of-order completion in the threads
        if i == 6:
            raise DataError("chunk 6 is corrupt")
        return torch.full((2, 2), float(i))

    with ChunkPrefetcher(read, 2, 9, depth=3, threads=3) as chunks:
        got = [(i, t[0, 0].item()) for i, t in (next(chunks) for _ in range(4))]
        assert got == [(2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]
        with pytest.raises(DataError, match="chunk 6"):
            next(chunks)


# -- correctness against float64 ---------------------------------------------------------------


@pytest.mark.parametrize("store_dtype, work, cond, group_rows, tol", [
    ("bfloat16", "float32", 1e2, None, 1e-4),    # the common case: bf16 activations, f32 R
    ("float32", "float32", 1e2, 40, 1e-4),       # groups of 2 chunks (40 rows < n)
    ("float32", "float64", 1e6, None, 1e-9),     # ill-conditioned, f64 R: still exact
    ("bfloat16", "float64", 1e3, 1, 1e-10),      # one chunk per fold
])
def test_r_equals_float64_qr_of_the_concatenated_chunks(tmp_path, store_dtype, work, cond,
                                                        group_rows, tol):
    X = make_store(tmp_path / "s.zarr", {"a": (48, 7)}, dtype=store_dtype, tail=11, cond=cond)["a"]
    summary = run_reduce(tmp_path / "s.zarr", cfg(dtype=work, group_rows=group_rows), progress=False)
    assert summary["inputs"]["a"]["action"] == "folded"
    f = factor(tmp_path / "s.zarr", "a")
    assert f.complete and f.tokens == X.shape[0] == 7 * CHUNK + 11
    assert f.R.dtype == getattr(torch, work) and f.R.shape == (48, 48)
    R = f.R.double()
    assert torch.equal(R, R.triu()) and bool((torch.diagonal(R) >= 0).all())
    assert rel(R.T @ R, X.T @ X) < tol
    assert rel(R, reference_r(X)) < tol * cond ** 0.5
    torch.testing.assert_close(f.abs_sum, X.abs().sum(0), rtol=1e-12, atol=0)
    assert f.gram is None
    meta = f.meta
    assert meta["next_chunk"] == 8 and meta["dtype"] == work and meta["device"] == "cpu"
    assert meta["fingerprint"] == open_store(tmp_path / "s.zarr").fingerprint("a")


def test_hdf5_store_reduces_into_its_reduce_dir(tmp_path):
    path = tmp_path / "s.h5"
    X = make_store(path, {"a": (32, 5)}, tail=3, backend="hdf5")["a"]
    s = run_reduce(path, cfg(read_threads=2), progress=False)
    assert s["reduce_dir"] == str(tmp_path / "s.h5.reduce")
    f = factor(path, "a")
    assert f.complete and rel(f.R.double().T @ f.R.double(), X.T @ X) < 1e-5


def test_with_gram_accumulates_the_float32_gram(tmp_path):
    X = make_store(tmp_path / "s.zarr", {"a": (32, 5)})["a"]
    run_reduce(tmp_path / "s.zarr", cfg(with_gram=True), progress=False)
    f = factor(tmp_path / "s.zarr", "a")
    assert f.gram.dtype == torch.float32
    assert rel(f.gram.double(), X.T @ X) < 1e-5


def test_short_input_gives_trapezoidal_r_and_empty_input_a_0_by_n_r(tmp_path):
    path = tmp_path / "s.zarr"
    X = make_store(path, {"short": (48, 1)}, tail=5)["short"]  # 37 rows < n = 48
    store = open_store(path, "r+")
    store.create_input("empty", 16, ["empty"])
    store.close()
    run_reduce(path, cfg(), progress=False)
    f = factor(path, "short")
    assert f.R.shape == (37, 48) and rel(f.R.double().T @ f.R.double(), X.T @ X) < 1e-5
    e = factor(path, "empty")
    assert e.R.shape == (0, 16) and e.complete and e.tokens == 0


def test_inputs_regex_selects_and_rerun_skips_finished_inputs(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, {"model.layers.0.q": (32, 3), "model.layers.1.q": (32, 3)})
    s = run_reduce(path, cfg(inputs=r"layers\.1\."), progress=False)
    assert list(s["inputs"]) == ["model.layers.1.q"]
    assert factor(path, "model.layers.0.q") is None
    s = run_reduce(path, cfg(), progress=False)
    assert {k: v["action"] for k, v in s["inputs"].items()} == {
        "model.layers.0.q": "folded", "model.layers.1.q": "skipped"}
    assert main(["reduce", str(path), "--inputs", "nothing-matches"]) == UsageError.exit_code


def test_a_growing_store_extends_a_finished_result(tmp_path):
    path = tmp_path / "s.zarr"
    X = make_store(path, {"a": (32, 5)}, complete=False)["a"]
    run_reduce(path, cfg(), progress=False)
    store = open_store(path, "r+")
    more = (torch.randn(3 * CHUNK, 32, generator=torch.Generator().manual_seed(1))).bfloat16()
    crcs = store.input("a").chunk_crc32 + [store.write_chunk("a", 5 + i, more[i * CHUNK:(i + 1) * CHUNK])
                                           for i in range(3)]
    store.commit(2, {"a": (8 * CHUNK, crcs)}, complete=True)
    store.close()
    s = run_reduce(path, cfg(), progress=False)
    assert s["inputs"]["a"]["action"] == "extended"
    X = torch.cat([X, more.double()])
    f = factor(path, "a")
    assert f.complete and f.tokens == 8 * CHUNK and rel(f.R.double().T @ f.R.double(), X.T @ X) < 1e-5


def _extend(path: Path, chunks: int = 3) -> None:
    """Commit ``chunks`` more chunks of fixed random rows to input "a" and finish the capture."""
    store = open_store(path, "r+")
    info = store.input("a")
    more = torch.randn(chunks * CHUNK, info.n, generator=torch.Generator().manual_seed(1)).bfloat16()
    crcs = info.chunk_crc32 + [store.write_chunk("a", info.num_chunks + i,
                                                 more[i * CHUNK:(i + 1) * CHUNK])
                               for i in range(chunks)]
    store.commit(2, {"a": (info.tokens + chunks * CHUNK, crcs)}, complete=True)
    store.close()


def test_reducing_an_unfinished_capture_then_the_rest_gives_the_bits_of_one_reduce(tmp_path):
    """D7: 5 chunks in groups of 2 end between two group boundaries; the extension must fold
    the same groups ([4, 6), [6, 8)) as one reduce of the finished store, not [4, 5) then
    [5, 7), [7, 8)."""
    early, once = tmp_path / "early.zarr", tmp_path / "once.zarr"
    make_store(early, {"a": (32, 5)}, complete=False)
    assert group_chunks(32, CHUNK, None) == 2
    shutil.copytree(early, once)
    run_reduce(early, cfg(), progress=False)  # the capture is unfinished: R of 5 chunks
    assert factor(early, "a").complete and factor(early, "a").tokens == 5 * CHUNK
    _extend(early)
    _extend(once)
    assert run_reduce(early, cfg(), progress=False)["inputs"]["a"]["action"] == "extended"
    run_reduce(once, cfg(), progress=False)
    a, b = factor(early, "a"), factor(once, "a")
    assert a.tokens == b.tokens == 8 * CHUNK
    assert torch.equal(a.R, b.R) and torch.equal(a.abs_sum, b.abs_sum)
    # the finished result keeps no second state (only an unfinished capture's does)
    assert not any(k.startswith("group.") for k in load_state(early / "reduce" / "a.safetensors")[0])


def test_a_resumed_reduce_folds_with_the_thread_count_it_started_with(tmp_path, capsys):
    """D0: the default count follows the load; a resumed reduce keeps the first run's count
    (STORE/reduce/run.json) unless threads are given, and says so."""
    path = tmp_path / "s.zarr"
    make_store(path, {"a": (32, 3), "b": (32, 3)})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the first run (threads=None: the caller's count) ...
        run_reduce(path, cfg(threads=None, inputs="^a$"), progress=False)
        torch.set_num_threads(2)  # ... and a resume under another default count
        s = run_reduce(path, cfg(threads=None), progress=True)
    finally:
        torch.set_num_threads(before)
    assert s["threads"] == 1 and load_state(path / "reduce" / "b.safetensors")[1]["threads"] == 1
    assert "resuming reduce" in capsys.readouterr().err
    (path / "reduce" / "b.safetensors").unlink()
    s = run_reduce(path, cfg(threads=2), progress=True)  # --threads wins, with a note
    assert s["threads"] == 2 and "--threads 2 may change" in capsys.readouterr().err


# -- resume: kill -9, SIGTERM, bad data ----------------------------------------------------------


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A store whose reduce lasts a second or two with the test delay, and its uninterrupted R's."""
    path = tmp_path_factory.mktemp("resumable") / "s.zarr"
    make_store(path, {"a": (32, 24), "b": (48, 24)}, tail=7)
    run_reduce(path, cfg(), progress=False)
    ref = {name: load_state(path / "reduce" / f"{name}.safetensors")[0] for name in ("a", "b")}
    shutil.rmtree(path / "reduce")
    return path, ref


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # same uuid and chunks: the same fingerprints
    return dst


def assert_same_bits(path: Path, ref: dict) -> None:
    for name, tensors in ref.items():
        got, meta = load_state(path / "reduce" / f"{name}.safetensors")
        assert meta["complete"]
        for key in ("R", "abs_sum"):
            assert got[key].dtype == tensors[key].dtype
            assert torch.equal(got[key], tensors[key]), f"{name}.{key} differs from the uninterrupted run"


def _start(path: Path, delay=0.05) -> subprocess.Popen:
    env = {**os.environ, TEST_DELAY_ENV: str(delay)}
    return subprocess.Popen(CLI + ["reduce", str(path), "--checkpoint-every", "0", "--threads", "1",
                                   "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the reduce subprocess never got going")
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_bit_identical_r(resumable, tmp_path):
    src, ref = resumable
    path = copy_store(src, tmp_path / "s.zarr")
    rng = random.Random(5)
    partial_seen = 0
    for _ in range(3):
        proc = _start(path)
        _wait_for(lambda: (read_lock(path / "reduce" / "lock") or {}).get("pid") == proc.pid
                  or proc.poll() is not None)  # this run holds the lock: it is folding
        time.sleep(rng.uniform(0.05, 0.9))
        proc.kill()  # SIGKILL: no handler runs, the lock stays behind
        proc.communicate()
        for name in ("a", "b"):  # whatever the moment, every file on disk is a valid state
            f = path / "reduce" / f"{name}.safetensors"
            if f.exists():
                partial_seen += not load_state(f)[1]["complete"]
    assert partial_seen, "no kill landed mid-input; the test did not test resume"
    # the rerun in this process (saves a subprocess start): same machine, threads and device
    assert main(["reduce", str(path), "--checkpoint-every", "0", "--threads", "1", "--device", "cpu"]) == 0
    assert_same_bits(path, ref)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_75_and_the_rerun_finishes_identically(resumable, tmp_path):
    src, ref = resumable
    path = copy_store(src, tmp_path / "s.zarr")
    proc = _start(path)
    _wait_for(lambda: (path / "reduce" / "a.safetensors").exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "SIGTERM" in err and "input 'a' at chunk" in err and "of 25" in err
    meta = load_state(path / "reduce" / "a.safetensors")[1]
    assert not meta["complete"] and 0 < meta["next_chunk"] < 25
    assert store_status(open_store(path))["inputs"][0]["reduce"]["state"] == "in progress"
    assert not (path / "reduce" / "lock").exists()  # released on the way out
    assert main(["reduce", str(path), "--checkpoint-every", "0", "--threads", "1", "--device", "cpu"]) == 0
    assert_same_bits(path, ref)


def _shard_file(path: Path, name: str, shard: int) -> Path:
    return path / "inputs" / name / "c" / str(shard) / "0"


def test_corrupt_chunk_names_input_and_chunk_and_the_rerun_after_repair_resumes(
        resumable, tmp_path, capsys):
    src, ref = resumable
    path = copy_store(src, tmp_path / "s.zarr")
    shard = _shard_file(path, "a", 2)  # chunks 8..11 (4 chunks per shard); chunk 8 comes first
    good = shard.read_bytes()
    shard.write_bytes(good[:40] + bytes(b ^ 0xFF for b in good[40:48]) + good[48:])
    args = ["reduce", str(path), "--checkpoint-every", "0", "--threads", "1", "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "input 'a' chunk 8" in err and "saved up to chunk 8" in err
    meta = load_state(path / "reduce" / "a.safetensors")[1]
    assert meta["next_chunk"] == 8 and not meta["complete"]  # groups of 2 chunks: 0..7 folded
    shard.write_bytes(good)  # repair (restore from a copy)
    assert main(args) == 0
    assert "(1 folded, 1 resumed)" in capsys.readouterr().out
    assert_same_bits(path, ref)


def test_nan_chunk_is_a_data_error_naming_input_and_chunk(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    make_store(path, {"a": (32, 2), "b": (32, 6)}, nan_at=("b", 3))
    assert main(["reduce", str(path), "--checkpoint-every", "0", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "input 'b' chunk 3" in err and "NaN" in err
    assert factor(path, "a").complete
    b = factor(path, "b")
    assert not b.complete and b.meta["next_chunk"] == 2  # the group before the bad chunk
    with pytest.raises(DataError, match="input 'b' chunk 3"):
        run_reduce(path, cfg(), progress=False)


# -- refusals --------------------------------------------------------------------------------------


def test_checkpoint_with_other_settings_is_refused_until_restart(resumable, tmp_path, capsys):
    src, _ = resumable
    path = copy_store(src, tmp_path / "s.zarr")
    run_reduce(path, cfg(inputs="^a$"), progress=False)
    for other in (dict(dtype="float64"), dict(with_gram=True), dict(group_rows=256)):
        with pytest.raises(CheckpointMismatch, match="--restart"):
            run_reduce(path, cfg(inputs="^a$", **other), progress=False)
    assert main(["reduce", str(path), "--inputs", "^a$", "--dtype", "float64"]) == 1
    assert "dtype='float32', this run uses dtype='float64'" in capsys.readouterr().err
    s = run_reduce(path, cfg(inputs="^a$", dtype="float64", restart=True), progress=False)
    assert s["inputs"]["a"]["action"] == "folded" and factor(path, "a").R.dtype == torch.float64


def test_checkpoint_from_another_store_or_rewritten_chunks_is_refused(tmp_path):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    make_store(one, {"a": (32, 4)}, seed=1)
    make_store(two, {"a": (32, 4)}, seed=1)  # same data, another store (uuid)
    run_reduce(one, cfg(), progress=False)
    (two / "reduce").mkdir()
    shutil.copy(one / "reduce" / "a.safetensors", two / "reduce" / "a.safetensors")
    with pytest.raises(CheckpointMismatch, match="does not match the store"):
        run_reduce(two, cfg(), progress=False)
    # chunk 1 rewritten behind the store's back (data and checksum): the fingerprint changes
    store = open_store(one, "r+")
    info = store.input("a")
    new = to_stored(torch.ones(CHUNK, 32, dtype=torch.bfloat16))
    store._write_rows("a", CHUNK, new)  # private writer calls: simulate an outside tool
    store._write_crcs("a", 1, [crc32(new)])
    store.close()
    with pytest.raises(CheckpointMismatch, match="chunks 0..3 of input 'a' differ"):
        run_reduce(one, cfg(), progress=False)
    assert run_reduce(one, cfg(restart=True), progress=False)["inputs"]["a"]["action"] == "folded"


def test_a_second_reduce_on_the_same_store_is_refused(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    make_store(path, {"a": (32, 2)})
    (path / "reduce").mkdir()
    with StoreLock(path / "reduce" / "lock", what="reduce"):  # a live holder (this process)
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            run_reduce(path, cfg(), progress=False)
        assert main(["reduce", str(path)]) == 1
        assert "holds the lock" in capsys.readouterr().err
    assert factor(path, "a") is None


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, capfd):
    path = tmp_path / "s.zarr"
    make_store(path, {"a": (32, 2)})
    (path / "reduce").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (path / "reduce" / "lock").write_text(json.dumps(
        {"pid": dead.pid, "hostname": socket.gethostname(), "started": time.time(), "token": "x"}))
    (path / "reduce" / ".a.safetensors.tmp-leftover").write_bytes(b"torn")
    run_reduce(path, cfg(), progress=False)
    assert "stale reduce lock" in capfd.readouterr().err
    assert factor(path, "a").complete
    assert sorted(p.name for p in (path / "reduce").iterdir()) == ["a.safetensors", "run.json"]


# -- Dask --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_worker_dask_run_matches_the_single_process_r(tmp_path):
    pytest.importorskip("distributed")
    path = tmp_path / "s.zarr"
    X = make_store(path, {"a": (32, 12), "b": (48, 9)}, tail=5, nan_at=None)
    local = tmp_path / "local.zarr"
    shutil.copytree(path, local)
    run_reduce(local, cfg(), progress=False)
    # a partial checkpoint first (a corrupt chunk stops a local run), so the Dask run
    # also merges a resumed state with the tree of the remaining ranges
    shard = _shard_file(path, "b", 1)
    good = shard.read_bytes()
    shard.write_bytes(good[:40] + bytes(b ^ 0xFF for b in good[40:48]) + good[48:])
    with pytest.raises(DataError, match="input 'b' chunk 4"):
        run_reduce(path, cfg(inputs="^b$"), progress=False)
    shard.write_bytes(good)
    s = run_reduce(path, cfg(workers=2), progress=False)  # one cluster: it takes seconds to start
    assert s["mode"] == "dask"
    assert {k: v["action"] for k, v in s["inputs"].items()} == {"a": "folded", "b": "resumed"}
    for name in ("a", "b"):
        d, l = factor(path, name), factor(local, name)
        assert d.complete and d.tokens == l.tokens == X[name].shape[0]
        Rd, Rl = d.R.double(), l.R.double()
        assert rel(Rd.T @ Rd, Rl.T @ Rl) < 1e-5
        assert rel(Rd, Rl) < 1e-4
        torch.testing.assert_close(d.abs_sum, l.abs_sum, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_a_dask_worker_killed_mid_task_is_survived(tmp_path, monkeypatch):
    """kill -9 of a worker process while it folds: Dask reruns its tasks, R is still right."""
    distributed = pytest.importorskip("distributed")
    import threading

    path = tmp_path / "s.zarr"
    X = make_store(path, {"a": (32, 24)})
    monkeypatch.setenv(TEST_DELAY_ENV, "0.3")  # inherited by the worker processes
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(run_reduce(
            path, cfg(scheduler=cluster.scheduler_address), progress=False)))
        runner.start()
        deadline = time.monotonic() + 60
        busy = []
        while not busy and time.monotonic() < deadline:
            busy = [w for w, tasks in client.processing().items()
                    if any(str(t).startswith("('fold_range_task") or "fold_range_task" in str(t)
                           for t in tasks)]
            time.sleep(0.05)
        assert busy, "no fold task started"
        time.sleep(0.4)  # inside the task, between groups
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        runner.join(120)
        assert not runner.is_alive()
    assert result["inputs"]["a"]["action"] == "folded"
    d = factor(path, "a")
    assert d.complete and d.tokens == X["a"].shape[0]
    R = d.R.double()
    ref = X["a"].T @ X["a"]
    assert rel(R.T @ R, ref) < 1e-5
