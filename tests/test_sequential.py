"""capture --sequential on tiny random models: the store equals the ordinary capture's
(bit for bit here), one block is materialised at a time, hidden states are streamed,
a failed or killed run resumes to the same store, unsupported models get a clear
error, and peak memory does not grow with the number of blocks."""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coala_stream import sequential
from coala_stream.cli import main
from coala_stream.errors import CoalaError, StoreError
from coala_stream.sequential import SequentialConfig
from coala_stream.sequential import run as run_capture  # what `coala-stream capture` runs

seq_run = importlib.import_module("coala_stream.sequential.run")  # the module (`run` is also a function)
from coala_stream.store import open_store

from .test_capture import CLI, SMALL, assert_same_store, store_contents, text_file  # noqa: F401


def config(model_dir, out, text_file, **kw) -> SequentialConfig:
    return SequentialConfig(out=str(out), model=str(model_dir), data=str(text_file), **{**SMALL, **kw})

# test_capture's SMALL (2 full chunks and a partial one), with 3 blocks.
LAYERS3 = dict(num_hidden_layers=3)


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory, text_file):
    """Ordinary (whole-model) capture of a model dir, made once per (dir, settings)."""
    made: dict = {}

    def get(model_dir, **kw) -> Path:
        key = (str(model_dir), tuple(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ordinary") / ("s.h5" if kw.get("backend") == "hdf5" else "s.zarr")
            run_capture(config(model_dir, out, text_file, **kw), progress=False)
            made[key] = out
        return made[key]

    return get


def largest_difference(a: Path, b: Path) -> tuple[float, float]:
    """(largest |x - y|, largest |x - y| / max|x|) over every stored input."""
    abs_d = rel_d = 0.0
    with open_store(a) as sa, open_store(b) as sb:
        for name in sa.inputs:
            x = torch.cat(list(sa.iter_chunks(name))).double()
            y = torch.cat(list(sb.iter_chunks(name))).double()
            d = (x - y).abs().max().item()
            abs_d, rel_d = max(abs_d, d), max(rel_d, d / max(x.abs().max().item(), 1e-30))
    return abs_d, rel_d


def assert_equal_attrs(a: Path, b: Path) -> None:
    """Root attributes equal but for the uuid and capture_settings, which says
    ``sequential: true`` and has no whole-model probe crc (``probe_crc32: null``)."""
    with open_store(a) as sa, open_store(b) as sb:
        da, db = sa.attrs, sb.attrs
    drop = {"uuid", "capture_settings"}
    assert {k: v for k, v in da.items() if k not in drop} == {k: v for k, v in db.items() if k not in drop}
    ca, cb = da["capture_settings"], db["capture_settings"]
    assert cb.pop("sequential") is True and cb.pop("probe_crc32") is None
    ca.pop("probe_crc32")
    assert ca.pop("sequential") is False
    assert ca == cb


# ---------------------------------------------------------------------------
# The store equals the ordinary one

@pytest.mark.parametrize("dtype,backend", [("float32", "zarr"), ("bfloat16", "zarr"), ("float32", "hdf5")])
def test_sequential_store_equals_ordinary_capture(dtype, backend, tiny_model_dir, text_file, tmp_path,
                                                  ordinary):
    model_dir = tiny_model_dir(dtype, **LAYERS3)
    ref = ordinary(model_dir, backend=backend)
    out = tmp_path / ("s.h5" if backend == "hdf5" else "s.zarr")
    s = run_capture(config(model_dir, out, text_file, sequential=True, backend=backend), progress=False)
    assert s["status"] == "complete" and s["blocks"] == 3 and s["inputs"] == 12
    abs_d, rel_d = largest_difference(ref, out)
    print(f"\n{dtype} {backend}: largest difference sequential vs ordinary: abs {abs_d:.3g}, "
          f"relative {rel_d:.3g}")
    assert rel_d <= 1e-6
    assert_same_store(ref, out)  # in fact bit for bit: same crc32 lists, same bits, same progress
    assert_equal_attrs(ref, out)
    assert not sequential.default_hidden_dir(str(out)).exists()  # the work directory is gone
    itemsize = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    with open_store(out) as st:  # the summary's sizes are the store's
        row_bytes = sum(st.input(n).n for n in st.inputs) * itemsize
    assert s["store_raw_bytes"] == s["raw_bytes"] == row_bytes * 5 * 32


@pytest.mark.parametrize("model_type,overrides", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),  # layer 1 slides
    ("mistral", dict(sliding_window=16)),
])
def test_other_llama_style_models_with_sliding_windows(model_type, overrides, tiny_arch_dir, text_file,
                                                       tmp_path, ordinary):
    model_dir = tiny_arch_dir(model_type, **overrides)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)  # the masks really differ between layers / from causal
    assert "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"])
    assert cfg.sliding_window == 16 < SMALL["seq_len"]
    ref = ordinary(model_dir)
    out = tmp_path / "s.zarr"
    run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert largest_difference(ref, out) == (0.0, 0.0)
    assert_same_store(ref, out)


