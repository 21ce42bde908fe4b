"""The reduce result format: its one writer, its one reader, and what state a result is in.

One safetensors file per input, ``store.reduce_dir / "<name>.safetensors"``,
written atomically by ``checkpoint.save_state`` (docs/design.md, "Reduce
output"). Tensors: ``R`` (k x n), ``abs_sum`` (n, float64), optionally ``gram``
(n x n float32). JSON metadata: fingerprint, next_chunk, chunks, tokens,
complete, dtype, device, threads, seconds, settings, tool_version. The same
file is the checkpoint (``complete: false``) and the result.

`result_state` is the one place that decides what a result is worth against
the store as it is now; reduce (what to do), solve (whether to accept it) and
status (what to show) all ask it, so their words never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint
from .._version import __version__
from ..errors import CheckpointMismatch, DataError, UsageError

# Settings that change the numbers of R: a checkpoint made with others is refused.
RESULT_SETTINGS = ("dtype", "with_gram", "group_chunks")
RESTART_HINT = "rerun reduce with --restart to discard it and start this input over"
# Root attribute of a store made by `coala-stream merge` (`coala_stream.merge`): the shards
# it came from. Such a store holds no activations (every input commits 0 rows); its results
# are the shards' R's merged, so they are complete with nothing to fold, and can only be
# remade by merging again, never by reduce.
MERGED_FROM = "merged_from"
# The reduce run's own record in the reduce directory: the torch thread count the first run
# folded with, so a resumed run (whatever the load makes the default now) folds with it too.
RUN_RECORD = "run.json"
# Tensors a result of an unfinished capture keeps beside R: the state at the last group
# boundary (meta "group_chunk"), from which reduce extends it once the capture has added
# chunks, so it folds the same groups as one reduce of the finished store.
GROUP_PREFIX = "group."


@dataclass
class ReducedInput:
    """What reduce folded one input into.

    R: (k x n) float32/float64 upper-trapezoidal, R^T R = X^T X over the folded rows.
    abs_sum: (n,) float64, sum of |x| per column. gram: (n x n) float32 or None.
    tokens: rows folded so far; complete: all committed chunks folded when it was written.
    meta: the whole JSON metadata (fingerprint, next_chunk, settings, ...).
    """

    name: str
    R: torch.Tensor
    abs_sum: torch.Tensor | None
    gram: torch.Tensor | None
    tokens: int
    complete: bool
    meta: dict


@dataclass
class ResultState:
    """A result file judged against the store now.

    label: "not started" | "in progress" | "behind" (complete when written, but the
    store has committed chunks since: reduce extends it) | "complete" | "mismatch"
    (made from other data or settings: reduce refuses until --restart) | "unreadable".
    """

    label: str
    next_chunk: int = 0
    chunks: int = 0
    tokens: int = 0
    message: str = ""
    meta: dict | None = None

    @property
    def usable(self) -> bool:
        """A finished R of exactly the data the store holds now."""
        return self.label == "complete"


def result_path(store, name: str) -> Path:
    return Path(store.reduce_dir) / f"{name}.safetensors"


def write_result(path: Path, part, meta: dict, at_group=None) -> None:
    """Write a fold state (`fold.Partial`) and its metadata atomically; ``at_group``: the
    state at the last group boundary (a `fold.Partial`, ``meta["group_chunk"]`` says which),
    kept when the result ends between two boundaries (see `GROUP_PREFIX`)."""
    tensors = _tensors(part)
    if at_group is not None:
        tensors.update({GROUP_PREFIX + k: v for k, v in _tensors(at_group).items()})
        meta = {**meta, "group_tokens": at_group.tokens}
    checkpoint.save_state(path, tensors, {**meta, "tool_version": __version__})


def result_meta(info, part, *, next_chunk: int, fingerprint: str, settings: dict, dtype: str,
                device: str, seconds: float, chunks: int | None = None) -> dict:
    """The metadata of a result after ``next_chunk`` of ``chunks`` (default: the input's
    committed chunks; more for a result written ahead of its commit)."""
    chunks = info.num_chunks if chunks is None else chunks
    return {"input": info.name, "n": info.n, "fingerprint": fingerprint,
            "next_chunk": next_chunk, "chunks": chunks, "tokens": part.tokens,
            "complete": next_chunk == chunks, "dtype": dtype, "device": device,
            "threads": torch.get_num_threads(), "seconds": round(seconds, 3),
            "settings": settings}


def _tensors(part) -> dict:
    tensors = {"R": part.R, "abs_sum": part.abs_sum}
    if part.gram is not None:
        tensors["gram"] = part.gram
    return tensors


def group_state(tensors: dict, meta: dict) -> tuple[int, dict, int] | None:
    """(chunk, tensors, tokens) of the group-boundary state a result keeps, or None."""
    group = {k[len(GROUP_PREFIX):]: v for k, v in tensors.items() if k.startswith(GROUP_PREFIX)}
    if "R" not in group or "abs_sum" not in group or "group_chunk" not in meta:
        return None
    return int(meta["group_chunk"]), group, int(meta.get("group_tokens", 0))


def run_threads(reduce_dir: Path, explicit: int | None, current: int) -> tuple[int, str]:
    """(torch threads this reduce folds with, a note or ''): those of the run that started
    the directory's results (`RUN_RECORD`), unless ``explicit``; recorded for the next run."""
    from ..devices import resumed_threads

    path = Path(reduce_dir) / RUN_RECORD
    try:
        recorded = json.loads(path.read_text()).get("threads")
        recorded = recorded if isinstance(recorded, int) and recorded >= 1 else None
    except (OSError, ValueError, AttributeError):  # none yet, or torn: this run's count
        recorded = None
    count, note = resumed_threads(recorded, explicit, current, f"reduce of {reduce_dir}")
    if recorded != count:
        checkpoint.atomic_write(path, json.dumps({"threads": count}).encode())
    return count, note


