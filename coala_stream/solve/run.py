"""`run_solve`: factors for every linear layer from a reduced store, written as a model.

For each ``nn.Linear`` in scope (by default every consumer recorded in the
store; ``layers`` narrows it), W is read lazily from the source checkpoint
(`weights.LazyWeights`) and R of its input from its reduce result; a method of
`layer.FACTORIZERS` turns them into A (m x r) and B (r x n), and a writer of
`export.WRITERS` stores the result shard by shard.

Memory: one source shard, one layer's W and the R of its input (n x n), plus
the factors of that shard. A GGUF source (the embedded default) or a
checkpoint without safetensors is first loaded whole and re-saved as
safetensors in the staging directory (`weights.open_weights`).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import applied, export, models
from ..devices import resolve_device, torch_threads
from ..errors import CheckpointMismatch, CoalaError, StoreError, UsageError
from ..files import write_json
from ..reduce import read_result, result_path, result_state
from ..store import open_store
from ..weights import LazyWeights, open_weights
from .allocate import choose_ranks, round_ranks, uniform_ranks
from .config import DEFAULT_ALPHA, SolveConfig
from .layer import Layer, cond_estimate, input_view, known_factors, solve_layer
from .loss import loss_allocation, scores_dir_for
from .report import build_report, config_section, dense_row, layer_row, propagate_notes


def run_solve(store_path, config: SolveConfig, progress: bool = True) -> dict:
    """Compress the model of the store at ``store_path``; returns the report (also saved
    as ``solve_report.json`` in the output directory).

    Raises UsageError for bad settings, StoreError for a store that is not (fully)
    reduced, or whose capture is unfinished (unless ``allow_incomplete``),
    CheckpointMismatch for a model or R that does not match the store.
    Nothing appears at ``config.out`` unless the whole output was written.
    """
    t0 = time.perf_counter()
    config.validate()
    out = export.check_out_dir(config.out, config.overwrite)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with open_store(store_path) as store, torch_threads(config.threads):
        spec, model_config, config, layers, notes = _plan(store, config, out)
        notes += propagate_notes(store, config)
        for note in notes:
            say(f"note: {note}")
        with export.staging_dir(out, config.overwrite) as stage:
            report = _solve_into(stage, out, store, spec, model_config, layers, config, notes,
                                 progress, say, t0)
    report["out"] = str(out)
    return report


def _plan(store, config: SolveConfig, out: Path | None = None):
    """What a solve of ``store`` works on, every check made before any weight is read:
    (model spec, model config, ``config`` with its objective resolved, layers, notes).
    ``out``: the output directory, refused when it is or holds the store or the model."""
    spec = _model_spec(store, config)
    model_config = models.load_config(spec)
    if out is not None:
        _check_out_is_not_an_input(out, [Path(store.path), spec.resolve()[0]])
    _check_model(store, spec, model_config)
    notes: list[str] = check_capture_complete(store, config.allow_incomplete)
    config = resolve_objective(store, config)
    layers = plan_layers(store, model_config, config.layers)
    check_reduced(store, {layer.input for layer in layers})
    return spec, model_config, config, layers, notes


def _solve_into(stage, out, store, spec, model_config, layers, config, notes, progress, say, t0):
    source, note = open_weights(spec, model_config, stage / ".source", say)
    if note:
        notes.append(note)
    _check_weights(source, layers)
    device = resolve_device(config.device)
    reader = _Reader(store, device, config.objective)
    known = capture_factors(store, config, notes)
    if known:
        allocation = _ranks_of(layers, known, config)
    else:
        allocation = _allocate(store, spec, model_config, layers, config, source, reader,
                               scores_dir_for(config, out), progress, say)
    writer = export.WRITERS[config.format](stage, source, final_dir=out)
    rows = _factor_pass(layers, reader, writer, config, device, progress, known)
    report = build_report(store, spec, config, layers, rows, allocation, notes,
                          time.perf_counter() - t0)
    writer.finish(config_section(store, spec, config, allocation))
    write_json(stage / export.REPORT_FILE, report)
    shutil.rmtree(stage / ".source", ignore_errors=True)
    return report


def _allocate(store, spec, model_config, layers, config: SolveConfig, source, reader,
              scores: Path, progress, say) -> dict:
    """Set each ``layer.rank`` (uniform, global or loss, then --rank-multiple's rounding);
    the allocation summary for the report."""
    uniform = uniform_ranks(layers, config)
    if config.allocate == "loss":
        allocation = loss_allocation(store, spec, model_config, layers, uniform, config,
                                     reader.device, scores, progress, say)
    else:
        allocation = choose_ranks(layers, uniform, config, source, reader, progress)
    return _rounded(layers, config, allocation)


def _rounded(layers, config: SolveConfig, allocation: dict) -> dict:
    """--rank-multiple's rounding of the ranks an allocation set, recorded in its summary: the
    parameters the rounded ranks spend beside the allocation's own figures (which describe
    the ranks before rounding)."""
    if config.rank_multiple > 1:
        round_ranks(layers, config.rank_multiple)
        allocation["rank_multiple"] = config.rank_multiple
        allocation["spent_after_rounding"] = sum(l.rank * l.cost for l in layers
                                                 if l.saves_parameters())
        allocation["before_rounding"] = ("the other figures of this summary describe the "
                                         "allocation's ranks before --rank-multiple rounded "
                                         "them down")
    return allocation


def allocate_ranks(store_path, config: SolveConfig, stage: Path, progress: bool = True) -> dict:
    """The ranks `run_solve` would give each layer of the store at ``store_path`` (uniform or
    global, as ``config`` says), without writing a model: ``{"layers": [{"module", "rank",
    "kept_dense"}], "allocation": {...}}``, the part of a solve report that ``capture
    --propagate --ranks`` reads. ``stage``: scratch directory for a GGUF source (deleted)."""
    config.validate()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with open_store(store_path) as store, torch_threads(config.threads):
        spec, model_config, config, layers, _ = _plan(store, config)
        try:
            source, _ = open_weights(spec, model_config, Path(stage), say)
            reader = _Reader(store, resolve_device(config.device), config.objective)
            allocation = _allocate(store, spec, model_config, layers, config, source, reader,
                                   scores_dir_for(config, stage), progress, say)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    peft = config.format == "peft"
    return {"allocation": allocation,
            "layers": [{"module": l.name, "rank": l.rank,
                        "kept_dense": not (peft or l.saves_parameters())} for l in layers]}


def capture_factors(store, config: SolveConfig, notes: list[str]) -> dict:
    """{module: (A, B)} the propagating capture of ``store`` applied, when this solve asks for
    exactly that compression (`report.propagate_notes` finds no difference); else {}. They
    are what the compressed model's later blocks were captured with, refined or not."""
    if not (store.attrs.get("capture_settings") or {}).get("propagate") \
            or propagate_notes(store, config):
        return {}
    factors, metas = applied.read_all(store)
    if factors:
        steps = max((m.get("refine_steps") or 0) for m in metas)
        notes.append("factors as the propagating capture applied them"
                     + (f" (refined {steps} steps per block)" if steps else "")
                     + f", from {store.applied_dir}")
    return factors


