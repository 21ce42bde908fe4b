"""--allocate loss: the component scores, the selection rules, the gradient pass and the CLI.

Invariants: the first-order score of dropping a component is the derivative of the
calibration loss along that drop (float64 central differences on a tiny model); the
gradient pass gives the same numbers from the store's own windows; both selection rules
meet uniform's parameter budget without exceeding it and keep a layer dense when its
rank would not save parameters; a killed gradient pass resumes; the CLI writes the ranks
it chose and the scores into solve_report.json.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from coala_stream import checkpoint
from coala_stream.cli import main
from coala_stream.errors import CheckpointMismatch, UsageError
from coala_stream.models import ModelSpec, load_config
from coala_stream.reduce import read_result
from coala_stream.scores import (components, drop_projections, dropped_weight, loss_estimates,
                                 position_fisher)
from coala_stream.solve import SolveConfig, plan_layers, run_solve
from coala_stream.solve import gradients
from coala_stream.solve.select import layer_cost, select_ranks
from coala_stream.store import open_store

from .test_capture import text_file  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir()


@pytest.fixture(scope="module")
def store(base, tmp_path_factory):
    from coala_stream.capture import CaptureConfig, run_capture
    from coala_stream.reduce import ReduceConfig, run_reduce

    out = tmp_path_factory.mktemp("loss") / "calib.zarr"
    run_capture(CaptureConfig(out=str(out), model=str(base), samples=4, seq_len=48, device="cpu"),
                progress=False)
    run_reduce(out, ReduceConfig(device="cpu"), progress=False)
    return out


def window_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean over windows of each window's mean next-token cross entropy (the pass's loss)."""
    losses = []
    for w in range(ids.shape[0]):
        logits = model(ids[w:w + 1]).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, ids[w, 1:]))
    return torch.stack(losses).mean()


def derivative(model, lin, W, U, drop, ids, size=0.05):
    """d/dt L(W + t sum_{i in drop} D_i) at t = 0: central differences in float64 with a step
    of Frobenius norm ``size`` and one Richardson step (error O(size^4)). Transformers'
    RMSNorm rounds through float32 even in a float64 model, so a tiny step would measure
    rounding; this one is large enough for that and small enough for the curvature."""
    t = size / float(torch.linalg.norm(dropped_weight(W, U, drop) - W))

    def central(h):
        with torch.no_grad():
            lin.weight.copy_(dropped_weight(W, U, drop, h))
            up = window_loss(model, ids)
            lin.weight.copy_(dropped_weight(W, U, drop, -h))
            down = window_loss(model, ids)
            lin.weight.copy_(W)
        return float(up - down) / (2 * h)

    return (4 * central(t) - central(2 * t)) / 3


def test_first_order_score_is_the_derivative_along_the_drop(base):
    """Central differences in float64 of L(W + t D_i) agree with -u_i^T G W^T u_i."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    lin = model.model.layers[1].mlp.down_proj  # 64 x 160
    W = lin.weight.detach().clone()
    X = torch.randn(40, W.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    X[:, :5] *= 1e-6  # ill-conditioned inputs: nothing is inverted, so nothing breaks
    R = torch.linalg.qr(X, mode="r")[1]
    U, S, UtW = components(W, R)
    lin.weight.requires_grad_(True)
    window_loss(model, ids).backward()
    first = drop_projections(U, UtW, lin.weight.grad)
    lin.weight.requires_grad_(False)
    scale = float(first.abs().max())
    for drop in ([0], [7], [31], [39], [3, 9]):  # the first order is additive over drops
        predicted = float(first[drop].sum())
        assert derivative(model, lin, W, U, drop, ids) == pytest.approx(predicted, rel=1e-3,
                                                                         abs=1e-4 * scale)


def test_loss_estimates_are_the_mean_and_the_empirical_fishers():
    P = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    first, window, token = loss_estimates(P, torch.tensor([[4.0, 0.0], [2.0, 6.0]]))
    assert first.tolist() == [2.0, -1.0]
    assert window.tolist() == [0.5 * 5.0, 0.5 * 2.0]
    assert token.tolist() == [1.5, 1.5]


def test_position_fisher_is_the_per_token_fisher_along_each_drop():
    """positions * sum_t (dy_t^T D_i x_t)^2, each D_i formed explicitly, in float64."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 9, dtype=torch.float64, generator=g)
    X = torch.randn(5, 9, dtype=torch.float64, generator=g)
    dY = torch.randn(5, 6, dtype=torch.float64, generator=g)
    R = torch.linalg.qr(torch.randn(20, 9, dtype=torch.float64, generator=g), mode="r")[1]
    U, _, UtW = components(W, R)
    got = position_fisher(U, UtW, X, dY, positions=4)
    for i in range(U.shape[1]):
        D = dropped_weight(W, U, [i]) - W
        want = 4 * sum(float(dY[t] @ D @ X[t]) ** 2 for t in range(5))
        assert float(got[i]) == pytest.approx(want, rel=1e-10)


