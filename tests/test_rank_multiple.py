"""--rank-multiple N: every rank rounded down to a multiple of N after the allocation, never
over the parameter budget; N = 1 changes nothing; compress and the propagating capture pass
it on, and solve reuses a propagated store's factors only when N matches."""

from __future__ import annotations

import json

import pytest

from coala_stream.cli import main
from coala_stream.compress import CompressConfig
from coala_stream.errors import UsageError
from coala_stream.linalg import rank_for_ratio
from coala_stream.sequential import SequentialConfig
from coala_stream.sequential import run as run_capture
from coala_stream.solve import Layer, SolveConfig, round_ranks, run_solve

from .test_capture import SMALL, text_file  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATIO = 0.3  # tiny Llama at 0.3: q/o 22, k/v 14, gate/up/down 32: some multiples of 8, some not


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    from coala_stream.capture import CaptureConfig, run_capture as plain_capture
    from coala_stream.reduce import ReduceConfig, run_reduce

    out = tmp_path_factory.mktemp("multiple") / "calib.zarr"
    plain_capture(CaptureConfig(out=str(out), model=str(tiny_model_dir()), samples=4, seq_len=64,
                                device="cpu"), progress=False)
    run_reduce(out, ReduceConfig(device="cpu"), progress=False)
    return out


def solve(store, out, **settings):
    return run_solve(store, SolveConfig(out=str(out), format="dense", **settings), progress=False)


def test_round_ranks_rounds_down_and_keeps_ranks_below_the_multiple():
    layers = [Layer(f"l{i}", "x", 64, 64) for i in range(5)]
    for layer, r in zip(layers, [3, 8, 15, 17, 40]):
        layer.rank = r
    round_ranks(layers, 8)
    assert [l.rank for l in layers] == [3, 8, 8, 16, 40]
    round_ranks(layers, 1)
    assert [l.rank for l in layers] == [3, 8, 8, 16, 40]


@pytest.mark.parametrize("allocate", ["uniform", "global"])
def test_ranks_are_multiples_and_the_budget_is_never_exceeded(store, tmp_path, allocate):
    plain = solve(store, tmp_path / "plain", ratio=RATIO, allocate=allocate)
    rounded = solve(store, tmp_path / "rounded", ratio=RATIO, allocate=allocate, rank_multiple=8)
    shapes = [tuple(r["shape"]) for r in rounded["layers"]]
    budget = sum(rank_for_ratio(m, n, RATIO) * (m + n) for m, n in shapes)  # what the ratio gives
    ranks = [r["rank"] for r in rounded["layers"]]
    before = [r["rank"] for r in plain["layers"]]
    assert all(r % 8 == 0 for r in ranks)  # every rank here is >= 8 before rounding
    assert ranks == [b - b % 8 for b in before]  # rounded down from the same allocation
    assert ranks != before  # the test has something to round
    assert sum(r * (m + n) for r, (m, n) in zip(ranks, shapes)) <= budget
    assert rounded["totals"]["params_after"] <= plain["totals"]["params_after"]
    if allocate == "uniform":  # and per layer, each within its own share of the ratio
        assert all(r * (m + n) <= (1 - RATIO) * m * n for r, (m, n) in zip(ranks, shapes))
    assert rounded["allocation"]["rank_multiple"] == 8
    assert rounded["allocation"]["spent_after_rounding"] == sum(
        r["rank"] * sum(r["shape"]) for r in rounded["layers"] if not r["kept_dense"])
    section = json.loads((tmp_path / "rounded" / "config.json").read_text())["coala_stream"]
    assert section["rank_multiple"] == 8


def test_multiple_one_changes_nothing(store, tmp_path):
    default = solve(store, tmp_path / "a", ratio=RATIO)
    one = solve(store, tmp_path / "b", ratio=RATIO, rank_multiple=1)
    assert [r["rank"] for r in one["layers"]] == [r["rank"] for r in default["layers"]]
    assert [r["rel_error"] for r in one["layers"]] == [r["rel_error"] for r in default["layers"]]
    assert "rank_multiple" not in one["allocation"]


def test_a_fixed_rank_is_rounded_too(store, tmp_path):
    report = solve(store, tmp_path / "r", rank=13, rank_multiple=4)
    assert {r["rank"] for r in report["layers"]} == {12}


@pytest.mark.parametrize("value", [0, -8, True, 2.5])
def test_bad_multiples_are_usage_errors(value):
    with pytest.raises(UsageError, match="--rank-multiple"):
        SolveConfig(out="x", ratio=0.2, rank_multiple=value).validate()


def test_cli_refuses_zero_and_needs_propagate_for_the_capture(store, tmp_path, capsys):
    assert main(["solve", str(store), "--out", str(tmp_path / "o"), "--quiet", "--ratio", "0.2",
                 "--rank-multiple", "0"]) == 2
    assert "--rank-multiple" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--rank-multiple"):
        SequentialConfig(out="x", rank_multiple=8).propagate_settings()


def test_compress_and_the_capture_pass_it_on(tmp_path):
    config = CompressConfig(out=str(tmp_path / "o"), rank_multiple=8)
    assert config.solve("-").rank_multiple == 8
    assert config.capture(tmp_path / "p.zarr", True).rank_multiple == 8
    settings = SequentialConfig(out="x", sequential=True, propagate=True, ratio=0.2,
                                rank_multiple=8).propagate_settings()
    assert settings["rank_multiple"] == 8
    # absent at 1: the settings of stores made before the option still match on resume
    assert "rank_multiple" not in SequentialConfig(out="x", sequential=True, propagate=True,
                                                   ratio=0.2).propagate_settings()


def test_propagated_store_keeps_its_rounded_ranks_and_solve_matches_them(tiny_model_dir, text_file,
                                                                          tmp_path):
    out = tmp_path / "prop.zarr"
    run_capture(SequentialConfig(out=str(out), model=str(tiny_model_dir()), data=str(text_file),
                                 **{**SMALL, "sequential": True, "propagate": True, "ratio": RATIO,
                                    "rank_multiple": 8}), progress=False)
    same = solve(out, tmp_path / "same", ratio=RATIO, rank_multiple=8)
    assert any("as the propagating capture applied them" in n for n in same["notes"])
    assert all(r["rank"] % 8 == 0 for r in same["layers"])
    other = solve(out, tmp_path / "other", ratio=RATIO)  # not the capture's rounding: refitted
    assert any("rank_multiple 8 -> 1" in n for n in other["notes"])
    assert [r["rank"] for r in other["layers"]] != [r["rank"] for r in same["layers"]]


def test_compress_with_global_allocation_writes_the_rounded_ranks_it_applied(tiny_model_dir,
                                                                           text_file, tmp_path):
    """compress --allocate global --rank-multiple 8: the allocation is rounded before the
    propagating capture, which applies those ranks, and the final solve writes its factors."""
    from coala_stream.compress import run_compress

    summary = run_compress(CompressConfig(out=str(tmp_path / "m"), model=str(tiny_model_dir()),
                                          data=str(text_file), samples=6, seq_len=32, ratio=RATIO,
                                          allocate="global", rank_multiple=8, refine_steps=0),
                           progress=False)
    report = summary["report"]
    assert any("as the propagating capture applied them" in n for n in report["notes"])
    assert all(r["rank"] % 8 == 0 for r in report["layers"] if not r["kept_dense"])
    shapes = [tuple(r["shape"]) for r in report["layers"]]
    budget = sum(rank_for_ratio(m, n, RATIO) * (m + n) for m, n in shapes)
    assert report["totals"]["params_after"] <= budget
