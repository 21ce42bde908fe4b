"""Solve: low-rank factors for every linear layer from a reduced store, written as a model.

For each ``nn.Linear`` in scope (by default every consumer recorded in the
store, i.e. the linears inside the decoder blocks; ``layers`` narrows it), the
weight W (m x n, out x in) is read lazily from the source checkpoint and the
factor R of its input from ``store.factor(input)``; a method from `METHODS`
turns them into A (m x r) and B (r x n), and a writer from
`export.WRITERS` stores the result. COALA (Parkina et al., arXiv 2507.07580)
is ``W R^T = U S V^T, A = U_r, B = U_r^T W``: no Gram matrix, no inverse.

Sizes (SVD-LLM's convention): ``ratio`` is the fraction of each compressed
matrix's parameters removed, ``rank = floor((1 - ratio) m n / (m + n))``; or a
fixed ``rank``. ``allocate="global"`` spends the same total parameter budget
across layers where it lowers the summed *normalised* error most (see
`allocate_global`). ``mu`` is relative: the absolute regularisation is
``mu * ||R||_F^2 / n`` (the mean diagonal of X^T X), applied as one more fold of
sqrt(mu) I into R; ``adaptive_mu`` multiplies it by the layer's squared relative
error at its rank, as the COALA authors' code offers.

Memory: one source shard, one layer's W and the R of its input (n x n), plus
the factors of that shard. A GGUF source (the embedded default) or a
checkpoint without safetensors is first loaded whole by transformers (GGUF is
de-quantised on load) and re-saved as safetensors in the staging directory.
"""

from __future__ import annotations

import heapq
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import export, models
from ._version import __version__
from .baselines import NumericalFallbackWarning, asvd_factors, svd_factors, svdllm_factors
from .devices import resolve_device
from .errors import CheckpointMismatch, CoalaError, StoreError, UsageError
from .linalg import balance_factors, coala_factors, coala_svd, rank_for_ratio, tail_energy

METHODS = ("coala", "svd", "svdllm", "asvd")
ALLOCATIONS = ("uniform", "global")


@dataclass
class SolveConfig:
    """Settings of one solve; each field's help is also its CLI help."""

    out: str = field(metadata={"help": "output directory (written beside it under a temporary "
                                       "name, renamed when complete)"})
    model: str | None = field(default=None, metadata={
        "help": "the source model (HF directory or .gguf file); default: the one recorded in the store"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "name of the GGUF file inside MODEL, when MODEL is a directory"})
    method: str = field(default="coala", metadata={
        "help": "coala (W R^T SVD, Gram-free) | svd (weights only) | svdllm (Gram + Cholesky, "
                "as SVD-LLM) | asvd (activation-scaled SVD)"})
    ratio: float | None = field(default=None, metadata={
        "help": "fraction of each compressed matrix's parameters to remove, in (0, 1) "
                "(SVD-LLM convention: 0.2 keeps 80 percent; rank = floor((1-F) m n / (m + n)))"})
    rank: int | None = field(default=None, metadata={
        "help": "fixed rank for every layer instead of --ratio (the adapter rank for --format peft)"})
    allocate: str = field(default="uniform", metadata={
        "help": "uniform: the same ratio (or rank) per layer | global: the same total parameter "
                "budget spent where it lowers the summed normalised error most (kept only if it "
                "beats uniform on that error)"})
    mu: float = field(default=0.0, metadata={
        "help": "regularisation mu, relative: absolute mu = F * ||R||_F^2 / n; coala only"})
    adaptive_mu: bool = field(default=False, metadata={
        "help": "scale mu per layer by its squared relative error at its rank (COALA authors' option)"})
    layers: str | None = field(default=None, metadata={
        "help": "regular expression (re.search) choosing the linear layers to compress among those "
                "the store has inputs for; default: all of them"})
    format: str = field(default="factorized", metadata={
        "help": "factorized: two small linears per layer, load with coala_stream.load_model | "
                "dense: W' = A B in an ordinary HF checkpoint | peft: residual base W - A B plus "
                "a LoRA adapter holding A, B"})
    asvd_alpha: float = field(default=0.5, metadata={"help": "ASVD's exponent on mean |x|"})
    device: str = field(default="cpu", metadata={"help": "where to compute: cpu, cuda or cuda:N"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"--allocate must be uniform or global, got {self.allocate!r}")
        if self.format not in export.WRITERS:
            raise UsageError(f"--format must be one of {', '.join(export.WRITERS)}, got {self.format!r}")
        if (self.ratio is None) == (self.rank is None):
            raise UsageError("give exactly one of --ratio F (fraction of parameters to remove) or "
                             "--rank N")
        if self.ratio is not None:
            rank_for_ratio(2, 2, self.ratio)  # UsageError unless 0 < ratio < 1
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.mu, (int, float)) and math.isfinite(self.mu) and self.mu >= 0):
            raise UsageError(f"--mu must be a finite number >= 0, got {self.mu!r}")
        if self.mu > 0 and self.method != "coala":
            raise UsageError(f"--mu applies to --method coala only (got --method {self.method})")
        if self.adaptive_mu and self.mu == 0:
            raise UsageError("--adaptive-mu scales --mu per layer; give --mu > 0 as well")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as exc:
                raise UsageError(f"--layers {self.layers!r} is not a valid regular expression: {exc}") from exc
        resolve_device(self.device)


