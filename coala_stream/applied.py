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

from pathlib import Path

import torch

from . import checkpoint
from .errors import StoreError

FORMAT = "coala-stream/applied-factors"


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
    tensors, meta = checkpoint.load_state(path)
    if meta.get("format") != FORMAT or meta.get("block") != k:
        raise StoreError(f"{path} is not the applied-factors file of block {k}; delete "
                         f"{path.parent} and rerun the capture")
    names = sorted({key[:-2] for key in tensors})
    return {n: (tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in names}, meta


def read_all(store) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[dict]]:
    """Every block's factors merged ({module: (A, B)}) and the blocks' metadata, in block order."""
    directory = Path(store.applied_dir)
    factors: dict = {}
    metas: list[dict] = []
    if not directory.is_dir():
        return factors, metas
    for path in sorted(directory.glob("block-*.safetensors")):
        k = int(path.stem.split("-", 1)[1])
        got = read_block(store, k)
        if got is not None:
            factors.update(got[0])
            metas.append(got[1])
    return factors, metas