def test_layers_regex_runs_only_the_blocks_needed(tiny_model_dir, text_file, tmp_path, ordinary, monkeypatch):
    model_dir = tiny_model_dir("float32", **LAYERS3)
    regex = r"layers\.1\.(self_attn\.[kv]|mlp\.down)"
    ref = ordinary(model_dir, layers=regex)
    loaded = []
    real = sequential.BlockModel.load_block
    monkeypatch.setattr(sequential.BlockModel, "load_block",
                        lambda self, k: (loaded.append(k), real(self, k))[1])
    out = tmp_path / "s.zarr"
    s = run_capture(config(model_dir, out, text_file, sequential=True, layers=regex), progress=False)
    assert loaded == [0, 1] and s["blocks"] == 2  # block 2 is never loaded
    assert_same_store(ref, out)
    assert store_contents(out)["inputs"] == ["model.layers.1.self_attn.k_proj",
                                             "model.layers.1.mlp.down_proj"]


# ---------------------------------------------------------------------------
# One block at a time; hidden states streamed

def test_one_block_materialised_at_a_time_and_hidden_states_streamed(tiny_model_dir, text_file, tmp_path,
                                                                     monkeypatch):
    model_dir = tiny_model_dir("float32", num_hidden_layers=4)
    seen = []  # (what ran, blocks materialised, embeddings materialised)

    def is_real(module):
        return any(p.device.type != "meta" for p in module.parameters())

    real_block, real_embed = sequential.BlockModel.run_block, sequential.BlockModel.embed

    def run_block(self, k, x):
        seen.append((k, self.materialised_blocks(), is_real(self.base.embed_tokens), x.shape[0]))
        return real_block(self, k, x)

    def embed(self, ids):
        out = real_embed(self, ids)
        seen.append(("embed", self.materialised_blocks(), is_real(self.base.embed_tokens), ids.shape[0]))
        return out

    writes, real_write = [], sequential.WorkDir.write

    def write(self, name, start, t, block):
        writes.append((name, start, t.shape[0], block))
        return real_write(self, name, start, t, block)

    monkeypatch.setattr(sequential.BlockModel, "run_block", run_block)
    monkeypatch.setattr(sequential.BlockModel, "embed", embed)
    monkeypatch.setattr(sequential.WorkDir, "write", write)
    run_capture(config(model_dir, tmp_path / "s.zarr", text_file, sequential=True, batch_size=1),
                progress=False)
    assert [e for e in seen if e[0] == "embed"] == [("embed", [], True, 1)] * 5
    for k in range(4):
        runs = [e for e in seen if e[0] == k]
        assert runs and all(e[1:3] == ([k], False) for e in runs), runs  # only block k, no embeddings
        assert {e[3] for e in runs} == {1}  # batches, never all samples at once
    # every hidden-state write is one batch; block k reads one array and writes the other
    assert {w[2] for w in writes} == {1}
    assert [(w[0], w[3]) for w in writes if w[1] == 0] == [("a", -1), ("b", 0), ("a", 1), ("b", 2)]


# ---------------------------------------------------------------------------
# Resume

def _progress(out: Path) -> dict:
    return json.loads((sequential.default_hidden_dir(str(out)) / "progress.json").read_text())


