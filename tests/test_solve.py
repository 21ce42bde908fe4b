"""solve end to end on a tiny random Llama: capture -> reduce -> solve -> load back.

Invariants: the dense checkpoint is vanilla and holds A B; the factorized model
gives the dense model's logits; the PEFT adapter reproduces the original
model; parameter counts follow the ratio; global allocation meets the budget
and the allocation's errors are those of the spectra; COALA's layer error
is never above SVD-LLM's on the same store and strictly below where the inputs
are ill-conditioned; errors leave nothing behind.
"""

from __future__ import annotations

import itertools
import math
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from coala_stream import export
from coala_stream.checkpoint import load_state, save_state
from coala_stream.cli import main
from coala_stream.errors import CheckpointMismatch, StoreError, UsageError
from coala_stream.linalg import coala_factors, coala_svd, fold_r, rank_for_ratio
from coala_stream.solve import (
    Layer,
    SolveConfig,
    allocate_global,
    choose_ranks,
    normalised_tail,
    run_solve,
    solve_layer,
    total_normalised_error,
    uniform_ranks,
)
from coala_stream.reduce import ReducedInput, read_result, result_path
from coala_stream.store import open_store

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_store(model_dir, out, samples=4, seq_len=64, reduce=True):
    from coala_stream.capture import CaptureConfig, run_capture
    from coala_stream.reduce import ReduceConfig, run_reduce

    run_capture(CaptureConfig(out=str(out), model=str(model_dir), samples=samples,
                              seq_len=seq_len, device="cpu"), progress=False)
    if reduce:
        run_reduce(out, ReduceConfig(device="cpu", with_gram=True), progress=False)
    return out


def solve(store, out, **settings):
    return run_solve(store, SolveConfig(out=str(out), **settings), progress=False)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir(tie_word_embeddings=True)


@pytest.fixture(scope="module")
def store(base, tmp_path_factory):
    return make_store(base, tmp_path_factory.mktemp("solve") / "calib.zarr")