def test_the_gradient_pass_matches_float64_differences_on_the_stores_windows(base, store, tmp_path):
    spec, config = ModelSpec.from_args(str(base), None), load_config(ModelSpec.from_args(str(base), None))
    with open_store(store) as st:
        layers = plan_layers(st, config, r"layers\.0\.self_attn\.q_proj|layers\.1\.mlp\.up_proj")
        scores = gradients.component_scores(st, spec, config, layers, torch.device("cpu"), tmp_path,
                                            progress=False, say=lambda m: None)
        ids = gradients.calibration_ids(st, spec, config)
        R = read_result(st, layers[1].input).R
    assert ids.shape == (4, 48)
    S, P, Q = scores[layers[1].name]
    assert P.shape == Q.shape == (4, S.shape[0]) and bool((Q >= 0).all())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    lin = model.get_submodule(layers[1].name)
    W = lin.weight.detach().clone()
    U, S64, _ = components(W, R.to(torch.float64))
    assert torch.allclose(S.double(), S64, rtol=1e-4)
    first = loss_estimates(P)[0]
    for i in (0, 20):
        # float32 pass vs float64 differences (a component's sign is the SVD's, the score is not)
        assert derivative(model, lin, W, U, [i], ids) == pytest.approx(float(first[i]), rel=1e-3,
                                                                        abs=1e-7)


def _check_budget(ranks, shapes, deltas, budget, spent):
    assert spent == sum(layer_cost(r, m, n) for r, (m, n) in zip(ranks, shapes)) <= budget
    # nothing more fits: every component that could be given back costs more than is left
    for r, (m, n), d in zip(ranks, shapes, deltas):
        if r < len(d):
            assert layer_cost(r + 1, m, n) - layer_cost(r, m, n) > budget - spent


@pytest.mark.parametrize("rule", ["zerosum", "smallest"])
@pytest.mark.parametrize("seed", range(4))
def test_selection_meets_the_budget_and_never_exceeds_it(rule, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (16, 16), (40, 16), (16, 48), (8, 8)]
    deltas = [torch.randn(min(m, n), generator=g) for m, n in shapes]
    for ratio in (0.1, 0.3, 0.6):
        budget = sum(max(1, int((1 - ratio) * m * n / (m + n))) * (m + n) for m, n in shapes)
        ranks, info = select_ranks(deltas, shapes, budget, rule)
        assert all(1 <= r <= len(d) for r, d in zip(ranks, deltas))
        _check_budget(ranks, shapes, deltas, budget, info["spent"])
        assert info["budget"] == budget


def test_a_layer_too_costly_to_drop_stays_dense_past_break_even():
    """Layer 0's components all predict a large loss increase: it keeps every one of them,
    which is past its break-even rank, so it stays dense; the others pay the budget."""
    shapes = [(16, 16), (16, 16), (16, 16)]
    deltas = [torch.full((16,), 10.0), torch.linspace(-0.1, 0.1, 16), torch.linspace(-0.2, 0.2, 16)]
    budget = 16 * 16 + 2 * 4 * 32
    for rule in ("zerosum", "smallest"):
        ranks, info = select_ranks(deltas, shapes, budget, rule)
        assert ranks[0] * 32 >= 256  # dense: counted as m n
        assert info["spent"] <= budget
        _check_budget(ranks, shapes, deltas, budget, info["spent"])
        assert ranks[1] + ranks[2] == 8


