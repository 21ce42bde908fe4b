"""The factors a propagating capture applied, one file per decoder block: the one writer and reader.

``STORE/applied/block-<k>.safetensors`` (HDF5 stores: ``x.h5.applied/``): tensors
``<module>.A`` (m x r) and ``<module>.B`` (r x n) as solved (float32 or wider), and
metadata ``{"block": k, "groups_done": g, "refine_steps": s, "settings": {...}}``
(``settings``: the capture's ``--propagate`` settings). Written atomically after each
group of linears is compressed and again after the block's refinement, so a resumed
capture and a later ``solve`` use exactly the factors the compressed model ran with
(refined factors cannot be recomputed from R).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import checkpoint
from .errors import DataError, StoreError

FORMAT = "coala-stream/applied-factors"
# Why the only fix is to start over: the later blocks ran (and were captured) through these
# factors, and refined ones cannot be recomputed from R.
def _lost(store) -> str:
    return ("the factors applied to that block cannot be recomputed from the store (the blocks "
            "after it were captured through them): start over, with compress --overwrite (it "
            f"restarts its work directory) or, for capture --propagate, by deleting {store.path} "
            "and rerunning the capture")


def block_path(store, k: int) -> Path:
    return Path(store.applied_dir) / f"block-{k:05d}.safetensors"


def write_block(store, k: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                meta: dict) -> None:
    """Replace block ``k``'s file with ``factors`` ({module: (A, B)}) and ``meta``."""
    tensors = {}
    for name, (A, B) in factors.items():  # save_state moves them to the CPU
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A, B
    path = block_path(store, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_state(path, tensors, {"format": FORMAT, "block": k, **meta})


def read_block(store, k: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict] | None:
    """(factors, meta) of block ``k``, None when it has no file."""
    path = block_path(store, k)
    if not path.is_file():
        return None
    try:
        tensors, meta = checkpoint.load_state(path)
    except DataError as exc:
        raise StoreError(f"{exc.args[0].split(';')[0]}: {_lost(store)}") from exc
    if meta.get("format") != FORMAT or meta.get("block") != k:
        raise StoreError(f"{path} is not the applied-factors file of block {k}; delete "
                         f"{path.parent} and rerun the capture")
    names = sorted({key[:-2] for key in tensors})
    return {n: (tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in names}, meta


def expected_groups(store) -> dict[int, int]:
    """{block: groups} the store's inputs say were compressed: a propagating capture creates
    one input per group of linears (``model.layers.<k>.``...) when it starts the block."""
    counts: dict[int, int] = {}
    for name in store.inputs:
        m = re.search(r"\.(\d+)\.", name)
        if m:
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def check_blocks(store, before: int | None = None) -> None:
    """StoreError naming the file and the fix unless every block (below ``before``; None:
    all) that has inputs in the store has its factors file, whole (header and length, not
    the tensors: cheap on resume) and covering all its groups."""
    for k, groups in sorted(expected_groups(store).items()):
        if before is not None and k >= before:
            break
        path = block_path(store, k)
        if not path.is_file():
            raise StoreError(f"{path} is missing: block {k} was compressed, {_lost(store)}")
        try:
            meta = checkpoint.load_meta(path)
        except DataError as exc:
            raise StoreError(f"{exc.args[0].split(';')[0]}: {_lost(store)}") from exc
        if meta.get("format") != FORMAT or meta.get("block") != k \
                or int(meta.get("groups_done", 0)) < groups:
            raise StoreError(f"{path} does not hold the {groups} groups of block {k} (it says "
                             f"block {meta.get('block')}, {meta.get('groups_done')} groups): "
                             f"{_lost(store)}")


def read_all(store) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[dict]]:
    """Every block's factors merged ({module: (A, B)}) and the blocks' metadata, in block order.
    For a finished capture every compressed block must be there (`check_blocks`): a missing
    file must not leave that block dense in a model said to be compressed."""
    directory = Path(store.applied_dir)
    factors: dict = {}
    metas: list[dict] = []
    if (store.attrs.get("capture") or {}).get("complete") and \
            (store.attrs.get("capture_settings") or {}).get("propagate"):
        check_blocks(store)
    if not directory.is_dir():
        return factors, metas
    for path in sorted(directory.glob("block-*.safetensors")):
        k = int(path.stem.split("-", 1)[1])
        got = read_block(store, k)
        if got is not None:
            factors.update(got[0])
            metas.append(got[1])
    return factors, metas