@pytest.fixture(scope="module")
def ill_store(base, tmp_path_factory):
    """The same model with LLM-like embeddings: 4 massive directions over moderate ones
    (not axis-aligned), so every block's inputs have cond ~1e4..1e7 and float32 Gram
    matrices lose the moderate directions (tests/test_baselines.py, the same mechanism)."""
    root = tmp_path_factory.mktemp("ill")
    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    E = model.model.embed_tokens.weight
    U, _ = torch.linalg.qr(torch.randn(E.shape[0], E.shape[1], generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(E.shape[1], E.shape[1], generator=g, dtype=torch.float64))
    s = torch.logspace(0, -1, E.shape[1], dtype=torch.float64)
    s[:4] = 1e3
    with torch.no_grad():
        E.copy_(((U * s) @ V.T).float() * 10)
    model.save_pretrained(root / "model")
    for f in base.glob("tokenizer*"):
        shutil.copy(f, root / "model" / f.name)
    return make_store(root / "model", root / "calib.zarr")


@pytest.fixture(scope="module")
def formats(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {fmt: (root / fmt, solve(store, root / fmt, ratio=0.3, format=fmt))
            for fmt in ("factorized", "dense", "peft")}


def test_dense_is_vanilla_and_holds_the_factorized_product(formats):
    fac_dir, _ = formats["factorized"]
    dense_dir, report = formats["dense"]
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    modules = dict(dense.named_modules())
    tensors = load_file(fac_dir / export.SINGLE_FILE)
    for row in report["layers"]:
        name = row["module"]
        A, B = tensors[f"{name}.A.weight"], tensors[f"{name}.B.weight"]
        assert B.shape == (row["rank"], row["shape"][1])
        torch.testing.assert_close(modules[name].weight, A @ B, atol=1e-6, rtol=1e-5)
    fac = export.load_model(fac_dir)
    torch.testing.assert_close(logits(fac), logits(dense), atol=1e-5, rtol=1e-5)
    assert fac.lm_head.weight is fac.model.embed_tokens.weight
    assert json.loads((dense_dir / export.REPORT_FILE).read_text())["layers"] == report["layers"]


def test_parameter_counts_follow_the_ratio(base, formats):
    fac_dir, report = formats["factorized"]
    original = AutoModelForCausalLM.from_pretrained(base)
    fac = export.load_model(fac_dir)
    expect = sum(rank_for_ratio(m, n, 0.3) * (m + n) for m, n in (r["shape"] for r in report["layers"]))
    t = report["totals"]
    assert t["layers"] == 14 and t["kept_dense"] == 0 and t["params_after"] == expect
    assert 0.3 <= t["removed_fraction"] < 0.3 + 0.02
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(original) - count(fac) == t["params_before"] - t["params_after"]
    size = lambda d: (d / export.SINGLE_FILE).stat().st_size
    assert size(fac_dir) < size(base)


def test_peft_adapter_reproduces_the_original_logits(base, formats):
    peft = pytest.importorskip("peft")
    out, report = formats["peft"]
    original = AutoModelForCausalLM.from_pretrained(base)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"),
                                           out / "adapter")
    result = model.load_adapter(out / "adapter", adapter_name="check")
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(logits(model), logits(original), atol=1e-4, rtol=1e-4)
    cfg = json.loads((out / "adapter" / export.ADAPTER_CONFIG).read_text())
    ranks = {r["module"]: r["rank"] for r in report["layers"]}
    assert {name: cfg["rank_pattern"].get(name, cfg["r"]) for name in cfg["target_modules"]} == ranks
    # PiSSA-style balance: lora_B^T lora_B = lora_A lora_A^T = diag(S), not all scale in lora_A
    for lora in (m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A):
        a, b = lora.lora_A["default"].weight.double(), lora.lora_B["default"].weight.double()
        gram_b, gram_a = b.T @ b, a @ a.T
        torch.testing.assert_close(gram_b, gram_a, rtol=1e-4, atol=1e-5 * gram_a.diagonal().max().item())


def test_global_allocation_report_is_recomputed_from_the_spectra(base, store, tmp_path):
    """Every number of the allocation summary, recomputed here from W R^T's spectra (the
    source weights, the reduced R): the budget is uniform's, the greedy ranks are
    allocate_global's, both errors are the spectra's tails, and the label and the ranks
    written follow the comparison of the two."""
    report = solve(store, tmp_path / "g", ratio=0.3, allocate="global", format="dense")
    a, rows = report["allocation"], report["layers"]
    weights = load_file(base / "model.safetensors")
    with open_store(store) as s:
        input_of = {c: name for name in s.inputs for c in s.input(name).consumers}
        spectra = [coala_svd(weights[f"{r['module']}.weight"], read_result(s, input_of[r["module"]]).R)[1]
                   for r in rows]
    shapes = [tuple(r["shape"]) for r in rows]
    costs = [m + n for m, n in shapes]
    uniform = [rank_for_ratio(m, n, 0.3) for m, n in shapes]  # every one saves parameters at 0.3
    budget = sum(u * c for u, c in zip(uniform, costs))
    greedy = allocate_global(spectra, shapes, budget, [math.ceil(m * n / (m + n)) - 1 for m, n in shapes])
    err_u, err_g = total_normalised_error(spectra, uniform), total_normalised_error(spectra, greedy)
    assert (a["requested"], a["budget"]) == ("global", budget)
    assert a["uniform_total_normalised_error"] == pytest.approx(err_u, rel=1e-6)
    assert a["global_total_normalised_error"] == pytest.approx(err_g, rel=1e-6)
    assert a["allocate"] == ("global" if err_g < err_u else "uniform")
    chosen = greedy if a["allocate"] == "global" else uniform
    assert [r["rank"] for r in rows] == chosen
    assert a["total_normalised_error"] == pytest.approx(total_normalised_error(spectra, chosen), rel=1e-6)
    assert a["spent"] == sum(r * c for r, c in zip(chosen, costs)) <= budget
    if a["allocate"] == "global":
        assert a["budget"] - a["spent"] < min(costs)
    # measured on the data, the chosen ranks' errors are the optimal ones (COALA, mu = 0)
    measured = sum(r["rel_error"] ** 2 for r in rows)
    assert measured == pytest.approx(a["total_normalised_error"], rel=1e-3)


# Hand-built spectra with known optima. Normalised gains (S_r^2 / sum S^2) of raising a rank:
FLAT = torch.ones(8, dtype=torch.float64)  # 1/8 for every step
HALVING = 0.5 ** torch.arange(8, dtype=torch.float64)  # 0.1875, 0.047, ... (S^2 quarters)
STEEP = 1e-3 ** torch.arange(8, dtype=torch.float64)  # ~1e-6, then nothing


def test_allocate_global_gives_the_known_optimal_ranks():
    # equal costs: from rank 1 each, three more steps go to the largest gains: HALVING's
    # 0.1875, then FLAT's 0.125 twice (HALVING's next is 0.047, STEEP's 1e-6)
    assert allocate_global([FLAT, HALVING, STEEP], [(8, 8)] * 3, 6 * 16, [8] * 3) == [3, 2, 1]
    # cost decides: HALVING's step gains more (0.1875) but costs 32 parameters (24 x 8), so
    # two of FLAT's (0.25 for the same 32) win, and nothing is left for a third step
    assert allocate_global([FLAT, HALVING], [(8, 8), (24, 8)], 48 + 32, [8, 8]) == [3, 1]
    # the caps bind: FLAT may not pass rank 2, so HALVING takes the rest
    assert allocate_global([FLAT, HALVING], [(8, 8), (8, 8)], 5 * 16, [2, 8]) == [2, 3]


class FakeWeights:
    def __init__(self, spectra):
        self.W = {f"l{i}.weight": torch.diag(S).float() for i, S in enumerate(spectra)}

    def get(self, name):
        return self.W[name]


class IdentityR:
    """A reduced store whose R is the identity: W R^T = W, so the spectra are W's."""

    device = torch.device("cpu")

    def get(self, name):
        return ReducedInput(name=name, R=torch.eye(8), abs_sum=torch.ones(8, dtype=torch.float64), gram=None,
                            tokens=8, complete=True, meta={})

    def narrow(self, layer):  # a plain store: no narrow pairs
        return None


def choose(spectra):
    layers = [Layer(name=f"l{i}", input=f"l{i}", m=8, n=8) for i in range(len(spectra))]
    config = SolveConfig(out="unused", ratio=0.5, allocate="global", format="dense")
    uniform = uniform_ranks(layers, config)
    summary = choose_ranks(layers, uniform, config, FakeWeights(spectra), IdentityR(), progress=False)
    return summary, uniform, [layer.rank for layer in layers]


def test_global_is_chosen_where_it_is_strictly_better_and_uniform_otherwise():
    spectra = [FLAT, HALVING, STEEP]
    summary, uniform, ranks = choose(spectra)
    # ratio 0.5 of 8 x 8: rank 2 each, 96 parameters; caps ceil(64 / 16) - 1 = 3
    assert uniform == [2, 2, 2] and ranks == [3, 2, 1]
    tails = [5 / 8, float(HALVING[2:].square().sum() / HALVING.square().sum()),
             float(STEEP[1:].square().sum() / STEEP.square().sum())]
    assert summary["allocate"] == "global" and summary["spent"] == summary["budget"] == 96
    assert summary["global_total_normalised_error"] == pytest.approx(sum(tails), rel=1e-6)
    assert summary["total_normalised_error"] == pytest.approx(total_normalised_error(spectra, ranks), rel=1e-6)
    assert summary["uniform_total_normalised_error"] == pytest.approx(
        6 / 8 + tails[1] + float(STEEP[2:].square().sum() / STEEP.square().sum()), rel=1e-6)
    assert summary["total_normalised_error"] < summary["uniform_total_normalised_error"] - 0.1
    # three flat spectra: every split of the budget errs the same, and a tie keeps uniform
    summary, uniform, ranks = choose([FLAT] * 3)
    assert summary["allocate"] == "uniform" and ranks == uniform == [2, 2, 2]
    assert summary["global_total_normalised_error"] == summary["uniform_total_normalised_error"] == 3 * 6 / 8


def _spectrum(k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, generator=g, dtype=torch.float64).pow(4).sort(descending=True).values


@pytest.mark.parametrize("seed", range(4))
def test_allocate_global_is_optimal_for_equal_costs_and_respects_budgets(seed):
    spectra = [_spectrum(6, seed * 10 + i) for i in range(3)]
    budget = 12 * 10  # rank 10 in total over three (6 x 6) layers, cost 12 each
    ranks = allocate_global(spectra, [(6, 6)] * 3, budget, [6, 6, 6])
    best = min(total_normalised_error(spectra, list(r))
               for r in itertools.product(range(1, 7), repeat=3) if sum(r) * 12 <= budget)
    assert sum(ranks) * 12 <= budget
    assert total_normalised_error(spectra, ranks) == pytest.approx(best, abs=1e-12)
    shapes = [(6, 6), (9, 6), (12, 6)]
    mixed = [_spectrum(6, seed * 10 + i) for i in range(3)]
    ranks = allocate_global(mixed, shapes, 70, [6, 6, 6])
    spent = sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))
    growable = [m + n for r, (m, n) in zip(ranks, shapes) if r < 6]
    assert spent <= 70 and (not growable or 70 - spent < min(growable))


