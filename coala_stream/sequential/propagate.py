"""Propagation (``capture --sequential --propagate``): reduce, solve and compress block by block.

Block k: capture pass (block k as it is, on the hidden states of the compressed
blocks before it), `reduce_inputs` (reduce's own driver, restricted to block k's
inputs, so it holds the store's reduce lock), `compress_block` (solve's
`factor_layers`: the code of ``coala-stream solve`` with uniform ranks), then a
propagation pass through the compressed block whose outputs feed block k+1.
"""

from __future__ import annotations

import dataclasses
import re
import time

import torch

from .. import checkpoint
from ..devices import resolve_device, torch_threads
from ..errors import StoreError
from ..capture import Plan
from ..reduce import DTYPES, Partial, ReduceConfig, fold_group, read_result, run_reduce
from ..solve import Layer, SolveConfig, factor_layers
from .blocks import BlockModel
from .passes import capture_block
from .config import SequentialConfig
from .workdir import WorkDir


def propagate_block(bm: BlockModel, k: int, store, work: WorkDir, src: str, dst: str,
                    targets: list, is_last: bool, rec: dict, plan: Plan, config: SequentialConfig,
                    bar, say, timing: dict) -> int:
    """Block ``k`` (loaded) with --propagate: capture pass, reduce, solve, compress, propagation
    pass (module docstring); returns raw bytes written."""
    raw = 0
    if rec.get("captured") != k:
        raw = capture_block(bm, k, store, work, src, dst, targets, False, rec, plan, config,
                             bar, say)
        rec["captured"] = k
        work.write_progress(rec)
    names = [n for n in store.inputs if bm.block_of(n) == k]
    if names:
        t = time.perf_counter()
        reduce_inputs(config, plan, names)
        timing["reduce_seconds"] += time.perf_counter() - t
    if is_last:
        return raw  # nothing after it sees its outputs
    if names:
        t = time.perf_counter()
        with torch_threads(plan.compute_threads):
            timing["compressed_layers"] += len(compress_block(bm, k, store, work, names, plan))
        timing["solve_seconds"] += time.perf_counter() - t
    capture_block(bm, k, store, work, src, dst, [], True, rec, plan, config, bar, say)
    return raw


def reduce_inputs(config: SequentialConfig, plan: Plan, names: list[str] | None) -> dict:
    """``run_reduce`` with its defaults on the capture's device: ``names`` (exactly) or every
    input; a finished result is skipped, a checkpoint resumed, a longer input extended."""
    pattern = None if names is None else "^(?:" + "|".join(map(re.escape, names)) + ")$"
    return run_reduce(config.out, ReduceConfig(device=str(plan.device), inputs=pattern,
                                               threads=plan.compute_threads),
                      progress=False)


def reduced_input(store, work: WorkDir, name: str, device: torch.device):
    """The store's reduce result of ``name`` with its pending partial chunk (if any) folded on
    top in memory, as the final reduce will fold it; a ``ReducedInput``."""
    red = read_result(store, name)
    info = store.input(name)
    if red is None or not red.complete or red.meta.get("next_chunk") != info.num_chunks:
        raise StoreError(f"{store.path}: input {name} has no complete reduce result after "
                         f"reducing it; rerun the same command")
    if info.tokens == work.samples * work.seq_len:
        return red
    p = work.pending_path(name)
    if not p.is_file():
        raise StoreError(f"{store.path}: input {name} holds {info.tokens} of "
                         f"{work.samples * work.seq_len} rows and its last chunk is missing from "
                         f"{p.parent}; delete {work.path} and rerun to recompute it")
    t, meta = checkpoint.load_state(p)
    if meta.get("index") != info.num_chunks:
        raise StoreError(f"{p}: pending chunk {meta.get('index')} does not follow the "
                         f"{info.num_chunks} committed chunks of {name}")
    part = Partial(red.R, red.abs_sum, red.gram, red.tokens).to(device)
    fold_group(part, [(info.num_chunks, t["rows"])], name=name, n=info.n,
               dtype=DTYPES[red.meta["settings"]["dtype"]], device=device)
    return dataclasses.replace(red, R=part.R, abs_sum=part.abs_sum, gram=part.gram,
                               tokens=part.tokens, meta={**red.meta, "pending_folded": True})


def compress_block(bm: BlockModel, k: int, store, work: WorkDir, names: list[str],
                   plan: Plan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace the weights of block ``k``'s linears (the consumers of ``names``) by A @ B as
    ``coala-stream solve`` computes them from this store with the capture's --propagate
    settings, on the capture's device. Returns {module name: (A, B)} of the layers changed
    (layers whose rank saves no parameters stay dense, as solve keeps them)."""
    settings = plan.attrs["capture_settings"]["propagate"]
    cfg = SolveConfig(out="-", **settings)
    device = plan.device
    head = f"{bm.prefix}.{k}."
    mods = dict(bm.blocks[k].named_modules())
    layers = []
    for name in names:
        for consumer in store.input(name).consumers:
            mod = mods[consumer[len(head):]]
            layers.append(Layer(consumer, name, mod.out_features, mod.in_features))
    dtypes: dict[str, torch.dtype] = {}

    def weight(consumer: str) -> torch.Tensor:
        if bm.weights is not None:  # as stored, as solve reads it
            W = bm.weights.read([consumer + ".weight"])[consumer + ".weight"]
        else:  # loaded whole (GGUF): the weights as the model holds them
            W = mods[consumer[len(head):]].weight.detach()
        dtypes[consumer] = W.dtype
        return W

    reduce_device = resolve_device(str(device))
    factors = factor_layers(layers, weight, lambda n: reduced_input(store, work, n, reduce_device),
                                  cfg, device)
    with torch.no_grad():
        for consumer, res in factors.items():
            mod = mods[consumer[len(head):]]
            mod.weight.copy_((res["A"] @ res["B"]).to(dtypes[consumer]))  # solve --format dense
    return {c: (res["A"], res["B"]) for c, res in factors.items()}
