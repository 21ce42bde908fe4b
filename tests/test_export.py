"""Export formats round-trip on a tiny random Llama, without a store.

R comes from fold_r over activations hooked in-process; the writers are fed
COALA factors directly. Checks: the factorized model loads with the recorded
ranks, equals the dense one and really shrinks; the dense one loads in vanilla
transformers with W' = A B; the PEFT adapter loads with no missing or
unexpected keys and base + adapter reproduces the original logits; tied
embeddings survive; sharded sources and biases; staging never leaves a
half-written output.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from coala_stream import export
from coala_stream.weights import LazyWeights
from coala_stream.errors import CoalaError, UsageError
from coala_stream.linalg import coala_factors, fold_r

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n]


@torch.no_grad()
def activation_factors(model, names, batches=4, seq=32) -> dict[str, torch.Tensor]:
    """R of each named linear's input over random token windows (fold_r, float64)."""
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: rows[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in names]
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(batches):
            model(torch.randint(0, model.config.vocab_size, (1, seq), generator=g))
    finally:
        for h in hooks:
            h.remove()
    return {n: fold_r(rows[n], dtype=torch.float64) for n in names}


def write(fmt, model_dir, out, ranks, Rs, overwrite=False):
    """What solve does, minus the store: COALA factors for ``ranks`` into format ``fmt``."""
    source = LazyWeights(model_dir)
    factors = {}

    def factor(name, W):
        factors[name] = coala_factors(W, Rs[name], ranks[name])
        return factors[name]

    with export.staging_dir(out, overwrite) as stage:
        writer = export.WRITERS[fmt](stage, source, final_dir=out)
        writer.write(list(ranks), factor)
        writer.finish({"method": "coala"})
    return factors


