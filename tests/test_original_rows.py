"""The original block's rows kept from one pass per block (issue 25, `sequential.original`):
the store, reduce results and factors are bit-identical to the per-group passes', and the
original block runs once per batch instead of once per group and once more."""

from __future__ import annotations

import importlib

import pytest
import torch

from coala_stream.reduce import read_result
from coala_stream.sequential import run as run_capture
from coala_stream.store import open_store

from .test_capture import assert_same_store, text_file  # noqa: F401
from .test_propagate import LAYERS3, OUTPUT, _factors, config

original = importlib.import_module("coala_stream.sequential.original")
seq_propagate = importlib.import_module("coala_stream.sequential.propagate")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kept_rows_give_the_same_bits_as_the_per_group_passes(tiny_model_dir, text_file,
                                                               tmp_path, monkeypatch):
    model_dir = tiny_model_dir("float32", **LAYERS3)
    fills = []
    real_fill = original.OriginalRows.fill

    def counting(self, *a, **kw):
        fills.append(a[2])  # the group whose pass fills the rows
        outputs.append((a[2].split(".")[2], a[5]))  # (block, whether its output is kept)
        return real_fill(self, *a, **kw)

    outputs = []

    monkeypatch.setattr(original.OriginalRows, "fill", counting)
    written = []
    real_write = seq_propagate.write_kept
    monkeypatch.setattr(seq_propagate, "write_kept",
                        lambda *a: written.append(a[1]) or real_write(*a))
    kept, plain = tmp_path / "kept.zarr", tmp_path / "plain.zarr"
    s = run_capture(config(model_dir, kept, text_file, **OUTPUT), progress=False)["propagate"]
    assert 0 < s["reduce_cpu_seconds"] + s["solve_cpu_seconds"] < s["cpu_seconds"]  # CPU per step
    batches = len(fills)
    assert batches > 0 and len(set(fills)) == 3  # one filling group per block: its first
    # the last block's original output is never used without refinement: not computed
    assert {b: w for b, w in outputs} == {"0": True, "1": True, "2": False}
    assert written == [0, 1]  # the original outputs of blocks 0 and 1 (the last needs none)
    monkeypatch.setattr(original, "BUDGET", 0)  # nothing fits: the per-group passes
    fills.clear()
    run_capture(config(model_dir, plain, text_file, **OUTPUT), progress=False)
    assert fills == [] and written == [0, 1]
    assert_same_store(plain, kept)
    a, b = _factors(plain), _factors(kept)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    with open_store(plain) as p, open_store(kept) as k:
        for name in p.inputs:
            assert torch.equal(read_result(p, name).R, read_result(k, name).R), name