def test_coala_is_never_worse_than_svdllm_on_the_same_store(store, tmp_path):
    coala = solve(store, tmp_path / "c", ratio=0.3, format="dense")
    svdllm = solve(store, tmp_path / "s", ratio=0.3, format="dense", method="svdllm")
    for c, s in zip(coala["layers"], svdllm["layers"]):
        assert s["gram_source"] == "stored"
        assert c["rel_error"] <= s["rel_error"] * (1 + 1e-4) + 1e-7, c["module"]
        assert c["rel_error"] == pytest.approx(c["optimal_rel_error"], rel=1e-4)


def test_coala_is_strictly_better_than_svdllm_on_ill_conditioned_inputs(ill_store, tmp_path):
    coala = solve(ill_store, tmp_path / "c", ratio=0.3, format="dense")
    svdllm = solve(ill_store, tmp_path / "s", ratio=0.3, format="dense", method="svdllm")
    ratios = [s["rel_error"] / c["rel_error"] for c, s in zip(coala["layers"], svdllm["layers"])]
    assert min(ratios) >= 1 - 1e-4
    assert sum(r > 1.05 for r in ratios) >= 4, ratios  # fp32 Gram loses > 5% on several layers
    assert max(c["cond_R"] for c in coala["layers"]) > 1e4
    assert any("not positive definite" in s["note"] for s in svdllm["layers"])