def test_zero_sum_alternates_signs_and_smallest_takes_the_most_negative_first():
    shapes = [(4, 4), (4, 4)]  # break-even rank 1: every drop below 2 saves 8
    # tails: layer 0 drops +1 then +1 ..., layer 1 drops -3 then -3 ...
    deltas = [torch.tensor([5.0, 1.0, 1.0, 1.0]), torch.tensor([5.0, -3.0, -3.0, -3.0])]
    ranks, info = select_ranks(deltas, shapes, 16, "zerosum")
    assert ranks == [1, 1]
    # zero-sum from 0: a positive first (+1), then the negative (-3), then +1, +1, -3, -3
    ranks, info = select_ranks(deltas, shapes, 16 + 8, "zerosum")
    assert info["spent"] <= 24
    smallest, _ = select_ranks(deltas, shapes, 16 + 8, "smallest")
    # smallest: layer 1's negative tail goes first, down to rank 1; layer 0 stays dense
    assert smallest == [4, 1]
    # zero-sum: +1, -3, +1, +1 (layer 0 reaches rank 1); layer 1 is left past break-even,
    # so it stays dense and gets its dropped component back
    assert ranks == [1, 4] and info["predicted_loss_change"] == 3.0


def test_a_budget_below_rank_one_everywhere_is_refused():
    with pytest.raises(UsageError, match="rank 1"):
        select_ranks([torch.zeros(4)], [(4, 4)], 7, "zerosum")
    with pytest.raises(UsageError, match="--selection"):
        select_ranks([torch.zeros(4)], [(4, 4)], 16, "nearest")


def test_loss_options_without_allocate_loss_are_refused():
    with pytest.raises(UsageError, match="--allocate loss"):
        SolveConfig(out="x", ratio=0.2, selection="smallest").validate()
    with pytest.raises(UsageError, match="peft"):
        SolveConfig(out="x", ratio=0.2, allocate="loss", format="peft").validate()


def test_a_killed_gradient_pass_resumes_and_gives_the_same_scores(base, store, tmp_path, monkeypatch):
    spec = ModelSpec.from_args(str(base), None)
    config = load_config(spec)
    quiet = dict(progress=False, say=lambda m: None)
    with open_store(store) as st:
        layers = plan_layers(st, config, r"layers\.1\.")
        whole = gradients.component_scores(st, spec, config, layers, torch.device("cpu"),
                                           tmp_path / "a", by_block=False, **quiet)
        real, calls = gradients._window_projections, []

        def dies_after_two(*args):
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")  # after two windows were saved
            calls.append(1)
            return real(*args)

        monkeypatch.setattr(gradients, "_window_projections", dies_after_two)
        with pytest.raises(KeyboardInterrupt):
            gradients.component_scores(st, spec, config, layers, torch.device("cpu"),
                                       tmp_path / "b", by_block=False, **quiet)
        assert checkpoint.load_meta(tmp_path / "b" / gradients.SCORES_FILE)["windows_done"] == 2
        monkeypatch.setattr(gradients, "_window_projections", real)
        resumed = gradients.component_scores(st, spec, config, layers, torch.device("cpu"),
                                             tmp_path / "b", by_block=False, **quiet)
        for name in whole:
            for part in (1, 2):
                assert torch.allclose(whole[name][part], resumed[name][part], rtol=1e-5, atol=1e-9)
        other = plan_layers(st, config, r"layers\.0\.")
        with pytest.raises(CheckpointMismatch, match="another"):
            gradients.component_scores(st, spec, config, other, torch.device("cpu"),
                                       tmp_path / "b", by_block=False, **quiet)