def _ranks_of(layers: list[Layer], known: dict, config: SolveConfig) -> dict:
    for layer in layers:
        layer.rank = known[layer.name][0].shape[1] if layer.name in known else min(layer.m, layer.n)
    return {"allocate": config.allocate, "source": "the propagating capture's factors",
            "applied_factors": True}


def check_capture_complete(store, allow: bool) -> list[str]:
    """StoreError for a store whose capture has not finished, unless ``allow`` (then a note
    for the report): a killed or running capture holds only part of the calibration."""
    capture = store.attrs.get("capture") or {}
    shard = (store.attrs.get("calibration") or {}).get("shard")
    if capture.get("complete") and shard:  # one node's part of a `capture --shard` job array
        what = f"it holds part {shard[0]}/{shard[1]} of the calibration (capture --shard)"
        if not allow:
            raise StoreError(f"{store.path}: {what}; merge the reduced parts with `coala-stream "
                             f"merge --out M PART...` and solve M, or pass --allow-incomplete "
                             f"to compress from this part alone")
        return [f"--allow-incomplete: {what}; the factors are fitted to that part only"]
    if capture.get("complete"):
        return []
    samples = (store.attrs.get("calibration") or {}).get("samples")
    what = (f"its capture is not complete ({capture.get('samples_done', 0)} of {samples} samples "
            f"committed for every input: a killed or still running capture, or a sequential "
            f"capture whose later blocks do not exist yet)")
    if not allow:
        raise StoreError(f"{store.path}: {what}; rerun the capture command to finish it, or pass "
                         f"--allow-incomplete to compress from the part that is there")
    return [f"--allow-incomplete: {what}; the factors are fitted to that part only"]