def test_svd_and_asvd_run_through_the_same_pipeline(store, tmp_path):
    coala = solve(store, tmp_path / "c", ratio=0.5, format="dense", layers=r"layers\.0\.mlp")
    for method in ("svd", "asvd"):
        other = solve(store, tmp_path / method, ratio=0.5, format="dense", method=method,
                      layers=r"layers\.0\.mlp")
        assert [r["module"] for r in other["layers"]] == [r["module"] for r in coala["layers"]]
        for c, o in zip(coala["layers"], other["layers"]):
            assert c["rel_error"] <= o["rel_error"] * (1 + 1e-5)


def _reduced(seed, n=24, tokens=200):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    W = torch.randn(16, n, generator=g, dtype=torch.float64)
    R = fold_r([X], dtype=torch.float64)
    return W, ReducedInput("x", R, X.abs().sum(0), None, tokens, True, {})


def test_mu_is_relative_and_adaptive_mu_scales_by_the_squared_error():
    W, red = _reduced(0)
    mu_abs = 0.1 * float(red.R.square().sum()) / red.R.shape[1]
    res = solve_layer(W, red, 5, SolveConfig(out="-", rank=5, mu=0.1))
    assert res["mu"] == pytest.approx(mu_abs)
    A, B = coala_factors(W, red.R, 5, mu=mu_abs)
    torch.testing.assert_close(res["A"] @ res["B"], A @ B)
    plain = solve_layer(W, red, 5, SolveConfig(out="-", rank=5))
    assert plain["rel_error"] < res["rel_error"]  # mu trades data error for weight closeness
    adaptive = solve_layer(W, red, 5, SolveConfig(out="-", rank=5, mu=0.1, adaptive_mu=True))
    assert adaptive["mu"] == pytest.approx(mu_abs * plain["rel_error"] ** 2, rel=1e-6)
    assert normalised_tail(plain["spectrum"], 5) == pytest.approx(plain["rel_error"] ** 2, rel=1e-6)