def test_failure_between_blocks_then_rerun_equals_uninterrupted(tiny_model_dir, text_file, tmp_path,
                                                                ordinary, monkeypatch):
    model_dir = tiny_model_dir("float32", **LAYERS3)
    out, real = tmp_path / "s.zarr", sequential.BlockModel.load_block

    def failing(self, k):
        if k == 2:
            raise RuntimeError("injected: killed before block 2")
        return real(self, k)

    monkeypatch.setattr(sequential.BlockModel, "load_block", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert _progress(out)["next_block"] == 2
    with open_store(out) as s:
        assert s.attrs["capture"] == {"samples_done": 0, "complete": False, "tokens": {
            **{f"model.layers.{i}.{m}": 128 for i in (0, 1) for m in
               ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}}}
    monkeypatch.setattr(sequential.BlockModel, "load_block", real)
    loaded = []
    monkeypatch.setattr(sequential.BlockModel, "load_block",
                        lambda self, k: (loaded.append(k), real(self, k))[1])
    real_finish = seq_run.finish

    def finish_then_fail(store, *args):
        real_finish(store, *args)
        raise RuntimeError("injected: killed after the final commit")

    monkeypatch.setattr(seq_run, "finish", finish_then_fail)
    with pytest.raises(RuntimeError, match="after the final commit"):
        run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert loaded == [2] and _progress(out)["next_block"] == 3  # blocks 0 and 1 not run again
    monkeypatch.setattr(seq_run, "finish", real_finish)
    s = run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert s["status"] == "already complete" and not sequential.default_hidden_dir(str(out)).exists()
    assert_same_store(ordinary(model_dir), out)


def test_failure_before_the_final_commit_then_rerun(tiny_model_dir, text_file, tmp_path, ordinary,
                                                    monkeypatch):
    from coala_stream.store import Store

    model_dir = tiny_model_dir("float32", **LAYERS3)
    out, real = tmp_path / "s.zarr", Store.commit

    def failing(self, samples_done, committed, complete=False):
        if complete:
            raise RuntimeError("injected: killed before the final commit")
        return real(self, samples_done, committed, complete)

    monkeypatch.setattr(Store, "commit", failing)
    with pytest.raises(RuntimeError, match="before the final commit"):
        run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert _progress(out)["next_block"] == 3
    monkeypatch.setattr(Store, "commit", real)
    loaded = []
    real_load = sequential.BlockModel.load_block
    monkeypatch.setattr(sequential.BlockModel, "load_block",
                        lambda self, k: (loaded.append(k), real_load(self, k))[1])
    s = run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert s["status"] == "complete" and s["block_before"] == 3 and loaded == []
    assert_same_store(ordinary(model_dir), out)


def test_disk_full_inside_a_block_then_rerun_equals_uninterrupted(tiny_model_dir, text_file, tmp_path,
                                                                  ordinary, monkeypatch):
    from coala_stream.store import Store

    model_dir = tiny_model_dir("float32", **LAYERS3)
    out, real = tmp_path / "s.zarr", Store.write_chunk
    calls = {"n": 0}

    def failing(self, name, index, tensor):
        calls["n"] += 1
        if calls["n"] == 8 + 5:  # block 0: 2 chunks x 4 inputs; block 1: its second chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, index, tensor)

    monkeypatch.setattr(Store, "write_chunk", failing)
    with pytest.raises(CoalaError, match="disk is full"):
        run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert _progress(out)["next_block"] == 1
    with open_store(out) as s:
        assert s.input("model.layers.1.self_attn.q_proj").tokens == 64  # one chunk of block 1
    monkeypatch.setattr(Store, "write_chunk", real)
    s = run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    assert s["block_before"] == 1
    assert_same_store(ordinary(model_dir), out)


def test_modes_do_not_mix_on_an_unfinished_store(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    model_dir = tiny_model_dir("float32", **LAYERS3)
    out, real = tmp_path / "s.zarr", sequential.BlockModel.load_block
    def failing(self, k):
        if k == 1:
            raise RuntimeError("stop")
        return real(self, k)

    monkeypatch.setattr(sequential.BlockModel, "load_block", failing)
    with pytest.raises(RuntimeError):
        run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    monkeypatch.setattr(sequential.BlockModel, "load_block", real)
    with pytest.raises(StoreError, match="started with --sequential; rerun the same command with "
                                         "--sequential"):
        run_capture(config(model_dir, out, text_file), progress=False)
    run_capture(config(model_dir, out, text_file, sequential=True), progress=False)
    args = ["capture", str(model_dir), "--out", str(out), "--data", str(text_file), "--samples", "5",
            "--seq-len", "32", "--chunk-tokens", "64"]
    assert main(args) == 0 and main([*args, "--sequential"]) == 0  # complete: either mode says so
    assert capsys.readouterr().out.count("already complete") == 2


def _next_block(out: Path) -> int:
    try:
        return _progress(out)["next_block"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tiny_model_dir, text_file, tmp_path):
    model_dir = tiny_model_dir("float32", num_hidden_layers=4)
    args = [str(model_dir), "--data", str(text_file), "--samples", "24", "--seq-len", "16",
            "--chunk-tokens", "32"]
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*CLI, "capture", *args, "--sequential", "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = tmp_path / "ref.zarr"
    assert main(["capture", *args, "--out", str(ref)]) == 0  # meanwhile, the ordinary one
    deadline = time.monotonic() + 60
    while _next_block(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert 2 <= _next_block(killed) < 5, "the kill came too late"
    assert main(["capture", *args, "--sequential", "--out", str(killed)]) == 0
    assert_same_store(ref, killed)


# ---------------------------------------------------------------------------
# Errors

def test_unsupported_architecture_names_what_is_missing(tiny_arch_dir, text_file, tmp_path, capsys):
    model_dir = tiny_arch_dir("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0,
                              eos_token_id=1)
    with pytest.raises(CoalaError, match=r"--sequential supports Llama-style.*GPT2LMHeadModel "
                                         r"\(model_type 'gpt2'\) has no base model `model\.model`"):
        run_capture(config(model_dir, tmp_path / "s.zarr", text_file, sequential=True), progress=False)
    assert main(["capture", str(model_dir), "--out", str(tmp_path / "s.zarr"), "--data", str(text_file),
                 "--samples", "2", "--seq-len", "32", "--sequential"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "has no base model" in err
    assert not (tmp_path / "s.zarr").exists()


def test_hidden_dir_that_is_not_ours_is_refused(tiny_model_dir, text_file, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a sequential-capture work directory"):
        run_capture(config(tiny_model_dir("float32"), tmp_path / "s.zarr", text_file, sequential=True,
                           hidden_dir=str(junk)), progress=False)
    assert (junk / "precious.txt").exists()
    assert main(["capture", str(tiny_model_dir("float32")), "--out", str(tmp_path / "t.zarr"),
                 "--hidden-dir", str(junk)]) == 2
    assert "--hidden-dir is only used with --sequential" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Memory: one block, whatever the number of blocks

RSS_SCRIPT = """
import sys
from coala_stream import sequential
from coala_stream.sequential import SequentialConfig, run as run_capture

def rss(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024

after_load, load = [], sequential.BlockModel.load_block
sequential.BlockModel.load_block = lambda self, k: (load(self, k), after_load.append(rss("VmRSS")))[0]
run_capture(SequentialConfig(out=sys.argv[1], model=sys.argv[2], data=sys.argv[3], samples=2,
                             seq_len=32, sequential=sys.argv[4] == "1"), progress=False)
print(*after_load, rss("VmHWM"))
"""
BIG = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_blocks(tiny_model_dir, text_file, tmp_path):
    # One block is 6.4M float32 parameters (26 MB); 2 vs 6 blocks: a whole-model load
    # grows by 4 blocks (104 MB), the sequential capture by (about) nothing.
    dirs = {n: tiny_model_dir("float32", num_hidden_layers=n, **BIG) for n in (2, 6)}
    block_bytes = (768 * 768 * 2 + 768 * 384 * 2 + 3 * 768 * 2048 + 2 * 768) * 4

    def run(n, seq):
        p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / f"s{n}{seq}.zarr"),
                            str(dirs[n]), str(text_file), seq], capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        *after_load, hwm = map(int, p.stdout.split())
        return after_load, hwm

    (_, hwm2), (rss6, hwm6) = run(2, "1"), run(6, "1")
    print(f"\npeak RSS --sequential: 2 blocks {hwm2 / 1e6:.0f} MB, 6 blocks {hwm6 / 1e6:.0f} MB "
          f"(one block {block_bytes / 1e6:.0f} MB); RSS after loading each block: "
          f"{', '.join(f'{r / 1e6:.0f}' for r in rss6)} MB")
    assert len(rss6) == 6 and max(rss6[1:]) - min(rss6[1:]) < 0.25 * block_bytes  # flat, block after block
    # 4 more blocks: the store's writer adds a little for 16 more inputs (the same in an
    # ordinary capture), the blocks nothing; holding them would add 4 blocks
    assert hwm6 - hwm2 < block_bytes, (hwm2, hwm6)
    # (an ordinary capture of the 6-block model peaks at about 5.5 blocks more: 614 vs 472 MB)