def config_help(name: str) -> str:
    """The help text of a SolveConfig field (the CLI's help, so --help and the code agree)."""
    return next(f.metadata["help"] for f in fields(SolveConfig) if f.name == name)


@dataclass
class Layer:
    """One linear layer to compress: its input in the store, shape, and what solve decided."""

    name: str
    input: str
    m: int
    n: int
    rank: int = 0
    spectrum: torch.Tensor | None = None  # singular values of W R^T (mu = 0), when computed

    @property
    def cost(self) -> int:
        """Parameters per unit of rank."""
        return self.m + self.n

    def saves_parameters(self, rank: int | None = None) -> bool:
        rank = self.rank if rank is None else rank
        return rank * (self.m + self.n) < self.m * self.n


# -- the pure part: one layer's factors, rank allocation -----------------------------


def solve_layer(W: torch.Tensor, reduced, rank: int, config: SolveConfig,
                spectrum: torch.Tensor | None = None) -> dict:
    """Factors of one layer: {"A", "B", "rel_error", "mu", "spectrum", "note", ...}.

    ``reduced`` is the store's ReducedInput (R, abs_sum, gram, tokens). The
    relative error is exact on the calibration data:
    ``||(W - A B) R^T||_F / ||W R^T||_F``, computed in R's dtype (>= float32).
    """
    R = reduced.R
    out: dict = {"mu": 0.0, "note": ""}
    if config.method == "coala":
        mu = 0.0
        if config.mu > 0:
            mu = config.mu * float(R.double().square().sum()) / R.shape[1]
            if config.adaptive_mu:
                if spectrum is None:
                    spectrum = coala_svd(W, R)[1]
                mu *= normalised_tail(spectrum, rank)
            A, B = coala_factors(W, R, rank, mu=mu)
        else:
            A, B, S = coala_factors(W, R, rank, return_singular_values=True)
            spectrum = S if spectrum is None else spectrum
        out["mu"] = mu
    elif config.method == "svd":
        A, B = svd_factors(W, rank)
    elif config.method == "svdllm":
        A, B, out["note"], out["gram_source"] = _svdllm(W, reduced, rank)
    else:
        abs_mean = reduced.abs_sum.to(torch.float64) / max(int(reduced.tokens), 1)
        A, B = asvd_factors(W, abs_mean.to(W.device), rank, alpha=config.asvd_alpha)
    if config.format == "peft":
        A, B = balance_factors(A, B)  # LoRA trains best with sqrt(S) on each side, as PiSSA's
    out.update(A=A, B=B, rel_error=relative_error(W, A, B, R), spectrum=spectrum)
    return out


def _svdllm(W, reduced, rank):
    if reduced.gram is not None:
        gram, source = reduced.gram.to(W.device), "stored"
    else:  # as peers hold it: float32 (from R here, since reduce ran without --with-gram)
        R32 = reduced.R.to(torch.float32)
        gram, source = R32.T @ R32, "R"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalFallbackWarning)
        try:
            A, B = svdllm_factors(W, gram, rank)
        except torch.linalg.LinAlgError as exc:
            raise CoalaError(f"svdllm: {exc} (the Gram matrix is too ill-conditioned; "
                             f"--method coala needs no Cholesky)") from exc
    note = "; ".join(str(w.message) for w in caught if issubclass(w.category, NumericalFallbackWarning))
    return A, B, note, source


