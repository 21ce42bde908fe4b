"""capture --sequential --propagate: each group of linears compressed as soon as its inputs are
known, with the input objective (Xh) or the output objective ([Xh | X], issue 17), refinement,
resume after failures, and what solve makes of the store."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from coala_stream import applied, sequential
from coala_stream.cli import main
from coala_stream.errors import StoreError
from coala_stream.objective import OutputProblem, output_factors
from coala_stream.reduce import read_result
from coala_stream.sequential import SequentialConfig
from coala_stream.sequential import run as run_capture
from coala_stream.solve import SolveConfig, check_reduced, run_solve
from coala_stream.store import open_store

from .test_capture import SMALL, assert_same_store, text_file  # noqa: F401

seq_run = importlib.import_module("coala_stream.sequential.run")
seq_propagate = importlib.import_module("coala_stream.sequential.propagate")
seq_refine = importlib.import_module("coala_stream.sequential.refine")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS3 = dict(num_hidden_layers=3)
PROP = dict(sequential=True, propagate=True, ratio=0.3)
OUTPUT = dict(PROP, objective="output", alpha=0.5)


def config(model_dir, out, text_file, **kw) -> SequentialConfig:
    return SequentialConfig(out=str(out), model=str(model_dir), data=str(text_file), **{**SMALL, **kw})


def _block(name: str) -> int:
    return int(name.split(".")[2])


def _progress(out: Path) -> dict:
    return json.loads((sequential.default_hidden_dir(str(out)) / "progress.json").read_text())


def _stored(path: Path) -> dict[str, torch.Tensor]:
    with open_store(path) as s:
        return {n: torch.cat(list(s.iter_chunks(n))).double() for n in s.inputs}


def _factors(path: Path) -> dict:
    with open_store(path) as s:
        return applied.read_all(s)[0]


def fail_reduce_of(monkeypatch, consumer: str) -> None:
    """Make the propagation's reduce fail (RuntimeError "injected failure") at the group whose
    first input feeds a module named ``...consumer``."""
    real = seq_propagate.reduce_inputs

    def failing(config, plan, names):
        if names and names[0].endswith(consumer):
            raise RuntimeError("injected failure")
        return real(config, plan, names)

    monkeypatch.setattr(seq_propagate, "reduce_inputs", failing)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / x.norm()).item()


@pytest.fixture(scope="module")
def made(tiny_model_dir, text_file, tmp_path_factory):
    """Uninterrupted propagated captures of the 3-block float32 model, one per settings
    (do not modify): made(**settings) -> (model dir, store, summary)."""
    cache: dict = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            model_dir = tiny_model_dir("float32", **LAYERS3)
            out = tmp_path_factory.mktemp("propagated") / "p.zarr"
            cache[key] = model_dir, out, run_capture(config(model_dir, out, text_file, **kw),
                                                     progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory, text_file):
    made: dict = {}

    def get(model_dir) -> Path:
        if str(model_dir) not in made:
            out = tmp_path_factory.mktemp("ordinary") / "s.zarr"
            run_capture(config(model_dir, out, text_file), progress=False)
            made[str(model_dir)] = out
        return made[str(model_dir)]

    return get


def test_every_group_sees_the_model_compressed_up_to_it(made, ordinary, tmp_path, text_file):
    """Group by group: an ordinary capture of the dense model that solve writes from the
    propagated store sees, at EVERY linear (o_proj and down_proj inside a block too), what
    the propagation captured there; and solve writes exactly the factors applied."""
    from safetensors.torch import load_file

    model_dir, out, s = made(**PROP)
    assert s["status"] == "complete" and s["blocks"] == 3 and s["inputs"] == 12
    assert s["propagate"]["compressed_layers"] == 21  # 7 linears in each of the 3 blocks
    assert not sequential.default_hidden_dir(str(out)).exists()
    with open_store(out) as st:
        check_reduced(st, set(st.inputs))  # the store ends reduced, from its final data
        assert st.attrs["capture_settings"]["propagate"]["objective"] == "input"
        assert not any(st.input(n).pair for n in st.inputs)
    factors = _factors(out)
    assert len(factors) == 21 and {_block(n) for n in factors} == {0, 1, 2}

    report = run_solve(out, SolveConfig(out=str(tmp_path / "f"), ratio=0.3), progress=False)
    assert any("factors as the propagating capture applied them" in n for n in report["notes"])
    tensors = load_file(tmp_path / "f" / "model.safetensors")
    for name, (A, B) in factors.items():
        assert torch.equal(tensors[f"{name}.A.weight"], A.to(torch.float32)), name
        assert torch.equal(tensors[f"{name}.B.weight"], B.to(torch.float32)), name
    run_solve(out, SolveConfig(out=str(tmp_path / "d"), ratio=0.3, format="dense"), progress=False)
    dense = tmp_path / "dense.zarr"
    run_capture(config(tmp_path / "d", dense, text_file), progress=False)
    got, want, original = _stored(out), _stored(dense), _stored(ordinary(model_dir))
    for name in want:
        assert _rel(want[name], got[name]) <= 1e-5, name
        if name != "model.layers.0.self_attn.q_proj":  # everything after the first group moved
            assert _rel(original[name], got[name]) > 1e-3, name


def test_output_objective_stores_both_streams_and_fits_the_original_outputs(made, ordinary,
                                                                             tmp_path, text_file):
    model_dir, out, s = made(**OUTPUT)
    stored, original = _stored(out), _stored(ordinary(model_dir))
    run_solve(out, SolveConfig(out=str(tmp_path / "d"), ratio=0.3, format="dense"), progress=False)
    dense = tmp_path / "dense.zarr"
    run_capture(config(tmp_path / "d", dense, text_file), progress=False)
    compressed = _stored(dense)
    from safetensors.torch import load_file
    weights = load_file(Path(model_dir) / "model.safetensors")
    narrow = 0
    with open_store(out) as st:
        for name in st.inputs:
            info = st.input(name)
            Xh, X = stored[name][:, :info.features], stored[name][:, info.features:]
            assert _rel(compressed[name], Xh) <= 1e-5, name  # the compressed model's
            if info.outputs is None:
                assert info.pair and info.n == 2 * info.features
                assert _rel(original[name], X) <= 1e-5, name  # the original model's inputs
                continue
            # a narrow pair: the original model's inputs times the original weights
            narrow += 1
            assert name.endswith("down_proj"), name  # 64 outputs of 160 inputs; the rest are wider
            Wg = torch.cat([weights[f"{c}.weight"] for c in info.consumers])
            assert info.pair and info.n == info.features + Wg.shape[0] < 2 * info.features
            assert _rel(original[name] @ Wg.T.to(original[name].dtype), X) <= 1e-5, name
    assert narrow == len([n for n in stored if n.endswith("down_proj")]) > 0
    # the applied factors are the output objective's optimum for the stored R
    factors = _factors(out)
    with open_store(out) as st:
        for name, (A, B) in factors.items():
            info = st.input(next(n for n in st.inputs if name in st.input(n).consumers))
            R = read_result(st, info.name).R
            W = weights[f"{name}.weight"]
            if info.outputs is None:
                A2, B2 = output_factors(W, R, A.shape[1], 0.5)
            else:
                outputs, cols = info.narrow(name)
                A2, B2 = OutputProblem(R, W.shape[1], 0.5, outputs=outputs).factors(
                    W, A.shape[1], cols=cols)
            if info.tokens % st.chunk_tokens == 0:  # no pending chunk: R is what was solved with
                assert torch.allclose(A @ B, A2 @ B2, atol=1e-5), name
    report = run_solve(out, SolveConfig(out=str(tmp_path / "f"), ratio=0.3), progress=False)
    assert report["settings"]["objective"] == "output" and report["settings"]["alpha"] == 0.5
    assert not any("differs" in n for n in report["notes"])


def test_output_factors_beat_the_input_objective_on_the_output_objective(made):
    """Per layer, on the stored data: the applied factors reach a lower output-objective error
    than the input objective's factors of the same rank (they are its optimum; whether that
    pays off in perplexity is measured on SmolLM2 in docs/benchmarks.md, not on random
    weights)."""
    from safetensors.torch import load_file

    from coala_stream.linalg import coala_factors

    model_dir, out, _ = made(**OUTPUT, samples=12)
    weights = load_file(Path(model_dir) / "model.safetensors")
    better = 0
    with open_store(out) as st:
        for name, (A, B) in _factors(out).items():
            info = st.input(next(n for n in st.inputs if name in st.input(n).consumers))
            R, n = read_result(st, info.name).R.double(), info.features
            W = weights[f"{name}.weight"].double()
            Ai, Bi = coala_factors(W, R[:n, :n], A.shape[1])
            outputs, cols = info.narrow(name) or (None, None)
            problem = OutputProblem(R, n, 0.5, outputs=outputs)
            e_out = problem.relative_error(W, A.double(), B.double(), cols)
            e_in = problem.relative_error(W, Ai, Bi, cols)
            assert e_out <= e_in * (1 + 1e-4), (name, e_out, e_in)
            better += e_out < e_in * 0.999
    assert better >= 15  # strictly better almost everywhere, not just equal


def test_refinement_lowers_the_block_error_and_is_recorded(made):
    _, plain, _ = made(**OUTPUT)
    _, refined, s = made(**OUTPUT, refine_steps=20, refine_lr=1e-3)
    assert s["propagate"]["refine_steps"] == 20 and s["propagate"]["refine_seconds"] > 0
    with open_store(refined) as st:
        metas = applied.read_all(st)[1]
    assert [m["refine_steps"] for m in metas] == [20, 20, 20]
    a, b = _factors(plain), _factors(refined)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[n][0] @ a[n][1], b[n][0] @ b[n][1]) for n in a)


def test_refine_block_reduces_its_loss(tiny_model_dir, text_file, tmp_path, monkeypatch):
    losses = []
    real_mse = torch.nn.functional.mse_loss

    def spy(a, b):
        loss = real_mse(a, b)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", spy)
    run_capture(config(tiny_model_dir("float32", **LAYERS3), tmp_path / "r.zarr", text_file,
                       **OUTPUT, refine_steps=30, refine_lr=1e-3), progress=False)
    per_block = [losses[i:i + 30] for i in range(0, 90, 30)]
    assert len(losses) == 90
    for block in per_block:  # the same batch comes back every 3 steps: compare like with like
        assert sum(block[-3:]) < sum(block[:3]), block


@pytest.mark.parametrize("where", ["reduce", "refine", "pass"])
def test_failure_mid_block_then_rerun_equals_uninterrupted(where, made, text_file, tmp_path,
                                                           monkeypatch):
    settings = dict(OUTPUT, refine_steps=4, refine_lr=1e-3)
    model_dir, ref, _ = made(**settings)
    out = tmp_path / "p.zarr"
    calls = []
    if where == "reduce":  # block 1, its third group (gate/up): two groups' factors applied
        fail_reduce_of(monkeypatch, "layers.1.mlp.gate_proj")
    elif where == "refine":
        real = seq_propagate.refine_block

        def failing(bm, k, *a, **kw):
            if k == 1:
                raise RuntimeError("injected failure")
            return real(bm, k, *a, **kw)

        monkeypatch.setattr(seq_propagate, "refine_block", failing)
    else:  # in block 1's compressed pass, after one batch of outputs
        real = seq_propagate.run_pass

        def failing(bm, k, work, src, dst, batch):
            calls.append((k, dst))
            if k == 1 and not dst.startswith("o"):
                bm_run = bm.run_block
                count = [0]

                def run_block(kk, x):
                    count[0] += 1
                    if count[0] == 2:
                        raise RuntimeError("injected failure")
                    return bm_run(kk, x)

                monkeypatch.setattr(bm, "run_block", run_block)
            return real(bm, k, work, src, dst, batch)

        monkeypatch.setattr(seq_propagate, "run_pass", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_capture(config(model_dir, out, text_file, **settings), progress=False)
    rec = _progress(out)
    assert rec["next_block"] == 1
    if where == "reduce":
        assert rec["groups_done"] == 2 and rec["group_captured"] == 2
    if where == "refine":
        assert rec["groups_done"] == 4 and rec["original_done"] and not rec.get("refined")
    monkeypatch.undo()
    s = run_capture(config(model_dir, out, text_file, **settings), progress=False)
    assert s["status"] == "complete" and s["block_before"] == 1
    assert_same_store(ref, out)
    a, b = _factors(ref), _factors(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    with open_store(ref) as r, open_store(out) as o:
        for name in r.inputs:
            assert torch.equal(read_result(r, name).R, read_result(o, name).R), name


def test_drop_activations_frees_the_chunks_and_solve_still_works(made, tiny_model_dir, text_file,
                                                                 tmp_path):
    model_dir, ref, _ = made(**PROP)
    out = tmp_path / "d.zarr"
    run_capture(config(model_dir, out, text_file, **PROP, drop_activations=True), progress=False)
    with open_store(out) as st, open_store(ref) as r:
        for name in st.inputs:
            info = st.input(name)
            assert info.dropped == 2 and info.num_chunks == 3  # the partial last chunk came later
            with pytest.raises(StoreError, match="--drop-activations"):
                st.read_chunk(name, 0)
            assert torch.equal(st.read_chunk(name, 2), r.read_chunk(name, 2))
            assert torch.equal(read_result(st, name).R, read_result(r, name).R)
        assert st.stored_bytes(st.inputs[0]) < r.stored_bytes(r.inputs[0])
    report = run_solve(out, SolveConfig(out=str(tmp_path / "f"), ratio=0.3), progress=False)
    assert report["totals"]["layers"] == 21


def test_solve_objective_and_method_checks(made, tmp_path, capsys):
    _, plain, _ = made(**PROP)
    _, pair, _ = made(**OUTPUT)
    with pytest.raises(StoreError, match="--objective output needs the original"):
        run_solve(plain, SolveConfig(out=str(tmp_path / "x"), ratio=0.3, objective="output"),
                  progress=False)
    # the input objective on a pair store reads Xh's own R (R11): the propagated-input objective
    rep = run_solve(pair, SolveConfig(out=str(tmp_path / "i"), ratio=0.3, objective="input"),
                    progress=False)
    assert any("objective" in n and "differs" in n for n in rep["notes"])
    # aasvd: the same objective through three Gram blocks, Cholesky and an inverse; on these
    # well-conditioned inputs it agrees with the Gram-free solution
    a = run_solve(pair, SolveConfig(out=str(tmp_path / "a"), ratio=0.3, method="aasvd"),
                  progress=False)
    c = run_solve(pair, SolveConfig(out=str(tmp_path / "c"), ratio=0.3, alpha=0.4), progress=False)
    assert a["settings"]["method"] == "aasvd"
    for ra, rc in zip(a["layers"], c["layers"]):
        assert ra["rank"] == rc["rank"]
    for argv, message in [
        (["--objective", "input", "--method", "aasvd"], "--method aasvd fits the output objective"),
        (["--objective", "output", "--method", "svdllm"], "--objective output is solved by"),
        (["--objective", "input", "--alpha", "0.5"], "--alpha weighs the original outputs"),
        (["--alpha", "1.5"], "--alpha must be a number in [0, 1]"),
    ]:
        assert main(["solve", str(pair), "--ratio", "0.3", "--out", str(tmp_path / "z"),
                     *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_propagate_usage_errors(made, tiny_model_dir, text_file, tmp_path, capsys):
    model_dir, prop_store, _ = made(**PROP)
    base = ["capture", str(model_dir), "--data", str(text_file), "--samples", "5", "--seq-len",
            "32", "--chunk-tokens", "64"]
    new = ["--out", str(tmp_path / "n.zarr")]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"layers": [{"module": "model.layers.0.mlp.up_proj", "rank": 3,
                                              "kept_dense": False}]}))
    P = ["--sequential", "--propagate"]
    for extra, message in [
        (["--propagate", "--ratio", "0.2"], "--propagate works block by block: add --sequential"),
        (["--ratio", "0.2"], "--ratio: only used with --sequential --propagate"),
        (["--sequential", "--objective", "output"], "--objective: only used with"),
        (["--sequential", "--refine-steps", "3"], "--refine-steps: only used with"),
        (P, "give exactly one of --ratio"),
        ([*P, "--ratio", "0.2", "--rank", "4"], "give exactly one of --ratio"),
        ([*P, "--ratio", "1.5"], "ratio"),
        ([*P, "--rank", "4", "--method", "svd", "--mu", "0.1"], "--mu applies to --method coala only"),
        ([*P, "--ratio", "0.2", "--alpha", "0.5"], "--alpha weighs the original outputs"),
        ([*P, "--ratio", "0.2", "--objective", "output", "--alpha", "0"],
         "--objective input does with half the store"),
        ([*P, "--ratio", "0.2", "--objective", "output", "--method", "svdllm"],
         "--objective output is solved by"),
        ([*P, "--ratio", "0.2", "--method", "aasvd"], "--method aasvd fits the output objective"),
        ([*P, "--ratio", "0.2", "--ranks", str(report)], "--ranks sets every layer's rank"),
        ([*P, "--ranks", str(tmp_path / "missing.json")], "expected a solve_report.json"),
        ([*P, "--ratio", "0.2", "--refine-steps", "-1"], "--refine-steps must be >= 0"),
        ([*P, "--ratio", "0.2", "--drop-activations", "--out", str(tmp_path / "x.h5")],
         "--drop-activations frees disk space chunk by chunk"),
        (["--sequential", "--drop-activations", "--out", str(tmp_path / "x.h5")],
         "--drop-activations frees disk space chunk by chunk"),
        (["--drop-activations"], "--drop-activations folds each input as a block's pass makes "
                                 "it: add --sequential"),
    ]:
        assert main([*base, *new, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "n.zarr").exists()
    # other settings on an existing propagated store: refused, nothing lost
    for extra in (["--sequential"], [], [*P, "--ratio", "0.2"],
                  [*P, "--ratio", "0.3", "--objective", "output"]):
        assert main([*base, "--out", str(prop_store), *extra]) == 1, extra
        assert "captured with other settings" in capsys.readouterr().err
    assert main([*base, "--out", str(prop_store), *P, "--ratio", "0.3"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_ranks_from_a_report_are_applied(made, tiny_model_dir, text_file, tmp_path):
    model_dir, _, _ = made(**PROP)
    ranks = {f"model.layers.{k}.{m}": 2 + k for k in range(3)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    report = tmp_path / "solve_report.json"
    report.write_text(json.dumps({"layers": [{"module": m, "rank": r, "kept_dense": False}
                                             for m, r in ranks.items()]
                                  + [{"module": "model.layers.0.mlp.down_proj", "rank": 64,
                                      "kept_dense": True}]}))
    out = tmp_path / "r.zarr"
    cfg = config(model_dir, out, text_file, sequential=True, propagate=True, ranks=str(report))
    run_capture(cfg, progress=False)
    factors = _factors(out)
    assert {n: A.shape[1] for n, (A, B) in factors.items()} == ranks  # down_proj stays dense


def test_where_xh_equals_x_the_output_objective_gives_the_input_objectives_factors(made):
    """Block 0's q/k/v group sees the uncompressed embeddings in both streams (Xh = X): the
    output objective is then COALA's input objective, whatever alpha."""
    a, b = _factors(made(**PROP)[1]), _factors(made(**OUTPUT)[1])
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        (A1, B1), (A2, B2) = a[f"model.layers.0.{name}"], b[f"model.layers.0.{name}"]
        assert torch.allclose(A1 @ B1, A2 @ B2, atol=1e-5), name