def test_cli_solve_allocate_loss_end_to_end(store, tmp_path, capsys):
    uniform = run_solve(store, SolveConfig(out=str(tmp_path / "u"), ratio=0.3), progress=False)
    out = tmp_path / "z"
    assert main(["solve", str(store), "--ratio", "0.3", "--allocate", "loss", "--out", str(out),
                 "--threads", "1", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "solve_report.json").read_text())
    alloc = saved["allocation"]
    assert alloc["allocate"] == "loss" and alloc["selection"] == "zerosum"
    assert alloc["spent"] <= alloc["budget"] == uniform["totals"]["params_after"]
    assert saved["totals"]["params_after"] == alloc["spent"]
    assert [r["rank"] for r in saved["layers"]] == [l["rank"] for l in alloc["layers"]]
    assert all(len(l["first_order"]) == len(l["singular_values"]) for l in alloc["layers"])
    assert report["allocation"]["windows"] == 4
    assert (tmp_path / "z.scores" / gradients.SCORES_FILE).exists()
    # the smallest-first rule reuses the saved scores and spends the same budget
    out2 = tmp_path / "s"
    assert main(["solve", str(store), "--ratio", "0.3", "--allocate", "loss", "--selection",
                 "smallest", "--scores", str(tmp_path / "z.scores"), "--out", str(out2),
                 "--threads", "1", "--quiet"]) == 0
    alloc2 = json.loads((out2 / "solve_report.json").read_text())["allocation"]
    assert alloc2["selection"] == "smallest" and alloc2["spent"] <= alloc2["budget"]
    assert alloc2["layers"][0]["first_order"] == \
        alloc["layers"][0]["first_order"]


def test_compress_allocate_loss_feeds_its_ranks_to_the_propagating_capture(tiny_model_dir,
                                                                          text_file, tmp_path,
                                                                          capsys):
    # through the CLI: its table reads the final solve's allocation (the applied factors')
    assert main(["compress", str(tiny_model_dir()), "--out", str(tmp_path / "c"), "--data",
                 str(text_file), "--samples", "6", "--seq-len", "32", "--ratio", "0.3",
                 "--allocate", "loss", "--refine-steps", "0", "--keep-work", "--json",
                 "--quiet", "--threads", "1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert main(["compress", str(tiny_model_dir()), "--out", str(tmp_path / "c"), "--data",
                 str(text_file), "--samples", "6", "--seq-len", "32", "--ratio", "0.3",
                 "--allocate", "loss", "--refine-steps", "0", "--keep-work", "--quiet",
                 "--threads", "1"]) == 0  # the table of a finished run, no traceback
    assert "allocation loss" in capsys.readouterr().out
    ranks = json.loads((tmp_path / "c.work" / "ranks.json").read_text())
    assert ranks["allocation"]["allocate"] == "loss" == s["steps"]["allocation"]["allocate"]
    chosen = {r["module"]: r["rank"] for r in ranks["layers"] if not r["kept_dense"]}
    report = s["report"]
    assert {r["module"]: r["rank"] for r in report["layers"] if not r["kept_dense"]} == chosen
    assert any("factors as the propagating capture applied them" in n for n in report["notes"])
    assert (tmp_path / "c.work" / "stage.scores" / gradients.SCORES_FILE).exists()