def relative_error(W, A, B, R) -> float:
    """||(W - A B) R^T||_F / ||W R^T||_F (0 when W R^T = 0), in R's dtype (>= float32)."""
    dtype = torch.promote_types(R.dtype, torch.float32)
    Wd, Rd = W.to(dtype), R.to(dtype)
    total = torch.linalg.norm(Wd @ Rd.T)
    if float(total) == 0.0:
        return 0.0
    return float(torch.linalg.norm((Wd - A.to(dtype) @ B.to(dtype)) @ Rd.T) / total)


def normalised_tail(S: torch.Tensor, rank: int) -> float:
    """sum_{i >= rank} S_i^2 / sum S_i^2: the squared relative error of the best rank-r fit."""
    tail = tail_energy(S)
    total = float(tail[0])
    return float(tail[min(rank, len(S))]) / total if total > 0 else 0.0


def total_normalised_error(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    return sum(normalised_tail(S, r) for S, r in zip(spectra, ranks))


def allocate_global(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int,
                    caps: list[int]) -> list[int]:
    """Ranks r_i (1 <= r_i <= caps[i]) with sum r_i (m_i + n_i) <= budget, greedy.

    Every layer starts at rank 1; each step raises the rank of the layer whose
    next singular value lowers its normalised error ``S_r^2 / sum S^2`` the most
    per parameter spent (m + n). The tails are convex in r (singular values
    descend), so this is the optimal fractional allocation; it is an integer
    knapsack, so the result may leave fewer than (m + n) parameters of the
    cheapest still-growing layer unspent, and is not guaranteed to beat uniform:
    the caller compares and keeps the better. Cost O(total steps x log layers).
    """
    costs = [m + n for m, n in shapes]
    ranks = [1] * len(spectra)
    spent = sum(costs)
    if spent > budget:
        raise UsageError(f"a parameter budget of {budget} cannot give every layer rank 1 "
                         f"({spent} parameters)")
    totals = [float(tail_energy(S)[0]) for S in spectra]

    def key(i: int) -> tuple[float, int]:
        S, r = spectra[i], ranks[i]
        gain = float(S[r]) ** 2 / totals[i] if r < len(S) and totals[i] > 0 else 0.0
        return (-gain / costs[i], i)

    heap = [key(i) for i in range(len(spectra)) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue  # never fits again: the remaining budget only shrinks
        ranks[i] += 1
        spent += costs[i]
        if ranks[i] < caps[i]:
            heapq.heappush(heap, key(i))
    return ranks


def cond_estimate(R: torch.Tensor, iterations: int = 30) -> tuple[float, str]:
    """Estimate of cond(R) (= cond(X), the square root of cond(X^T X)), in O(n^2) per step.

    sigma_max by power iteration on R^T R, sigma_min by inverse iteration with two
    triangular solves per step (R is square upper-triangular here, checked to have no
    zero on its diagonal first), both from a fixed start in float64, so the figure is
    deterministic; it is a lower bound that is close for the spread spectra of real
    activations. An exact SVD of R (O(n^3)) cost more than the factors of the layer.
    inf if R has fewer rows than columns (fewer tokens than features), a zero pivot,
    or a smallest singular value below float64 range.
    """
    k, n = R.shape
    if k < n:
        return math.inf, "rows<n"
    Rd = R[:n].to(torch.float64)
    if not bool((torch.diagonal(Rd) != 0).all()):
        return math.inf, "singular"
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, 1, generator=g, dtype=torch.float64).to(Rd.device)
    w = v.clone()
    for _ in range(iterations):
        v = Rd.T @ (Rd @ v)
        v = v / torch.linalg.norm(v)
        y = torch.linalg.solve_triangular(Rd.T, w, upper=False)
        w = torch.linalg.solve_triangular(Rd, y, upper=True)
        w = w / torch.linalg.norm(w)
        if not bool(torch.isfinite(w).all()):
            return math.inf, "est"
    s_max, s_min = float(torch.linalg.norm(Rd @ v)), float(torch.linalg.norm(Rd @ w))
    return (s_max / s_min if s_min > 0 else math.inf), "est"


# -- the driver ------------------------------------------------------------------------


def run_solve(store_path, config: SolveConfig, progress: bool = True) -> dict:
    """Compress the model of the store at ``store_path``; returns the report (also saved
    as ``solve_report.json`` in the output directory).

    Raises UsageError for bad settings, StoreError for a store that is not (fully)
    reduced, CheckpointMismatch for a model or R that does not match the store.
    Nothing appears at ``config.out`` unless the whole output was written.
    """
    from .store import open_store

    t0 = time.perf_counter()
    config.validate()
    out = export.check_out_dir(config.out, config.overwrite)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    store = open_store(store_path)
    try:
        spec = _model_spec(store, config)
        model_config = models.load_config(spec)
        _check_out_is_not_an_input(out, [Path(store.path), spec.resolve()[0]])
        _check_model(store, spec, model_config)
        layers = plan_layers(store, model_config, config.layers)
        check_reduced(store, {layer.input for layer in layers})
        notes: list[str] = _propagate_notes(store, config)
        for note in notes:
            say(f"note: {note}")
        with export.staging_dir(out, config.overwrite) as stage:
            source = open_source(spec, model_config, stage, notes, say)
            _check_weights(source, layers)
            device = resolve_device(config.device)
            reader = _Reader(store, device)
            uniform = uniform_ranks(layers, config)
            allocation = choose_ranks(layers, uniform, config, source, reader, progress)
            writer = export.WRITERS[config.format](stage, source, final_dir=out)
            rows = _factor_pass(layers, reader, writer, config, device, progress)
            report = _report(store, spec, config, layers, rows, allocation, notes,
                             time.perf_counter() - t0)
            writer.finish(_section(store, spec, config, allocation))
            export.write_json(stage / export.REPORT_FILE, report)
            if (stage / ".source").exists():
                import shutil

                shutil.rmtree(stage / ".source")
    finally:
        store.close()
    report["out"] = str(out)
    return report


def _propagate_notes(store, config: SolveConfig) -> list[str]:
    """A store captured with --propagate was fitted to one compression; say when this differs."""
    applied = (store.attrs.get("capture_settings") or {}).get("propagate")
    if not applied:
        return []
    wanted = {"method": config.method, "ratio": config.ratio, "rank": config.rank, "mu": float(config.mu)}
    differ = [f"{k} {applied.get(k)} -> {v}" for k, v in wanted.items() if applied.get(k) != v]
    if config.allocate != "uniform" or config.layers is not None:
        differ.append("allocation/--layers other than capture's uniform, all-layer compression")
    if not differ:
        return []
    return [f"the store was captured with --propagate for {applied}, so later blocks' activations "
            f"assume that compression; this solve differs ({'; '.join(differ)}), so its layers "
            f"are fitted to inputs they will not see exactly"]


def _model_spec(store, config: SolveConfig) -> models.ModelSpec:
    if config.model is None and config.gguf_file is None:
        return models.ModelSpec.from_attrs(store.attrs.get("model") or {})
    return models.ModelSpec.from_args(config.model, config.gguf_file)


def _check_out_is_not_an_input(out: Path, inputs: list[Path]) -> None:
    """--overwrite replaces OUT at the end: refuse an OUT that is, or holds, the store or model."""
    target = out.resolve()
    for p in inputs:
        p = p.resolve()
        if p == target or target in p.parents:
            raise UsageError(f"--out {out} is or contains {p}, which this solve reads from; "
                             f"choose another output directory")


def _check_model(store, spec, model_config) -> None:
    recorded = (store.attrs.get("model") or {}).get("config_sha256")
    if recorded and recorded != models.config_sha256(model_config):
        raise CheckpointMismatch(
            f"the model {spec.describe()} does not match the store {store.path}: its config hash "
            f"differs from the one recorded by capture (model {store.attrs['model'].get('name_or_path')}); "
            f"pass --model with the model the store was captured from")


def plan_layers(store, model_config, pattern: str | None) -> list[Layer]:
    """The store's consumers that are nn.Linear in the model (skeleton built on the meta
    device, no weights), filtered by ``pattern``, in model order."""
    skeleton = _skeleton(model_config)
    modules = dict(skeleton.named_modules())
    layers, others = [], []
    for name in store.inputs:
        info = store.input(name)
        for consumer in info.consumers:
            if pattern is not None and not re.search(pattern, consumer):
                continue
            module = modules.get(consumer)
            if not isinstance(module, torch.nn.Linear):
                others.append(consumer)
                continue
            if module.in_features != info.n:
                raise CheckpointMismatch(
                    f"{consumer} takes {module.in_features} inputs but the store's input {name!r} "
                    f"has {info.n} columns: the store was captured from another model")
            layers.append(Layer(consumer, name, module.out_features, module.in_features))
    if others:
        raise CoalaError(f"{len(others)} consumer(s) recorded in the store are not nn.Linear in "
                         f"the model (e.g. {others[0]!r}); exclude them with --layers")
    if not layers:
        raise UsageError(f"--layers {pattern!r} matches none of the store's linear layers")
    return layers


def _skeleton(model_config):
    with torch.device("meta"):
        return export.build_model(model_config)


def check_reduced(store, inputs: set[str]) -> None:
    """StoreError unless every input has a complete reduce result made from the current data."""
    from .store._format import factor_meta

    for name in store.inputs:
        if name not in inputs:
            continue
        path = store.factor_path(name)
        hint = f"run `coala-stream reduce {store.path}`"
        if not path.is_file():
            raise StoreError(f"input {name!r} of {store.path} is not reduced (no {path.name}); {hint}")
        meta = factor_meta(path)
        if not meta.get("complete"):
            raise StoreError(f"input {name!r} of {store.path} is only partly reduced "
                             f"({meta.get('next_chunk')} of {meta.get('chunks')} chunks); {hint} "
                             f"to finish it")
        if meta.get("fingerprint") != store.fingerprint(name):
            raise StoreError(f"the reduce result of input {name!r} was made from other data than "
                             f"the store now holds (capture continued or was redone); {hint}")


def open_source(spec, model_config, stage: Path, notes: list[str], say) -> export.ShardedCheckpoint:
    """The source weights, read lazily: the model's own safetensors, or (GGUF, .bin) the model
    loaded whole and re-saved as safetensors in ``stage/.source``."""
    directory, gguf_file = spec.resolve()
    if gguf_file is None and export.ShardedCheckpoint.is_checkpoint(directory):
        return export.ShardedCheckpoint(directory)
    what = "de-quantising the GGUF weights" if gguf_file else "loading the weights"
    say(f"{spec.describe()}: {what} (whole model in memory) ...")
    notes.append(f"source {spec.describe()} loaded whole by transformers ({what}) and re-saved "
                 f"as safetensors; weights then read layer by layer")
    dtype = models.resolve_dtype("auto", model_config, spec)
    model = models.load_model(spec, dtype, config=model_config)
    tmp = stage / ".source"
    export.save_loaded(model, tmp)
    del model
    try:
        models.load_tokenizer(spec).save_pretrained(tmp)
    except CoalaError as exc:
        notes.append(f"no tokenizer copied: {exc}")
    return export.ShardedCheckpoint(tmp)


def _check_weights(source: export.ShardedCheckpoint, layers: list[Layer]) -> None:
    for layer in layers:
        key = f"{layer.name}.weight"
        if key not in source:
            raise CheckpointMismatch(f"the source checkpoint {source.dir} has no tensor {key!r}")
        if source.shape(key) != (layer.m, layer.n):
            raise CheckpointMismatch(f"{key} in {source.dir} has shape {source.shape(key)}, the "
                                     f"model config says {(layer.m, layer.n)}")


class _Reader:
    """Reduce results for one input at a time (q/k/v and gate/up share theirs), with cond(R)."""

    def __init__(self, store, device):
        self.store, self.device = store, device
        self.name, self.value, self.cond = None, None, None
        self._conds: dict[str, tuple[float, str]] = {}  # layers sharing an input may not be adjacent

    def get(self, name: str):
        if name != self.name:
            self.value = None  # free the previous R first
            reduced = self.store.factor(name)
            reduced.R = reduced.R.to(self.device)
            if name not in self._conds:
                self._conds[name] = cond_estimate(reduced.R)
            self.name, self.value, self.cond = name, reduced, self._conds[name]
        return self.value


def uniform_ranks(layers: list[Layer], config: SolveConfig) -> list[int]:
    ranks = []
    for layer in layers:
        if config.rank is not None:
            if config.rank > min(layer.m, layer.n):
                raise UsageError(f"--rank {config.rank} exceeds min(m, n) = {min(layer.m, layer.n)} "
                                 f"of {layer.name} ({layer.m} x {layer.n})")
            ranks.append(config.rank)
        else:
            ranks.append(rank_for_ratio(layer.m, layer.n, config.ratio))
    return ranks


def factor_layers(layers: list[Layer], weight, reduced, config: SolveConfig,
                  device: torch.device) -> dict[str, dict]:
    """The factors `run_solve` computes for ``layers`` with uniform ranks, outside a solve run
    (``capture --sequential --propagate`` compresses each block with it as it goes).

    ``weight(module name)`` gives W as the source checkpoint stores it, ``reduced(input
    name)`` the input's ReducedInput. Sets each ``layer.rank`` (`uniform_ranks`); returns
    {module name: `solve_layer` result} for the layers solve compresses: all with
    ``format="peft"``, else those whose rank saves parameters (the others stay dense).
    W and R go to ``device`` as in `run_solve`, so the same inputs give the same factors.
    """
    peft = config.format == "peft"
    for layer, r in zip(layers, uniform_ranks(layers, config)):
        layer.rank = r
    out: dict[str, dict] = {}
    cache: dict[str, object] = {}
    for layer in layers:
        if not (peft or layer.saves_parameters()):
            continue
        if layer.input not in cache:
            red = reduced(layer.input)
            red.R = red.R.to(device)
            cache[layer.input] = red
        out[layer.name] = solve_layer(weight(layer.name).to(device), cache[layer.input],
                                      layer.rank, config)
    return out


def choose_ranks(layers, uniform, config, source, reader, progress) -> dict:
    """Set ``layer.rank`` (uniform or global); returns the allocation summary for the report."""
    for layer, r in zip(layers, uniform):
        layer.rank = r
    if config.allocate == "uniform":
        return {"allocate": "uniform"}
    from tqdm.auto import tqdm

    for layer in tqdm(layers, desc="spectra", unit="layer", disable=None if progress else True):
        W = source.get(f"{layer.name}.weight").to(reader.device)
        layer.spectrum = coala_svd(W, reader.get(layer.input).R)[1].cpu()
    spectra = [layer.spectrum for layer in layers]
    peft = config.format == "peft"
    # keeping a layer dense is what uniform does when its rank saves nothing; count it so
    uniform_cost = [r * l.cost if peft or l.saves_parameters(r) else l.m * l.n
                    for l, r in zip(layers, uniform)]
    budget = sum(uniform_cost)
    caps = [min(l.m, l.n) if peft else max(1, math.ceil(l.m * l.n / l.cost) - 1) for l in layers]
    greedy = allocate_global(spectra, [(l.m, l.n) for l in layers], budget, caps)
    uniform_eff = [r if peft or l.saves_parameters(r) else min(l.m, l.n) for l, r in zip(layers, uniform)]
    err_u = total_normalised_error(spectra, uniform_eff)
    err_g = total_normalised_error(spectra, greedy)
    chosen = "global" if err_g < err_u else "uniform"
    if chosen == "global":
        for layer, r in zip(layers, greedy):
            layer.rank = r
    return {"allocate": chosen, "requested": "global", "budget": budget,
            "spent": sum(r * l.cost for l, r in zip(layers, greedy)) if chosen == "global" else budget,
            "total_normalised_error": min(err_g, err_u), "uniform_total_normalised_error": err_u,
            "global_total_normalised_error": err_g}


def _factor_pass(layers, reader, writer, config, device, progress) -> list[dict]:
    """Factor every layer that is compressed, feeding the writer shard by shard; report rows."""
    from tqdm.auto import tqdm

    peft = config.format == "peft"
    active = {l.name: l for l in layers if peft or l.saves_parameters()}
    rows: dict[str, dict] = {}
    with tqdm(total=len(active), desc="solve", unit="layer", disable=None if progress else True) as bar:
        def factor(name, W):
            layer = active[name]
            res = solve_layer(W.to(device), reader.get(layer.input), layer.rank, config, layer.spectrum)
            rows[name] = _row(layer, res, reader.cond, peft)
            bar.update()
            return res["A"].cpu(), res["B"].cpu()

        writer.write(list(active), factor)
    return [rows.get(l.name) or _dense_row(l) for l in layers]


def _row(layer: Layer, res: dict, cond, peft: bool) -> dict:
    S = res["spectrum"]
    row = {"module": layer.name, "input": layer.input, "shape": [layer.m, layer.n],
           "rank": layer.rank, "params_before": layer.m * layer.n,
           "params_after": layer.rank * layer.cost, "kept_dense": False,
           "rel_error": res["rel_error"],
           "optimal_rel_error": math.sqrt(normalised_tail(S, layer.rank)) if S is not None else None,
           "cond_R": cond[0], "cond_method": cond[1], "mu": res["mu"], "note": res["note"]}
    if "gram_source" in res:
        row["gram_source"] = res["gram_source"]
    if peft:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "params_after = adapter parameters"
    return row


def _dense_row(layer: Layer) -> dict:
    return {"module": layer.name, "input": layer.input, "shape": [layer.m, layer.n],
            "rank": layer.rank, "params_before": layer.m * layer.n,
            "params_after": layer.m * layer.n, "kept_dense": True, "rel_error": 0.0,
            "optimal_rel_error": None, "cond_R": None, "cond_method": None, "mu": 0.0,
            "note": f"kept dense: rank {layer.rank} x ({layer.m} + {layer.n}) >= {layer.m} x "
                    f"{layer.n} parameters"}


def _report(store, spec, config, layers, rows, allocation, notes, seconds) -> dict:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    return {
        "tool_version": __version__,
        "store": str(store.path),
        "model": spec.describe(),
        "settings": {k: v for k, v in asdict(config).items()},
        "allocation": allocation,
        "totals": {"layers": len(rows), "kept_dense": sum(r["kept_dense"] for r in rows),
                   "params_before": before, "params_after": after,
                   "removed_fraction": 1 - after / before if before else 0.0,
                   "total_normalised_error": sum(r["rel_error"] ** 2 for r in rows)},
        "notes": notes,
        "seconds": round(seconds, 3),
        "layers": [_jsonable(r) for r in rows],
    }


def _section(store, spec, config, allocation) -> dict:
    """What config.json's ``coala_stream`` section records besides the format and ranks."""
    return {"method": config.method, "ratio": config.ratio, "rank": config.rank,
            "allocate": allocation["allocate"], "mu": config.mu, "adaptive_mu": config.adaptive_mu,
            "layers": config.layers, "source_model": spec.describe(),
            "store": {"path": str(Path(store.path).absolute()), "uuid": store.attrs.get("uuid"),
                      "calibration": store.attrs.get("calibration")}}


def _jsonable(row: dict) -> dict:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def format_table(report: dict) -> str:
    """The per-layer report as a fixed-width table with a totals line."""
    width = max([len("module")] + [len(r["module"]) for r in report["layers"]])
    head = (f"{'module':<{width}}  {'shape':>11}  {'rank':>5}  {'params':>21}  {'rel.err':>8}  "
            f"{'cond(R)':>8}  {'mu':>8}")
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        params = f"{r['params_before']:,} -> {r['params_after']:,}"
        cond = r["cond_R"]
        cond = "-" if cond is None else (cond if isinstance(cond, str) else f"{cond:.2e}")
        rank = "dense" if r["kept_dense"] else str(r["rank"])
        lines.append(f"{r['module']:<{width}}  {shape:>11}  {rank:>5}  {params:>21}  "
                     f"{r['rel_error']:>8.4f}  {cond:>8}  {r['mu']:>8.2g}")
    t, a = report["totals"], report["allocation"]
    lines.append(f"total: {t['params_before']:,} -> {t['params_after']:,} parameters in "
                 f"{t['layers']} layers ({100 * t['removed_fraction']:.1f}% removed"
                 f"{', ' + str(t['kept_dense']) + ' kept dense' if t['kept_dense'] else ''}); "
                 f"allocation {a['allocate']}; summed squared relative error "
                 f"{t['total_normalised_error']:.4f}")
    if a.get("requested") == "global":
        lines.append(f"global allocation: normalised error {a['global_total_normalised_error']:.4f} "
                     f"vs uniform {a['uniform_total_normalised_error']:.4f} -> kept {a['allocate']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