def test_hdf5_with_mu_and_every_format(tiny_model_dir, text_file, tmp_path):
    """The output objective with mu on an HDF5 store: solve writes the applied factors in each
    format; the PEFT output (residual base + adapter) is the original model before training."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("float32", **LAYERS3)
    out = tmp_path / "p.h5"
    run_capture(config(model_dir, out, text_file, **OUTPUT, mu=0.01), progress=False)
    factors = _factors(out)
    assert len(factors) == 21 and (tmp_path / "p.h5.applied").is_dir()
    settings = dict(ratio=0.3, mu=0.01)
    for fmt in ("factorized", "dense", "peft"):
        rep = run_solve(out, SolveConfig(out=str(tmp_path / fmt), format=fmt, **settings),
                        progress=False)
        assert any("applied them" in n for n in rep["notes"]), fmt
        assert all(r["mu"] > 0 for r in rep["layers"] if not r["kept_dense"]), fmt
    # without --mu, solve takes the capture's: it writes the applied factors, not mu = 0 ones
    rep = run_solve(out, SolveConfig(out=str(tmp_path / "plain"), ratio=0.3), progress=False)
    assert rep["settings"]["mu"] == 0.01 and any("applied them" in n for n in rep["notes"])
    assert not any("differs" in n for n in rep["notes"])
    # and an explicit --mu 0 is taken as asked, with the note that it differs
    rep = run_solve(out, SolveConfig(out=str(tmp_path / "mu0"), ratio=0.3, mu=0.0), progress=False)
    assert rep["settings"]["mu"] == 0.0 and any("mu 0.01 -> 0.0" in n for n in rep["notes"])
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    for name, (A, B) in factors.items():
        assert torch.allclose(dense[f"{name}.weight"], A @ B, atol=1e-6), name
    peft = pytest.importorskip("peft")
    ids = torch.arange(24).unsqueeze(0)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
        model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base"),
            tmp_path / "peft" / "adapter")
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_kill_9_mid_block_then_rerun_equals_uninterrupted(made, text_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = dict(OUTPUT, refine_steps=4, refine_lr=1e-3)
    model_dir, ref, _ = made(**settings)
    killed = tmp_path / "killed.zarr"
    args = ["capture", str(model_dir), "--data", str(text_file), "--samples", "5", "--seq-len",
            "32", "--chunk-tokens", "64", "--sequential", "--propagate", "--ratio", "0.3",
            "--objective", "output", "--alpha", "0.5", "--refine-steps", "4", "--refine-lr",
            "0.001", "--threads", "1", "--out", str(killed)]
    code = "import sys; from coala_stream.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def where():
        try:
            rec = _progress(killed)
        except (OSError, ValueError):
            return (0, 0)
        return rec.get("next_block", 0), rec.get("groups_done", 0)

    deadline = time.monotonic() + 120
    while where() < (1, 2) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert (1, 2) <= where() < (3, 0), "the kill came too late"
    assert main(args) == 0
    assert_same_store(ref, killed)
    a, b = _factors(ref), _factors(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name


def test_status_shows_the_propagation_and_pair_inputs(made, capsys):
    _, out, _ = made(**OUTPUT)
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "propagate   coala, ratio 0.3, objective output alpha 0.5" in text
    assert "factors of 3 blocks" in text and " 64x2 " in text


def test_narrow_pairs_only_where_they_are_narrower_and_never_in_a_wide_store(tmp_path):
    """`pair_outputs`: a group whose consumers have fewer outputs than inputs is folded narrow
    (--method coala only); an input a store already holds as the wide pair (a store begun
    before narrow pairs, resumed) stays wide, so the resumed run folds what it began with."""
    from types import SimpleNamespace

    from coala_stream.sequential.propagate import pair_outputs
    from coala_stream.store import create_store

    def group(name, n, outs):
        mods = {f"{name}.{i}": SimpleNamespace(out_features=m) for i, m in enumerate(outs)}
        return SimpleNamespace(name=name, n=n, consumers=list(mods)), SimpleNamespace(mods=mods)

    coala, aasvd = {"method": "coala"}, {"method": "aasvd"}
    attrs = {"dtype": "float32", "chunk_tokens": 8, "model": {"name_or_path": "x"},
             "calibration": {"samples": 1, "seq_len": 8}}
    with create_store(tmp_path / "s.zarr", "zarr", attrs) as store:
        down, bw = group("down", 16, [6])
        assert pair_outputs(down, bw, store, coala) == [6]
        assert pair_outputs(down, bw, store, aasvd) is None
        assert pair_outputs(*group("qkv", 16, [16, 4, 4]), store, coala) is None  # 24 >= 16
        assert pair_outputs(*group("o", 16, [16]), store, coala) is None  # not narrower
        store.create_input("down", 32, down.consumers, pair=True)  # begun wide
        assert pair_outputs(down, bw, store, coala) is None