def resolve_objective(store, config: SolveConfig) -> SolveConfig:
    """``config`` with ``objective``, ``alpha`` and ``mu`` filled in from the store when left
    out: the output objective (with the capture's alpha) for a store of pair inputs [Xh | X],
    else the input objective; the mu a propagating capture applied (coala only), else 0, so
    that a plain `solve STORE --ratio F` writes the factors the capture applied. StoreError for --objective output on a store without the
    original inputs, UsageError for a method the objective does not take."""
    pair = any(store.input(name).pair for name in store.inputs)
    captured = (store.attrs.get("capture_settings") or {}).get("propagate") or {}
    objective = config.objective or ("output" if pair else "input")
    if objective == "output" and not pair:
        raise StoreError(f"--objective output needs the original model's inputs beside the "
                         f"compressed model's, which {store.path} does not hold; capture with "
                         f"`coala-stream capture --sequential --propagate --objective output`, or "
                         f"solve with --objective input")
    alpha = config.alpha
    if objective == "output" and alpha is None:
        alpha = float(captured.get("alpha") or DEFAULT_ALPHA)
    mu = config.mu
    if mu is None:
        mu = float(captured.get("mu") or 0.0) if config.method == "coala" else 0.0
    resolved = replace(config, objective=objective, alpha=alpha, mu=mu)
    resolved.validate()
    return resolved


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
    skeleton = models.skeleton(model_config)
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
            if module.in_features != info.features:
                raise CheckpointMismatch(
                    f"{consumer} takes {module.in_features} inputs but the store's input {name!r} "
                    f"has {info.features} features: the store was captured from another model")
            layers.append(Layer(consumer, name, module.out_features, module.in_features))
    if others:
        raise CoalaError(f"{len(others)} consumer(s) recorded in the store are not nn.Linear in "
                         f"the model (e.g. {others[0]!r}); exclude them with --layers")
    if not layers:
        raise UsageError(f"--layers {pattern!r} matches none of the store's linear layers")
    return layers




def check_reduced(store, inputs: set[str]) -> None:
    """StoreError unless every input has a complete reduce result of exactly the data the
    store holds now (`reduce.result_state`, as reduce and status judge it)."""
    hint = f"run `coala-stream reduce {store.path}`"
    for name in store.inputs:
        if name not in inputs:
            continue
        state = result_state(store, store.input(name))
        if state.label == "not started":
            raise StoreError(f"input {name!r} of {store.path} is not reduced (no "
                             f"{result_path(store, name).name}); {hint}")
        if state.label == "in progress":
            raise StoreError(f"input {name!r} of {store.path} is only partly reduced "
                             f"({state.next_chunk} of {state.chunks} chunks); {hint} to finish it")
        if state.label == "behind":
            raise StoreError(f"the reduce result of input {name!r} covers {state.next_chunk} of the "
                             f"{state.chunks} chunks the store holds now (capture continued); {hint}")
        if not state.usable:
            raise StoreError(f"the reduce result of input {name!r} was made from other data than "
                             f"the store now holds (capture redone?): {state.message}; {hint} "
                             f"--restart")




def _check_weights(source: LazyWeights, layers: list[Layer]) -> None:
    for layer in layers:
        key = f"{layer.name}.weight"
        if key not in source:
            raise CheckpointMismatch(f"the source checkpoint {source.dir} has no tensor {key!r}")
        if source.shape(key) != (layer.m, layer.n):
            raise CheckpointMismatch(f"{key} in {source.dir} has shape {source.shape(key)}, the "
                                     f"model config says {(layer.m, layer.n)}")


class _Reader:
    """Reduce results for one input at a time (q/k/v and gate/up share theirs), with cond(R).

    A pair input [Xh | X] is handed out whole for the output objective, as Xh's own
    result (`input_view`) for the input objective; cond(R) is always that of Xh."""

    def __init__(self, store, device, objective: str = "input"):
        self.store, self.device, self.objective = store, device, objective
        self.name, self.value, self.cond = None, None, None
        self.problems: dict = {}  # the current input's OutputProblems (`solve_layer`)
        self._conds: dict[str, tuple[float, str]] = {}  # layers sharing an input may not be adjacent

    def get(self, name: str):
        if name != self.name:
            self.value, self.problems = None, {}  # free the previous R first
            reduced = view_for(self.store.input(name), read_result(self.store, name),
                               self.objective)
            reduced.R = reduced.R.to(self.device)
            if name not in self._conds:
                info = self.store.input(name)
                self._conds[name] = cond_estimate(reduced.R[:info.features, :info.features])
            self.name, self.value, self.cond = name, reduced, self._conds[name]
        return self.value

    def narrow(self, layer: Layer) -> tuple | None:
        """``layer``'s (outputs, cols) when its input is a narrow pair and the objective reads
        it whole (`InputInfo.narrow`), else None."""
        if self.objective != "output":
            return None
        return self.store.input(layer.input).narrow(layer.name)