@pytest.mark.slow
def test_kill_9_in_the_gradient_pass_then_rerun_equals_uninterrupted(tiny_model_dir, tmp_path):
    """A real SIGKILL (no handler runs) while `solve --allocate loss` is in its gradient pass
    (block by block, four blocks): the rerun goes on after the saved blocks and writes the
    ranks of an uninterrupted run, the scores equal to float32 rounding."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from coala_stream.capture import CaptureConfig, run_capture
    from coala_stream.reduce import ReduceConfig, run_reduce
    from coala_stream.solve import blockgrad

    model = tiny_model_dir(num_hidden_layers=4)
    store = tmp_path / "calib.zarr"
    run_capture(CaptureConfig(out=str(store), model=str(model), samples=40, seq_len=48,
                              device="cpu"), progress=False)
    run_reduce(store, ReduceConfig(device="cpu"), progress=False)
    args = lambda scores, out: ["solve", str(store), "--ratio", "0.3", "--allocate", "loss",
                                "--scores", str(scores), "--out", str(out), "--threads", "1",
                                "--quiet", "--json"]
    assert main(args(tmp_path / "s-ref", tmp_path / "ref")) == 0
    scores_file = tmp_path / "s-killed" / gradients.SCORES_FILE
    code = "import sys; from coala_stream.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args(tmp_path / "s-killed",
                                                                tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def done():
        try:
            meta = checkpoint.load_meta(scores_file)
        except Exception:  # not written yet, or being replaced
            return 0
        return int(meta["blocks_done"]) if meta.get("format") == blockgrad.FORMAT else 99

    deadline = time.monotonic() + 120
    while done() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert 1 <= done() < 4, "the kill came too late"
    assert not (tmp_path / "killed").exists()
    assert main(args(tmp_path / "s-killed", tmp_path / "killed")) == 0
    ref = json.loads((tmp_path / "ref" / "solve_report.json").read_text())
    got = json.loads((tmp_path / "killed" / "solve_report.json").read_text())
    assert [r["rank"] for r in got["layers"]] == [r["rank"] for r in ref["layers"]]
    a = checkpoint.load_state(tmp_path / "s-ref" / gradients.SCORES_FILE)[0]
    b = checkpoint.load_state(scores_file)[0]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-9), key


def test_the_gradient_pass_says_what_memory_it_needs(base, store, monkeypatch):
    """One line before the pass: the float32 model, the gradients and the components, and a
    warning when a CPU has less available."""
    spec = ModelSpec.from_args(str(base), None)
    config = load_config(spec)
    with open_store(store) as st:
        layers = plan_layers(st, config, r"layers\.1\.")
    need = gradients.memory_bytes(config, layers)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    assert need["model"] == 4 * params
    assert need["gradients"] == 4 * sum(l.m * l.n for l in layers)
    assert need["components"] == 4 * sum(min(l.m, l.n) * (l.m + l.n) for l in layers)
    note = gradients.memory_note(config, layers, "cpu")
    assert note.startswith("loss scores: the gradient pass holds") and "\n" not in note
    monkeypatch.setattr(gradients, "_available_bytes", lambda: 1024)
    assert "only 0.0 GiB are available now" in gradients.memory_note(config, layers, "cpu")



def test_the_block_by_block_pass_gives_the_whole_model_scores(base, store, tmp_path, monkeypatch):
    """`blockgrad`: one block at a time, no weight gradient, the same projections and Fisher
    terms as the whole-model pass (float32 rounding), for layers of every block and of one
    block only (the gradient then crosses the blocks above unscored); an interruption after a
    block resumes there and ends with the same scores."""
    from coala_stream.solve import blockgrad

    spec = ModelSpec.from_args(str(base), None)
    config = load_config(spec)
    quiet = dict(progress=False, say=lambda m: None)
    assert blockgrad.usable(spec, config)
    with open_store(store) as st:
        for pattern, tag in ((None, "all"), (r"layers\.0\.", "first")):
            layers = plan_layers(st, config, pattern)
            whole = gradients.component_scores(st, spec, config, layers, "cpu", tmp_path / f"w{tag}",
                                               by_block=False, **quiet)
            blocks = gradients.component_scores(st, spec, config, layers, "cpu",
                                                tmp_path / f"b{tag}", **quiet)
            assert whole.keys() == blocks.keys()
            for name in whole:
                assert torch.equal(whole[name][0], blocks[name][0])  # S: the same SVD
                for part in (1, 2):
                    a, b = whole[name][part], blocks[name][part]
                    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max())), name
            # a finished block-by-block file is the whole-model pass's format: reused by either
            again = gradients.component_scores(st, spec, config, layers, "cpu", tmp_path / f"b{tag}",
                                               by_block=False, **quiet)
            assert all(torch.equal(again[n][1], blocks[n][1]) for n in blocks)
        layers = plan_layers(st, config, None)
        real, calls = blockgrad._block_backward, []

        def dies_after_one(bm, k, *a):
            if calls:
                raise KeyboardInterrupt("killed")
            calls.append(k)
            return real(bm, k, *a)

        monkeypatch.setattr(blockgrad, "_block_backward", dies_after_one)
        with pytest.raises(KeyboardInterrupt):
            gradients.component_scores(st, spec, config, layers, "cpu", tmp_path / "r", **quiet)
        meta = checkpoint.load_meta(tmp_path / "r" / gradients.SCORES_FILE)
        assert meta["format"] == blockgrad.FORMAT and meta["blocks_done"] == 1
        monkeypatch.setattr(blockgrad, "_block_backward", real)
        resumed = gradients.component_scores(st, spec, config, layers, "cpu", tmp_path / "r",
                                             **quiet)
        ref = gradients.component_scores(st, spec, config, layers, "cpu", tmp_path / "ball",
                                         **quiet)
        for name in ref:
            for part in (1, 2):
                assert torch.allclose(ref[name][part], resumed[name][part], rtol=1e-5,
                                      atol=1e-9), name