def test_mu_end_to_end_is_recorded_per_layer(store, tmp_path):
    report = solve(store, tmp_path / "mu", ratio=0.3, mu=0.05, format="dense",
                   layers=r"layers\.1\.self_attn\.q_proj")
    (row,) = report["layers"]
    R = read_result(open_store(store), row["input"]).R
    assert row["mu"] == pytest.approx(0.05 * float(R.double().square().sum()) / R.shape[1], rel=1e-6)


def test_layers_regex_and_layers_kept_dense(base, store, tmp_path):
    report = solve(store, tmp_path / "f", rank=40, layers=r"q_proj|mlp")
    rows = {r["module"]: r for r in report["layers"]}
    assert len(rows) == 8
    q = rows["model.layers.0.self_attn.q_proj"]  # 40 x (64 + 64) >= 64 x 64
    assert q["kept_dense"] and "kept dense" in q["note"] and q["params_after"] == 64 * 64
    assert not rows["model.layers.0.mlp.up_proj"]["kept_dense"]
    fac = export.load_model(tmp_path / "f")
    original = AutoModelForCausalLM.from_pretrained(base)
    mods, orig = dict(fac.named_modules()), dict(original.named_modules())
    assert isinstance(mods["model.layers.0.self_attn.q_proj"], torch.nn.Linear)
    assert isinstance(mods["model.layers.0.mlp.up_proj"], export.LowRankLinear)
    torch.testing.assert_close(mods["model.layers.0.self_attn.k_proj"].weight,
                               orig["model.layers.0.self_attn.k_proj"].weight)


def test_source_without_safetensors_is_loaded_whole_and_resaved(base, store, tmp_path):
    src = tmp_path / "bin-model"
    src.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(base).state_dict(), src / "pytorch_model.bin")
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, src / f.name)
    report = solve(store, tmp_path / "out", ratio=0.3, model=str(src), format="dense",
                   layers=r"layers\.0\.mlp")
    assert any("loaded whole" in note for note in report["notes"])
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "solve_report.json",
         "tokenizer.json", "tokenizer_config.json"])