def view_for(info, reduced, objective: str):
    """What a method reads for ``objective`` from the reduce result of input ``info``."""
    if info.pair and objective != "output":
        return input_view(reduced, info.features)
    return reduced


def factor_layers(layers: list[Layer], weight, reduced, config: SolveConfig,
                  device: torch.device, ranks: dict[str, int] | None = None, *,
                  with_error: bool = True, narrow=None) -> dict[str, dict]:
    """The factors `run_solve` computes for ``layers`` with uniform ranks, outside a solve run
    (``capture --sequential --propagate`` compresses each block with it as it goes).

    ``weight(module name)`` gives W as the source checkpoint stores it, ``reduced(input
    name)`` the input's ReducedInput. Sets each ``layer.rank`` (`uniform_ranks`); returns
    {module name: `solve_layer` result} for the layers solve compresses: all with
    ``format="peft"``, else those whose rank saves parameters (the others stay dense).
    W and R go to ``device`` as in `run_solve`, so the same inputs give the same factors.
    ``ranks`` ({module: rank}, e.g. a global allocation made beforehand) replaces the uniform
    ranks; a layer it does not name stays dense. ``with_error=False``: no relative error
    (`solve_layer`), for a caller that keeps only the factors. ``narrow(layer)``: the layer's
    (outputs, cols) when its input is a narrow pair (`InputInfo.narrow`); None: none is.
    """
    peft = config.format == "peft"
    if ranks is None:
        for layer, r in zip(layers, uniform_ranks(layers, config)):
            layer.rank = r
    else:
        for layer in layers:
            layer.rank = ranks.get(layer.name, min(layer.m, layer.n))
    round_ranks([l for l in layers if ranks is None or l.name in ranks], config.rank_multiple)
    out: dict[str, dict] = {}
    cache: dict[str, object] = {}
    problems: dict[str, dict] = {}  # per input: what layers sharing it reuse (`solve_layer`)
    for layer in layers:
        if not (peft or layer.saves_parameters()) or (ranks is not None and layer.name not in ranks):
            continue
        if layer.input not in cache:
            red = reduced(layer.input)
            red.R = red.R.to(device)
            cache[layer.input] = red
        out[layer.name] = solve_layer(weight(layer.name).to(device), cache[layer.input],
                                      layer.rank, config,
                                      problems=problems.setdefault(layer.input, {}),
                                      with_error=with_error,
                                      narrow=None if narrow is None else narrow(layer))
    return out




def _factor_pass(layers, reader, writer, config, device, progress, known=None) -> list[dict]:
    """Factor every layer that is compressed, feeding the writer shard by shard; report rows.
    ``known``: {module: (A, B)} to write instead of solving (`capture_factors`); then
    exactly those layers are compressed."""
    from ..progress import bar as progress_bar

    peft = config.format == "peft"
    active = {l.name: l for l in layers
              if (l.name in known if known else peft or l.saves_parameters())}
    rows: dict[str, dict] = {}
    with progress_bar(len(active), "solve", "layer", enabled=progress) as bar:
        def factor(name, W):
            layer = active[name]
            if known:
                A, B = known[name]
                res = known_factors(W.to(device), reader.get(layer.input), A, B, config,
                                    "applied by the propagating capture", reader.problems,
                                    reader.narrow(layer))
            else:
                res = solve_layer(W.to(device), reader.get(layer.input), layer.rank, config,
                                  layer.spectrum, problems=reader.problems,
                                  narrow=reader.narrow(layer))
            rows[name] = layer_row(layer, res, reader.cond, peft)
            bar.update()
            return res["A"].cpu(), res["B"].cpu()

        writer.write(list(active), factor)
    return [rows.get(l.name) or dense_row(l) for l in layers]