def read_meta(path: Path) -> dict:
    """The metadata of a result file (its header only); DataError if unreadable."""
    return checkpoint.load_meta(path, fix=RESTART_HINT)


def read_result(store, name: str) -> ReducedInput | None:
    """The result (or checkpoint) of input ``name`` with tensors on the CPU; None if none."""
    store.input(name)  # StoreError for an unknown name
    path = result_path(store, name)
    if not path.is_file():
        return None
    tensors, meta = checkpoint.load_state(path, fix=RESTART_HINT)
    if "R" not in tensors:
        raise DataError(f"reduce file {path} has no tensor 'R' (found {sorted(tensors)}); it was "
                        f"not written by coala-stream reduce: delete it and rerun reduce")
    return ReducedInput(name=name, R=tensors["R"], abs_sum=tensors.get("abs_sum"),
                        gram=tensors.get("gram"), tokens=int(meta.get("tokens", 0)),
                        complete=bool(meta.get("complete", False)), meta=meta)


def result_state(store, info, settings: dict | None = None) -> ResultState:
    """What the result file of input ``info`` (a store InputInfo) is worth now.

    ``settings`` (reduce's, `ReduceConfig.settings`) also compares how it was folded;
    without them (status, solve) any settings are accepted.
    """
    path = result_path(store, info.name)
    merged = merged_from(store)
    if merged and not path.is_file():
        return ResultState("mismatch", chunks=info.num_chunks, message=(
            f"{path.name} is missing from a store merged from {len(merged)} shards, which holds "
            f"no activations to fold: run `coala-stream merge` again to remake it"))
    if merged:
        settings = None  # nothing is folded again, so reduce's own settings do not apply
    if not path.is_file():
        return ResultState("not started", chunks=info.num_chunks)
    try:
        meta = read_meta(path)
    except DataError as exc:
        return ResultState("unreadable", chunks=info.num_chunks, message=str(exc))
    base = dict(next_chunk=int(meta.get("next_chunk", 0)), chunks=info.num_chunks,
                tokens=int(meta.get("tokens", 0)), meta=meta)
    problem = _mismatch(store, info, path, meta, settings)
    if problem:
        return ResultState("mismatch", message=problem, **base)
    if not meta.get("complete"):
        return ResultState("in progress", **base)
    if base["next_chunk"] < info.num_chunks:
        return ResultState("behind", message=f"{path.name} folded {base['next_chunk']} of the "
                           f"{info.num_chunks} chunks the store holds now", **base)
    return ResultState("complete", **base)


def _mismatch(store, info, path: Path, meta: dict, settings: dict | None) -> str:
    if "next_chunk" not in meta or "tokens" not in meta:
        return f"{path} is not a reduce checkpoint (no next_chunk); {RESTART_HINT}"
    for key in RESULT_SETTINGS if settings is not None else ():
        old = (meta.get("settings") or {}).get(key)
        if old != settings[key]:
            return (f"{path} was made with {key}={old!r}, this run uses {key}={settings[key]!r}; "
                    f"use the same settings to resume, or {RESTART_HINT}")
    next_chunk = int(meta["next_chunk"])
    if next_chunk > info.num_chunks:
        return (f"{path} folded {next_chunk} chunks of input {info.name!r} but the store now holds "
                f"{info.num_chunks}: the store was rolled back or recaptured; {RESTART_HINT}")
    if meta.get("fingerprint") != store.fingerprint(info.name, upto=next_chunk):
        return (f"{path} does not match the store: chunks 0..{next_chunk - 1} of input "
                f"{info.name!r} differ from those it folded (another store, or rewritten chunks); "
                f"{RESTART_HINT}")
    return ""


def merged_from(store) -> list[dict] | None:
    """The shards a store made by `coala-stream merge` came from; None for a captured store."""
    return store.attrs.get(MERGED_FROM) or None


def check_restartable(store) -> None:
    """UsageError for ``reduce --restart`` on a merged store: its results cannot be refolded
    (it has no activations), so deleting them would lose them."""
    merged = merged_from(store)
    if merged:
        raise UsageError(f"{store.path} was merged from {len(merged)} shard stores by "
                         f"`coala-stream merge` and holds no activations: reduce has nothing to "
                         f"fold and --restart would only delete its R's; to redo them, reduce the "
                         f"shards with --restart and merge again")


def check_state(state: ResultState) -> None:
    """CheckpointMismatch for a result reduce must not continue from."""
    if state.label in ("mismatch", "unreadable"):
        raise CheckpointMismatch(state.message)
