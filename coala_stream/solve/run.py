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
from pathlib import Path

import torch

from .. import export, models
from ..devices import resolve_device, torch_threads
from ..errors import CheckpointMismatch, CoalaError, StoreError, UsageError
from ..files import write_json
from ..reduce import read_result, result_path, result_state
from ..store import open_store
from ..weights import LazyWeights, open_weights
from .allocate import choose_ranks, uniform_ranks
from .config import SolveConfig
from .layer import Layer, cond_estimate, solve_layer
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
        spec = _model_spec(store, config)
        model_config = models.load_config(spec)
        _check_out_is_not_an_input(out, [Path(store.path), spec.resolve()[0]])
        _check_model(store, spec, model_config)
        notes: list[str] = check_capture_complete(store, config.allow_incomplete)
        layers = plan_layers(store, model_config, config.layers)
        check_reduced(store, {layer.input for layer in layers})
        notes += propagate_notes(store, config)
        for note in notes:
            say(f"note: {note}")
        with export.staging_dir(out, config.overwrite) as stage:
            report = _solve_into(stage, out, store, spec, model_config, layers, config, notes,
                                 progress, say, t0)
    report["out"] = str(out)
    return report


def _solve_into(stage, out, store, spec, model_config, layers, config, notes, progress, say, t0):
    source, note = open_weights(spec, model_config, stage / ".source", say)
    if note:
        notes.append(note)
    _check_weights(source, layers)
    device = resolve_device(config.device)
    reader = _Reader(store, device)
    allocation = choose_ranks(layers, uniform_ranks(layers, config), config, source, reader,
                              progress)
    writer = export.WRITERS[config.format](stage, source, final_dir=out)
    rows = _factor_pass(layers, reader, writer, config, device, progress)
    report = build_report(store, spec, config, layers, rows, allocation, notes,
                          time.perf_counter() - t0)
    writer.finish(config_section(store, spec, config, allocation))
    write_json(stage / export.REPORT_FILE, report)
    shutil.rmtree(stage / ".source", ignore_errors=True)
    return report


def check_capture_complete(store, allow: bool) -> list[str]:
    """StoreError for a store whose capture has not finished, unless ``allow`` (then a note
    for the report): a killed or running capture holds only part of the calibration."""
    capture = store.attrs.get("capture") or {}
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
    """Reduce results for one input at a time (q/k/v and gate/up share theirs), with cond(R)."""

    def __init__(self, store, device):
        self.store, self.device = store, device
        self.name, self.value, self.cond = None, None, None
        self._conds: dict[str, tuple[float, str]] = {}  # layers sharing an input may not be adjacent

    def get(self, name: str):
        if name != self.name:
            self.value = None  # free the previous R first
            reduced = read_result(self.store, name)
            reduced.R = reduced.R.to(self.device)
            if name not in self._conds:
                self._conds[name] = cond_estimate(reduced.R)
            self.name, self.value, self.cond = name, reduced, self._conds[name]
        return self.value




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
            rows[name] = layer_row(layer, res, reader.cond, peft)
            bar.update()
            return res["A"].cpu(), res["B"].cpu()

        writer.write(list(active), factor)
    return [rows.get(l.name) or dense_row(l) for l in layers]