@pytest.fixture(scope="module")
def tied(tiny_model_dir):
    """A tied-embedding tiny Llama with biases, its R's and a rank per decoder linear."""
    path = tiny_model_dir(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    names = linear_names(model)
    Rs = activation_factors(model, names)
    modules = dict(model.named_modules())
    ranks = {n: max(1, min(modules[n].weight.shape) // 3) for n in names}
    with torch.no_grad():
        logits = model(IDS).logits
    return path, model, Rs, ranks, logits


@pytest.fixture(scope="module")
def outputs(tied, tmp_path_factory):
    path, model, Rs, ranks, _ = tied
    root = tmp_path_factory.mktemp("export")
    made = {fmt: root / fmt for fmt in export.WRITERS}
    factors = {fmt: write(fmt, path, out, ranks, Rs) for fmt, out in made.items()}
    return made, factors


def test_factorized_loads_with_low_rank_modules_and_shrinks(tied, outputs):
    path, model, _, ranks, _ = tied
    made, _ = outputs
    fac = export.load_model(made["factorized"])
    modules = dict(fac.named_modules())
    for name, r in ranks.items():
        assert isinstance(modules[name], export.LowRankLinear) and modules[name].rank == r
        assert modules[name].A.bias is not None  # the original bias moved to A
    assert fac.lm_head.weight is fac.model.embed_tokens.weight  # tied embeddings survive
    saved = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in fac.parameters())
    expect = sum(m.weight.numel() - ranks[n] * sum(m.weight.shape)
                 for n, m in model.named_modules() if n in ranks)
    assert saved == expect > 0
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size(made["factorized"]) < size(path)
    assert "lm_head.weight" not in load_file(made["factorized"] / export.SINGLE_FILE)
    section = json.loads((made["factorized"] / "config.json").read_text())[export.SECTION]
    assert section["format"] == "factorized" and section["ranks"] == ranks
    out = fac.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_dense_is_vanilla_checkpoint_with_product_weights_and_matches_factorized(outputs):
    made, factors = outputs
    dense = AutoModelForCausalLM.from_pretrained(made["dense"]).eval()
    modules = dict(dense.named_modules())
    for name, (A, B) in factors["dense"].items():
        torch.testing.assert_close(modules[name].weight, (A @ B).float())
    fac = export.load_model(made["factorized"])
    with torch.no_grad():
        torch.testing.assert_close(fac(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=1e-5)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    assert export.detect_format(made["dense"]) == "dense"


def test_peft_adapter_loads_cleanly_and_reproduces_the_original(tied, outputs):
    peft = pytest.importorskip("peft")
    _, _, _, ranks, logits = tied
    made, factors = outputs
    cfg = json.loads((made["peft"] / "adapter" / export.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert set(cfg["target_modules"]) == set(ranks)
    assert cfg["base_model_name_or_path"] == str((made["peft"] / "base").resolve())
    base = AutoModelForCausalLM.from_pretrained(made["peft"] / "base")
    model = peft.PeftModel.from_pretrained(base, made["peft"] / "adapter").eval()
    result = model.load_adapter(made["peft"] / "adapter", adapter_name="again")
    assert not result.missing_keys and not result.unexpected_keys
    layers = dict(model.base_model.model.named_modules())
    for name, (A, B) in factors["peft"].items():
        lora = layers[name]
        assert lora.scaling["default"] == 1.0 and lora.r["default"] == ranks[name]
        torch.testing.assert_close(lora.lora_A["default"].weight, B.float())
        torch.testing.assert_close(lora.lora_B["default"].weight, A.float())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, atol=1e-4, rtol=1e-4)
    loaded = export.load_model(made["peft"])  # the same through our loader
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, logits, atol=1e-4, rtol=1e-4)


def test_sharded_source_round_trips(tiny_model_dir, tmp_path):
    src = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval()
    model.save_pretrained(src, max_shard_size="60KB")
    assert (src / export.INDEX_FILE).is_file()
    names = linear_names(model)
    Rs = activation_factors(model, names, batches=2)
    ranks = {n: 8 for n in names}
    write("factorized", src, tmp_path / "fac", ranks, Rs)
    write("dense", src, tmp_path / "dense", ranks, Rs)
    index = json.loads((tmp_path / "fac" / export.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((tmp_path / "fac" / f).is_file() for f in index["weight_map"].values())
    fac = export.load_model(tmp_path / "fac")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(fac(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=1e-5)


def test_a_single_file_source_over_the_shard_limit_is_written_in_pieces(tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """A 7 GB model.safetensors once cost the writer 12 GiB: a source shard larger than
    SHARD_BYTES is read and written in pieces, with the same tensors as in one file."""
    from coala_stream import weights

    src = tiny_model_dir()
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    names = linear_names(model)
    Rs = activation_factors(model, names, batches=2)
    ranks = {n: 8 for n in names}
    whole = {fmt: tmp_path / f"{fmt}-whole" for fmt in ("factorized", "dense", "peft")}
    for fmt, out in whole.items():
        write(fmt, src, out, ranks, Rs)
    assert not (whole["dense"] / export.INDEX_FILE).exists()
    read_shards = []
    original_read = LazyWeights.read
    monkeypatch.setattr(LazyWeights, "read", lambda self, keys: read_shards.append(
        sum(self.nbytes(k) for k in keys)) or original_read(self, keys))
    monkeypatch.setattr(weights, "SHARD_BYTES", 40_000)
    for fmt, out in whole.items():
        pieces = tmp_path / f"{fmt}-pieces"
        write(fmt, src, pieces, ranks, Rs)
        base = "base/" if fmt == "peft" else ""
        index = json.loads((pieces / f"{base}{export.INDEX_FILE}").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        split = {}
        for f in files:
            split.update(load_file(pieces / base / f))
        one = load_file(out / base / "model.safetensors")
        assert split.keys() == one.keys() == index["weight_map"].keys()
        assert all(torch.equal(split[k], one[k]) for k in one)
    largest = max(LazyWeights(src).nbytes(k) for k in LazyWeights(src).shard_of)
    assert max(read_shards) <= max(40_000, largest)  # a piece, or one tensor over the limit
    assert sum(read_shards) > 3 * 40_000 * 2  # each format read the whole model, in pieces
    fac = export.load_model(tmp_path / "factorized-pieces")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense-pieces")
    with torch.no_grad():
        torch.testing.assert_close(fac(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=1e-5)


def test_save_loaded_writes_shards_under_the_limit(tiny_model_dir, tmp_path, monkeypatch):
    from coala_stream import weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval()
    monkeypatch.setattr(weights, "SHARD_BYTES", 40_000)
    weights.save_loaded(model, tmp_path / "saved")
    source = LazyWeights(tmp_path / "saved")
    assert source.sharded and len(source.shards) > 2
    assert all(sum(source.nbytes(k) for k in source.keys_of[s]) <= 40_000
               or len(source.keys_of[s]) == 1 for s in source.shards)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits)


def test_split_by_size_keeps_order_and_an_empty_shard():
    sizes = {"a": 5, "b": 5, "c": 20, "d": 1}
    from coala_stream.weights import split_by_size

    assert split_by_size(list(sizes), sizes.get, 10) == [["a", "b"], ["c"], ["d"]]
    assert split_by_size([], sizes.get, 10) == [[]]


def test_low_rank_linear_computes_a_of_b():
    layer = export.LowRankLinear(6, 5, 2, bias=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ layer.B.weight.T @ layer.A.weight.T + layer.A.bias)
    assert sum(p.numel() for p in layer.parameters()) == 2 * (6 + 5) + 5


def test_staging_refuses_existing_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(UsageError, match="already exists"):
        with export.staging_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with export.staging_dir(out, overwrite=True) as stage:
            (stage / "half").write_text("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "keep").read_text() == "old"
    with export.staging_dir(out, overwrite=True) as stage:
        (stage / "new").write_text("y")
    assert sorted(os.listdir(out)) == ["new"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_detect_and_load_errors(tmp_path):
    assert export.detect_format(tmp_path) is None
    with pytest.raises(CoalaError, match="not a model directory"):
        export.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {export.SECTION: {"format": "factorized", "format_version": 99, "tool_version": "9"}}))
    with pytest.raises(CoalaError, match="upgrade coala-stream"):
        export.detect_format(tmp_path)


def test_adapter_config_patterns_for_mixed_ranks():
    cfg = export.adapter_config({"a.q": 8, "a.k": 8, "a.v": 4}, "/base",
                                {"architectures": ["LlamaForCausalLM"]})
    assert cfg["r"] == cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"a.v": 4}


def test_every_format_is_readable_by_others_under_umask_022(tied, tmp_path):
    # safetensors' save_file makes 0600 files whatever the umask: colleagues on a shared
    # cluster could not read the model; every file must get what open() would give
    path, _, Rs, ranks, _ = tied
    umask = os.umask(0o022)
    try:
        for fmt in export.WRITERS:
            write(fmt, path, tmp_path / fmt, ranks, Rs)
    finally:
        os.umask(umask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".safetensors" for p in files) >= len(export.WRITERS)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o644}
    assert not wrong
    assert all(p.stat().st_mode & 0o777 == 0o755 for p in tmp_path.rglob("*") if p.is_dir())