def test_cli_prints_the_table(store, tmp_path, capsys):
    assert main(["solve", str(store), "--ratio", "0.3", "--out", str(tmp_path / "o"),
                 "--quiet", "--layers", r"layers\.0\."]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in out and "total:" in out and "wrote" in out
    assert main(["solve", str(store), "--ratio", "0.3", "--out", str(tmp_path / "j"),
                 "--quiet", "--json", "--layers", r"layers\.0\."]) == 0
    assert len(json.loads(capsys.readouterr().out)["layers"]) == 7


@pytest.mark.parametrize("args, code, message", [
    (["--ratio", "1.5"], 2, "ratio"),
    (["--ratio", "0"], 2, "ratio"),
    (["--rank", "100"], 2, "exceeds min"),
    (["--ratio", "0.2", "--method", "svd", "--mu", "0.1"], 2, "coala only"),
    (["--ratio", "0.2", "--layers", "nothing-matches"], 2, "matches none"),
])
def test_bad_settings_exit_2(store, tmp_path, capsys, args, code, message):
    assert main(["solve", str(store), "--out", str(tmp_path / "o"), "--quiet", *args]) == code
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_without_overwrite(store, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["solve", str(store), "--out", str(tmp_path / "o"), "--ratio", "0.2", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["solve", str(store), "--out", str(tmp_path / "o"), "--ratio", "0.2", "--quiet",
                 "--overwrite", "--layers", r"layers\.0\.self_attn\.q"]) == 0
    assert (tmp_path / "o" / export.REPORT_FILE).is_file()
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_output_may_not_replace_the_model_or_store(base, store, tmp_path):
    for out in (base, store, store.parent):
        with pytest.raises(UsageError, match="which this solve reads from"):
            solve(store, out, ratio=0.2, overwrite=True)
    assert (store / "zarr.json").is_file() and (base / "config.json").is_file()


def test_unreduced_and_partly_reduced_stores_are_refused(base, store, tmp_path):
    raw = make_store(base, tmp_path / "raw.zarr", samples=1, reduce=False)
    with pytest.raises(StoreError, match="not reduced"):
        solve(raw, tmp_path / "o", ratio=0.2)
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    path = result_path(open_store(partial), open_store(partial).inputs[0])
    tensors, meta = load_state(path)
    save_state(path, tensors, {**meta, "complete": False})
    with pytest.raises(StoreError, match="partly reduced"):
        solve(partial, tmp_path / "o", ratio=0.2)
    assert sorted(os.listdir(tmp_path)) == ["partial.zarr", "raw.zarr"]


def test_a_model_that_does_not_match_the_store_is_refused(tiny_model_dir, store, tmp_path):
    other = tiny_model_dir(intermediate_size=96)
    with pytest.raises(CheckpointMismatch, match="does not match the store"):
        solve(store, tmp_path / "o", ratio=0.2, model=str(other))
    assert os.listdir(tmp_path) == []


def test_config_validation():
    with pytest.raises(UsageError, match="exactly one"):
        SolveConfig(out="x").validate()
    with pytest.raises(UsageError, match="adaptive"):
        SolveConfig(out="x", ratio=0.2, adaptive_mu=True).validate()
    with pytest.raises(UsageError, match="method"):
        SolveConfig(out="x", ratio=0.2, method="magic").validate()


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e8])
def test_cond_estimate_is_close_to_the_exact_condition_number(cond):
    from coala_stream.solve import cond_estimate

    g = torch.Generator().manual_seed(1)
    n = 200
    U, _ = torch.linalg.qr(torch.randn(400, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    X = (U * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ V.T
    R = torch.linalg.qr(X, mode="r").R.float()
    s = torch.linalg.svdvals(R.double())
    exact = float(s[0] / s[-1])
    est, how = cond_estimate(R)
    assert how == "est" and exact / 1.5 <= est <= exact * 1.0001


def test_cond_estimate_of_short_or_singular_r_is_inf():
    from coala_stream.solve import cond_estimate

    assert cond_estimate(torch.ones(3, 5).triu()) == (math.inf, "rows<n")
    R = torch.eye(4)
    R[2, 2] = 0
    assert cond_estimate(R) == (math.inf, "singular")


def test_an_unfinished_capture_is_refused_unless_allowed_and_then_noted():
    """A killed or running capture (or a sequential one without its later blocks) holds only
    part of the calibration: solve said nothing before."""
    from types import SimpleNamespace

    from coala_stream.solve import check_capture_complete

    store = SimpleNamespace(path="s.zarr", attrs={"capture": {"samples_done": 3, "complete": False},
                                                  "calibration": {"samples": 8}})
    with pytest.raises(StoreError, match=r"not complete \(3 of 8 samples.*--allow-incomplete"):
        check_capture_complete(store, allow=False)
    notes = check_capture_complete(store, allow=True)
    assert len(notes) == 1 and "--allow-incomplete" in notes[0] and "3 of 8" in notes[0]
    store.attrs["capture"]["complete"] = True
    assert check_capture_complete(store, allow=False) == []
