"""coala-stream compress: the whole pipeline in one resumable command."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from coala_stream.cli import main
from coala_stream.compress import CompressConfig, run_compress

from .test_capture import text_file  # noqa: F401
from .test_propagate import fail_reduce_of

compress_mod = importlib.import_module("coala_stream.compress")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# uniform ranks: these tests are about the propagation and the command; --allocate loss (the
# default) is tested end to end in tests/test_loss_allocation.py
SMALL = dict(samples=6, seq_len=32, ratio=0.3, allocate="uniform")


def cfg(model_dir, out, text_file, **kw) -> CompressConfig:
    return CompressConfig(out=str(out), model=str(model_dir), data=str(text_file), **{**SMALL, **kw})


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(d / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "ref"
    summary = run_compress(cfg(tiny_model_dir("float32"), out, text_file), progress=False)
    return out, summary


def test_compress_writes_the_model_and_cleans_up(reference, tiny_model_dir):
    from coala_stream.export import load_output

    out, summary = reference
    assert summary["out"] == str(out) and summary["work"] is None
    assert not out.with_name(out.name + ".work").exists()
    report = summary["report"]
    assert report["settings"]["objective"] == "output" and report["settings"]["alpha"] == 0.5
    assert any("factors as the propagating capture applied them (refined 25 steps per block)" in n
               for n in report["notes"])  # the default recipe refines
    assert 0.25 < report["totals"]["removed_fraction"] < 0.35
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(load_output(out)(ids).logits).all()


def test_compress_killed_then_rerun_gives_the_same_model(reference, tiny_model_dir, text_file,
                                                         tmp_path, monkeypatch):
    out = tmp_path / "m"
    fail_reduce_of(monkeypatch, "layers.1.mlp.down_proj")
    with pytest.raises(RuntimeError, match="injected"):
        run_compress(cfg(tiny_model_dir("float32"), out, text_file), progress=False)
    assert not out.exists() and (tmp_path / "m.work" / "prop.zarr").exists()
    monkeypatch.undo()
    s = run_compress(cfg(tiny_model_dir("float32"), out, text_file), progress=False)
    assert s["steps"]["capture"]["status"] == "complete"
    a, b = _tensors(reference[0]), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compress_global_allocation_spends_the_same_budget(tiny_model_dir, text_file, tmp_path):
    s = run_compress(cfg(tiny_model_dir("float32"), tmp_path / "g", text_file, allocate="global",
                         keep_work=True), progress=False)
    report = s["report"]
    ranks = json.loads((tmp_path / "g.work" / "ranks.json").read_text())
    chosen = {r["module"]: r["rank"] for r in ranks["layers"] if not r["kept_dense"]}
    assert {r["module"]: r["rank"] for r in report["layers"] if not r["kept_dense"]} == chosen
    assert s["steps"]["allocation"]["requested"] == "global"
    assert report["totals"]["params_after"] <= s["steps"]["allocation"]["budget"] + sum(
        r["params_before"] for r in report["layers"] if r["kept_dense"])


def test_compress_usage_errors_before_anything_runs(tiny_model_dir, text_file, tmp_path, capsys):
    base = ["compress", str(tiny_model_dir("float32")), "--data", str(text_file), "--samples", "4",
            "--seq-len", "32", "--allocate", "uniform"]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("mine")
    for extra, message in [
        (["--out", str(tmp_path / "a"), "--ratio", "1.5"], "ratio"),
        (["--out", str(tmp_path / "a"), "--objective", "input", "--alpha", "0.5"],
         "--alpha weighs the original outputs"),
        (["--out", str(tmp_path / "a"), "--method", "svdllm"], "--objective output is solved by"),
        (["--out", str(tmp_path / "a"), "--work", str(junk)], "not a compress work directory"),
        (["--out", str(junk)], "already exists"),
    ]:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert (junk / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    assert not (tmp_path / "a.work").exists()


def test_compress_drops_activations_unless_asked_to_keep_them(tiny_model_dir, text_file, tmp_path):
    from coala_stream.store import open_store

    for keep in (False, True):
        out = tmp_path / f"k{keep}"
        # 70 x 32 tokens: one full chunk of 2048 rows (dropped after its reduce) and a rest
        run_compress(cfg(tiny_model_dir("float32"), out, text_file, keep_work=True, samples=70,
                         keep_activations=keep, refine_steps=0), progress=False)
        with open_store(tmp_path / f"k{keep}.work" / "prop.zarr") as st:
            dropped = {st.input(n).dropped for n in st.inputs}
            chunks = {st.input(n).num_chunks for n in st.inputs}
        assert chunks == {2} and dropped == ({0} if keep else {1}), (keep, dropped)


def test_the_default_allocation_is_loss_below_ratio_0_4_and_uniform_for_an_adapter():
    from coala_stream.compress import LOSS_BELOW_RATIO, recipe

    assert LOSS_BELOW_RATIO == 0.4
    assert CompressConfig(out="-").allocate == "loss"  # the default ratio, 0.2
    assert CompressConfig(out="-", ratio=0.39).allocate == "loss"
    assert CompressConfig(out="-", ratio=0.4).allocate == "uniform"
    assert CompressConfig(out="-", ratio=0.6).allocate == "uniform"
    assert CompressConfig(out="-", format="peft").allocate == "uniform"  # every layer adapted
    assert CompressConfig(out="-", allocate="global").allocate == "global"
    assert CompressConfig(out="-", ratio=0.6, allocate="loss").allocate == "loss"
    assert "--allocate loss (uniform from --ratio 0.4 on)" in recipe()
