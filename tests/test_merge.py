"""`capture --shard I/N` + `coala-stream merge`: the merged R equals one capture's R to float32
rounding, the merged store goes through solve, reduce and status like any other, and shards
that do not belong together are refused with a line naming the shard."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from coala_stream import calib
from coala_stream.capture import CaptureConfig, run_capture
from coala_stream.cli import main
from coala_stream.errors import CoalaError, LockedError, StoreError, UsageError
from coala_stream.merge import merge_shards
from coala_stream.reduce import ReduceConfig, read_result, result_path, run_reduce
from coala_stream.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 6 samples of 32 tokens, 2 samples per chunk: each of 2 parts has a partial last chunk
SMALL = dict(samples=6, seq_len=32, chunk_tokens=64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(calib.builtin_text()[:40_000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def make(tiny_model_dir, text_file, tmp_path_factory):
    """make(name, shard=None, reduce=True, **capture settings) -> a captured (and reduced) store."""
    root = tmp_path_factory.mktemp("stores")

    def build(name, shard=None, reduce=True, reduce_dtype="float32", **kw):
        out = root / name
        if not out.exists():
            model = kw.pop("model", tiny_model_dir("float32"))
            run_capture(CaptureConfig(out=str(out), model=str(model), data=str(text_file),
                                      shard=shard, **{**SMALL, **kw}), progress=False)
            if reduce:
                run_reduce(out, ReduceConfig(dtype=reduce_dtype), progress=False)
        return out
    return build


@pytest.fixture(scope="module")
def merged(make, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "m.zarr"
    merge_shards(out, [make("p1.zarr", "1/2"), make("p0.zarr", "0/2")])  # any order
    return out


def _gram(R):
    R = R.double()
    return R.T @ R


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _results(path) -> dict:
    with open_store(path) as s:
        return {name: read_result(s, name) for name in s.inputs}


@pytest.mark.parametrize("count", [2, 3])
def test_merged_r_equals_the_r_of_one_capture(make, tmp_path, count):
    parts = [make(f"q{i}of{count}.zarr", f"{i}/{count}") for i in range(count)]
    out = tmp_path / "m.zarr"
    summary = merge_shards(out, parts)
    assert (summary["shards"], summary["samples"]) == (count, 6)
    whole, got = _results(make("whole.zarr")), _results(out)
    assert whole.keys() == got.keys() and len(got) == 8
    for name, w in whole.items():
        g = got[name]
        assert g.complete and g.tokens == w.tokens == 6 * 32
        assert g.R.dtype == torch.float32 and g.R.shape == w.R.shape
        assert _rel(_gram(g.R), _gram(w.R)) < 1e-5, name  # float32 rounding of R^T R
        assert torch.allclose(g.abs_sum, w.abs_sum, rtol=1e-12)
    with open_store(out) as s:
        assert s.attrs["capture"]["complete"] and s.attrs["calibration"]["shard"] is None
        assert [m["shard"] for m in s.attrs["merged_from"]] == [[i, count] for i in range(count)]
        assert all(s.input(n).tokens == 0 for n in s.inputs)  # no activations copied
        with open_store(make("whole.zarr")) as w:
            for key in ("tokens_sha256", "sha256", "samples", "seq_len", "seed", "sample_range"):
                assert s.attrs["calibration"][key] == w.attrs["calibration"][key], key


def test_shards_hold_disjoint_parts_of_the_draw(make):
    ranges = []
    for i in range(3):
        with open_store(make(f"q{i}of3.zarr", f"{i}/3")) as s:
            cal = s.attrs["calibration"]
            ranges.append(cal["sample_range"])
            assert cal["shard"] == [i, 3] and cal["samples"] == 6
            assert s.attrs["capture"]["samples_done"] == 2
            assert all(s.input(n).tokens == 2 * 32 for n in s.inputs)
    assert ranges == [[0, 2], [2, 4], [4, 6]]


def _edit(src: Path, dst: Path, path: tuple, value) -> Path:
    """A copy of store ``src`` with one root attribute changed (same uuid, reduce files kept)."""
    import zarr

    shutil.copytree(src, dst)
    group = zarr.open_group(str(dst), mode="r+")
    attrs = dict(group.attrs.asdict())
    node = attrs
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    group.update_attributes(attrs)
    return dst


@pytest.mark.parametrize("path,value,label", [
    (("model", "config_sha256"), "0" * 64, "model config"),
    (("tokenizer",), {"class": "Other", "vocab_size": 9}, "tokenizer"),
    (("calibration", "sha256"), "f" * 64, "calibration data sha256"),
    (("calibration", "tokens_sha256"), "e" * 64, r"calibration draw \(tokens_sha256\)"),
    (("calibration", "field"), "body", "calibration field"),
    (("calibration", "chat_template"), True, "--chat-template"),
    (("calibration", "seed"), 7, "--seed"),
    (("calibration", "samples"), 8, "--samples"),
    (("calibration", "seq_len"), 16, "--seq-len"),
])
def test_shards_of_another_capture_are_refused_naming_the_shard(make, tmp_path, path, value,
                                                               label):
    other = _edit(make("p1.zarr", "1/2"), tmp_path / "odd.zarr", path, value)
    with pytest.raises(StoreError) as info:
        merge_shards(tmp_path / "m.zarr", [make("p0.zarr", "0/2"), other])
    msg = str(info.value)
    assert re.search(rf"odd\.zarr \(shard 1/2\) differs from .*p0\.zarr \(shard 0/2\) in {label}",
                     msg) and "\n" not in msg, msg
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.parametrize("kw,label", [
    ({"dtype": "bfloat16"}, "dtype"),
    ({"chunk_tokens": 32}, "chunk_tokens"),
    ({"layers": r"layers\.0\."}, "--layers"),
    ({"seed": 3}, r"calibration draw"),
])
def test_shards_captured_with_other_settings_are_refused(make, tmp_path, kw, label):
    name = "x-" + "-".join(f"{k}{v}" for k, v in kw.items()).replace("\\", "") + ".zarr"
    other = make(name, "1/2", **kw)
    with pytest.raises(StoreError, match=rf"{re.escape(name)} \(shard 1/2\) differs from .* in "
                                         rf"{label}"):
        merge_shards(tmp_path / "m.zarr", [make("p0.zarr", "0/2"), other])


def test_another_model_config_is_refused(make, tiny_model_dir, tmp_path):
    other = make("rope.zarr", "1/2", model=tiny_model_dir("float32", rope_theta=500.0))
    with pytest.raises(StoreError, match=r"rope\.zarr \(shard 1/2\) differs .* in model config"):
        merge_shards(tmp_path / "m.zarr", [make("p0.zarr", "0/2"), other])


def test_parts_missing_twice_or_of_another_split_are_refused(make, tmp_path):
    p0, p1 = make("p0.zarr", "0/2"), make("p1.zarr", "1/2")
    out = tmp_path / "m.zarr"
    cases = [
        ([p0], r"shard 1/2 missing: given 0/2; pass the store of every part"),
        ([p0, p0, p1], r"p0\.zarr is given twice"),
        ([p0, make("p0b.zarr", "0/2"), p1], r"p0b\.zarr and .*p0\.zarr are both shard 0/2"),
        ([p0, make("q1of3.zarr", "1/3")], r"q1of3\.zarr \(shard 1/3\) is a part of 3, but "
                                          r".*p0\.zarr \(shard 0/2\) of 2"),
        ([p0, make("whole.zarr")], r"whole\.zarr was captured without --shard.*solve it directly"),
    ]
    for paths, match in cases:
        with pytest.raises(CoalaError, match=match):
            merge_shards(out, paths)
        assert not out.exists()


def test_unreduced_or_differently_reduced_shards_are_refused(make, tmp_path):
    p0 = make("p0.zarr", "0/2")
    with pytest.raises(StoreError, match=r"raw1\.zarr \(shard 1/2\): input '.*' is not started "
                                         r"in reduce; run `coala-stream reduce .*raw1\.zarr`"):
        merge_shards(tmp_path / "m.zarr", [p0, make("raw1.zarr", "1/2", reduce=False)])
    f64 = make("f64.zarr", "1/2", reduce_dtype="float64")
    with pytest.raises(StoreError, match=r"f64\.zarr \(shard 1/2\) reduced input '.*' with "
                                         r"\{'dtype': 'float64'.*\{'dtype': 'float32'.*same --dtype"):
        merge_shards(tmp_path / "m.zarr", [p0, f64])
    half = _edit(make("p1.zarr", "1/2"), tmp_path / "half.zarr", ("capture", "complete"), False)
    with pytest.raises(StoreError, match=r"half\.zarr \(shard 1/2\): its capture is interrupted; "
                                         r"finish it .*--shard 1/2"):
        merge_shards(tmp_path / "m.zarr", [p0, half])


def test_out_is_never_a_shard_and_replaced_only_with_overwrite(make, merged, tmp_path):
    p0, p1 = make("p0.zarr", "0/2"), make("p1.zarr", "1/2")
    with pytest.raises(UsageError, match="is one of the shards"):
        merge_shards(p0, [p0, p1], overwrite=True)
    with pytest.raises(UsageError, match="always a Zarr directory"):
        merge_shards(tmp_path / "m.h5", [p0, p1])
    with pytest.raises(StoreError, match=r"itself a merged store"):
        merge_shards(tmp_path / "mm.zarr", [merged])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        merge_shards(junk, [p0, p1], overwrite=True)
    assert (junk / "keep.txt").read_text() == "mine"
    out = tmp_path / "m.zarr"
    merge_shards(out, [p0, p1])
    with open_store(out) as s:
        first = s.attrs["uuid"]
    with pytest.raises(StoreError, match="already exists.*--overwrite"):
        merge_shards(out, [p0, p1])
    merge_shards(out, [p0, p1], overwrite=True)
    with open_store(out) as s:
        assert s.attrs["uuid"] != first and s.attrs["capture"]["complete"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_merged_store_has_nothing_to_fold_and_keeps_its_results(merged, tmp_path, capsys):
    before = {n: r.R.clone() for n, r in _results(merged).items()}
    assert main(["reduce", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "8 skipped" in out and "merged from 2 shards" in out and "nothing to fold" in out
    assert main(["reduce", str(merged), "--dtype", "float64"]) == 0  # no settings to match
    assert main(["reduce", str(merged), "--restart"]) == 2
    assert "--restart would only delete its R's" in capsys.readouterr().err
    after = _results(merged)
    assert all(torch.equal(after[n].R, before[n]) for n in before)
    assert main(["status", str(merged)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"merged +from 2 shards by coala-stream merge.*no activations", text), text
    assert "complete 8" in text


def test_a_capture_never_resumes_or_reuses_a_merged_store(merged, tiny_model_dir, text_file,
                                                          tmp_path):
    copy = tmp_path / "m.zarr"
    shutil.copytree(merged, copy)
    cfg = CaptureConfig(out=str(copy), model=str(tiny_model_dir("float32")), data=str(text_file),
                        **SMALL)
    with pytest.raises(StoreError, match=r"made by coala-stream merge from shards: store has 2"):
        run_capture(cfg, progress=False)


def test_a_merged_store_missing_a_result_says_to_merge_again(merged, tmp_path, capsys):
    copy = tmp_path / "m.zarr"
    shutil.copytree(merged, copy)
    with open_store(copy) as s:
        name = s.inputs[0]
        result_path(s, name).unlink()
    assert main(["solve", str(copy), "--ratio", "0.2", "--out", str(tmp_path / "o")]) == 1
    assert "run `coala-stream merge` again" in capsys.readouterr().err
    assert main(["reduce", str(copy)]) == 1  # never folds 0 rows into an empty R
    assert "run `coala-stream merge` again" in capsys.readouterr().err


def test_cli_capture_shards_reduce_merge_solve(tiny_model_dir, text_file, tmp_path, capsys):
    model = str(tiny_model_dir("float32"))
    args = [model, "--data", str(text_file), "--samples", "6", "--seq-len", "32",
            "--chunk-tokens", "64"]
    parts = []
    for i in range(2):
        parts.append(str(tmp_path / f"part{i}.zarr"))
        assert main(["capture", *args, "--shard", f"{i}/2", "--out", parts[-1]]) == 0
        assert "6 samples" not in capsys.readouterr().out  # each part has 3
        assert main(["reduce", parts[-1]]) == 0
    assert main(["status", parts[1]]) == 0
    assert "part 1/2 (--shard): samples 3 to 6 of 6" in capsys.readouterr().out
    m = str(tmp_path / "m.zarr")
    assert main(["merge", "--out", m, *parts]) == 0
    out = capsys.readouterr().out
    assert "8 inputs merged from 2 shards (6 samples, 192 tokens per input" in out
    assert f"next: coala-stream solve {m}" in out
    assert main(["capture", *args, "--out", str(tmp_path / "whole.zarr")]) == 0
    assert main(["reduce", str(tmp_path / "whole.zarr")]) == 0
    reports = {}
    for name, store in (("merged", m), ("whole", str(tmp_path / "whole.zarr"))):
        assert main(["solve", store, "--ratio", "0.3", "--json", "--quiet",
                     "--out", str(tmp_path / f"out-{name}")]) == 0
        import json

        reports[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got, want = (reports[k]["layers"] for k in ("merged", "whole"))
    assert [l["module"] for l in got] == [l["module"] for l in want] and got
    for g, w in zip(got, want):
        assert g["rank"] == w["rank"]
        assert abs(g["rel_error"] - w["rel_error"]) <= 1e-4 * max(w["rel_error"], 1e-3), g["module"]
    assert main(["merge", "--out", str(tmp_path / "x.zarr"), parts[0]]) == 1
    err = capsys.readouterr().err
    assert "shard 1/2 missing" in err and "Traceback" not in err


def test_hdf5_and_zarr_parts_merge_alike(make, tmp_path):
    h5 = make("p1.h5", "1/2")
    out = tmp_path / "m.zarr"
    merge_shards(out, [make("p0.zarr", "0/2"), h5])
    want = _results(make("whole.zarr"))
    for name, g in _results(out).items():
        assert _rel(_gram(g.R), _gram(want[name].R)) < 1e-5, name


def test_solve_refuses_one_part_unless_allow_incomplete(make, tmp_path, capsys):
    part = str(make("p0.zarr", "0/2"))
    assert main(["solve", part, "--ratio", "0.3", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "holds part 0/2 of the calibration (capture --shard); merge the reduced parts" in err
    assert not (tmp_path / "o").exists()
    assert main(["solve", part, "--ratio", "0.3", "--allow-incomplete", "--quiet",
                 "--out", str(tmp_path / "o")]) == 0
    assert "fitted to that part only" in (tmp_path / "o" / "solve_report.json").read_text()


def test_a_part_resumes_only_as_the_same_part(make, tiny_model_dir, text_file, tmp_path, capsys):
    p0 = make("p0.zarr", "0/2")
    args = [str(tiny_model_dir("float32")), "--data", str(text_file), "--samples", "6",
            "--seq-len", "32", "--chunk-tokens", "64", "--out", str(p0)]
    assert main(["capture", *args, "--shard", "0/2"]) == 0
    assert "already complete (3 samples" in capsys.readouterr().out
    assert main(["capture", *args, "--shard", "1/2"]) == 1
    assert "--shard: store has [0, 2], this run asks for [1, 2]" in capsys.readouterr().err
    assert main(["capture", *args]) == 1
    assert "--shard: store has [0, 2], this run asks for None" in capsys.readouterr().err
    assert main(["capture", *args[:-1], str(tmp_path / "s.zarr"), "--shard", "0/2",
                 "--sequential"]) == 2
    assert "--shard with --sequential is not supported" in capsys.readouterr().err
