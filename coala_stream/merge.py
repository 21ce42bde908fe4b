"""`merge_shards`: one store for solve from the reduced stores of a ``capture --shard I/N`` array.

N nodes each capture part I of one calibration draw into a store of their own and
reduce it where it lies; `merge_shards` then TSQR-merges the parts' R's input by
input (``reduce.merge_partials``: R of [X_0; ...; X_{N-1}], in part order, plus
the sums of abs_sum, gram and tokens) into a new store. No activations are copied:
the merged store's inputs commit 0 rows, and its root attribute ``merged_from``
(``reduce.MERGED_FROM``) lists the shards. Its reduce results carry the fingerprint
of those empty inputs, so `reduce.result_state` finds them complete with nothing
to fold: solve accepts the store like any other, reduce skips it (and refuses
``--restart``, which could only delete them), status says what it is.

Shards that do not belong together are refused before anything is written, with
one line naming the shard: another model, tokenizer, calibration draw or capture
setting, another input layout, unreduced inputs or other reduce settings,
duplicate or missing parts. The new store appears atomically (built under a
temporary name, then renamed), so a killed merge leaves no half-made store, and
a store already at ``--out`` is replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .capture import capture_state
from .capture.settings import check_not_in_use, lock_path
from .errors import LockedError, StoreError, UsageError
from .reduce import (MERGED_FROM, Partial, merge_partials, merged_from, read_result, result_path,
                     result_state, write_result)
from .reduce.result import RESULT_SETTINGS
from .store import create_store, detect_backend, open_store, remove_store

# What every shard of one capture shares, compared with the first shard given:
# (what the message calls it, path into the root attributes). Not the model's or the data's
# path: nodes may see the same files under other paths, and the hashes say if they are the same.
SAME = (
    ("model config (config_sha256)", ("model", "config_sha256")),
    ("tokenizer", ("tokenizer",)),
    ("calibration data sha256", ("calibration", "sha256")),
    # before the draw's hash, which a BOS changes too: the message names the option
    ("--bos (the token that starts each window)", ("calibration", "bos_token_id")),
    ("calibration draw (tokens_sha256)", ("calibration", "tokens_sha256")),
    ("calibration field", ("calibration", "field")),
    ("--chat-template", ("calibration", "chat_template")),
    ("--samples", ("calibration", "samples")),
    ("--seq-len", ("calibration", "seq_len")),
    ("--seed", ("calibration", "seed")),
    ("dtype", ("dtype",)),
    ("chunk_tokens", ("chunk_tokens",)),
    ("--layers", ("capture_settings", "layers")),
    ("propagate", ("capture_settings", "propagate")),
)
TOGETHER = ("all shards must come from one capture command that differs only in --shard I/N, "
            "each store reduced")


@dataclass
class MergeConfig:
    """Settings of one merge; the field help texts are also the CLI's."""

    out: str = field(metadata={"help": "the merged store to write (a Zarr directory; it appears "
                                       "only when complete)", "metavar": "STORE",
                               "required": True})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a store already at --out (refused while a capture or reduce holds "
                "its lock)"})


@dataclass
class Shard:
    """One shard store, checked on its own: complete, a --shard part, every input reduced."""

    path: Path
    attrs: dict
    index: int
    count: int
    inputs: list[tuple]  # (name, n, consumers, pair, outputs) in store order
    settings: dict  # input name -> its result's RESULT_SETTINGS values

    @property
    def label(self) -> str:
        return f"{self.path} (shard {self.index}/{self.count})"


def _get(attrs: dict, path: tuple):
    for key in path:
        attrs = attrs.get(key) if isinstance(attrs, dict) else None
    return attrs


def read_shard(store) -> Shard:
    """Check one opened shard store on its own; CoalaError naming it if it cannot be merged."""
    attrs, path = store.attrs, Path(store.path)
    cal = attrs.get("calibration") or {}
    if merged_from(store):
        raise StoreError(f"{path} is itself a merged store; merge the shard stores it was made "
                         f"from (listed by `coala-stream status {path}`)")
    if not cal.get("shard"):
        raise StoreError(f"{path} was captured without --shard, so it holds the whole "
                         f"calibration and needs no merge: solve it directly")
    index, count = (int(v) for v in cal["shard"])
    if not (attrs.get("capture") or {}).get("complete"):
        state = capture_state(path, attrs)
        raise StoreError(f"{path} (shard {index}/{count}): its capture is {state['state']}; "
                         f"finish it (rerun its capture command, with --shard {index}/{count}) "
                         f"and reduce it, then merge again")
    inputs, settings = [], {}
    for name in store.inputs:
        info = store.input(name)
        state = result_state(store, info)
        if not state.usable:
            why = f": {state.message}" if state.message else ""
            raise StoreError(f"{path} (shard {index}/{count}): input {name!r} is {state.label} in "
                             f"reduce{why}; run `coala-stream reduce {path}` and merge again")
        inputs.append((name, info.n, list(info.consumers), bool(getattr(info, "pair", False)),
                       info.outputs))
        settings[name] = {k: (state.meta.get("settings") or {}).get(k) for k in RESULT_SETTINGS}
    return Shard(path, attrs, index, count, inputs, settings)


def check_together(shards: list[Shard]) -> list[Shard]:
    """The shards in part order; CoalaError naming the shard that does not belong."""
    ref = shards[0]
    seen: dict[str, Shard] = {}
    for s in shards:
        uid = str(s.attrs.get("uuid"))
        if uid in seen:
            raise UsageError(f"{s.path} is given twice (it is the same store as {seen[uid].path});"
                             f" pass each shard's store once")
        seen[uid] = s
    for s in shards[1:]:
        if s.count != ref.count:
            raise StoreError(f"{s.label} is a part of {s.count}, but {ref.label} of {ref.count}; "
                             f"{TOGETHER}")
        _check_same(s, ref)
    by_index: dict[int, Shard] = {}
    for s in shards:
        if s.index in by_index:
            raise StoreError(f"{s.path} and {by_index[s.index].path} are both shard "
                             f"{s.index}/{s.count}; pass the store of each part once")
        by_index[s.index] = s
    missing = [f"{i}/{ref.count}" for i in range(ref.count) if i not in by_index]
    if missing:
        raise StoreError(f"shard {', '.join(missing)} missing: given "
                         f"{', '.join(f'{i}/{ref.count}' for i in sorted(by_index))}; pass the "
                         f"store of every part (captured with --shard I/{ref.count})")
    return [by_index[i] for i in range(ref.count)]


def _check_same(s: Shard, ref: Shard) -> None:
    for label, path in SAME:
        a, b = _get(s.attrs, path), _get(ref.attrs, path)
        if a != b:
            raise StoreError(f"{s.label} differs from {ref.label} in {label}: {a!r} there, {b!r} "
                             f"here; {TOGETHER}")
    if s.inputs != ref.inputs:
        names = {i[0] for i in s.inputs} ^ {i[0] for i in ref.inputs}
        which = f" (inputs only in one: {sorted(names)[:3]})" if names else \
            " (the same names with other widths, consumers or order)"
        raise StoreError(f"{s.label} holds other inputs than {ref.label}{which}; {TOGETHER}")
    for name, mine in s.settings.items():
        if mine != ref.settings[name]:
            raise StoreError(f"{s.label} reduced input {name!r} with {mine}, {ref.label} with "
                             f"{ref.settings[name]}; reduce every shard with the same --dtype, "
                             f"--with-gram and --group-rows (--restart redoes one)")


def merge_shards(out, shard_paths, overwrite: bool = False) -> dict:
    """Merge the reduced stores at ``shard_paths`` (every part of one ``--shard I/N``
    capture, any order) into a new Zarr store at ``out``; returns a summary:
    ``{"store", "shards", "inputs", "samples", "tokens", "seconds"}``.

    StoreError / UsageError (one line naming the shard) for shards that do not belong
    together, an ``out`` that exists (without ``overwrite``) or is one of the shards;
    LockedError while a capture or reduce holds the store at ``out``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise UsageError("merge needs the stores of the shards: coala-stream merge --out M S1 ... SN")
    _check_out(out, paths, overwrite)
    with ExitStack() as stack:
        stores = [stack.enter_context(open_store(p)) for p in paths]
        shards = check_together([read_shard(s) for s in stores])
        by_path = {Path(s.path): s for s in stores}
        ordered = [by_path[s.path] for s in shards]
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.merging")
        try:
            tokens = _write_merged(tmp, shards, ordered)
            _publish(tmp, out)
        finally:
            if tmp.exists():
                remove_store(tmp)
    return {"store": str(out), "shards": len(shards), "inputs": len(tokens),
            "samples": int(shards[0].attrs["calibration"]["samples"]),
            "tokens": tokens, "seconds": time.perf_counter() - t0}


def _check_out(out: Path, paths: list[Path], overwrite: bool) -> None:
    if str(out).lower().endswith((".h5", ".hdf5")):
        raise UsageError(f"--out {out}: a merged store holds no activations and is always a "
                         f"Zarr directory; pass a name without .h5 / .hdf5")
    for p in paths:
        if p.resolve() == out.resolve():
            raise UsageError(f"--out {out} is one of the shards; choose a new path for the "
                             f"merged store")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise StoreError(f"{out} already exists; choose another --out, or pass --overwrite to "
                         f"replace it")
    backend = detect_backend(out)
    if backend is None and not (out.is_dir() and not any(out.iterdir())):
        raise StoreError(f"{out} exists and is not an activation store; choose another --out "
                         f"(merge never deletes what it did not write)")
    if backend == "hdf5":  # its reduce directory sits beside it: no one rename replaces both
        raise StoreError(f"{out} is an HDF5 store and merge writes a Zarr directory; choose "
                         f"another --out, or delete it yourself first")
    holder = checkpoint.live_holder(lock_path(out))
    if holder is not None:
        raise LockedError(f"--overwrite would replace {out} while a capture holds its lock "
                          f"({checkpoint.describe_holder(holder)}); wait for it or stop it first")
    check_not_in_use(out)


def _merged_attrs(shards: list[Shard]) -> dict:
    """Root attributes of the merged store: the shards' own, as one unsharded capture of
    the whole draw would record them, plus where they came from."""
    ref = shards[0].attrs
    cal = dict(ref["calibration"])
    cal.update(shard=None, sample_range=[0, int(cal["samples"])],
               shard_tokens_sha256=cal.get("tokens_sha256"))
    keep = ("model", "tokenizer", "dtype", "chunk_tokens")
    return {**{k: ref[k] for k in keep if k in ref}, "calibration": cal,
            "capture_settings": {**(ref.get("capture_settings") or {}),
                                 "merged_shards": len(shards)},
            MERGED_FROM: [{"path": str(s.path.resolve()), "uuid": s.attrs.get("uuid"),
                           "shard": [s.index, s.count],
                           "sample_range": (s.attrs["calibration"].get("sample_range"))}
                          for s in shards]}


def _write_merged(tmp: Path, shards: list[Shard], stores: list) -> dict[str, int]:
    """Build the merged store at ``tmp``; {input name: tokens its R covers}."""
    tokens = {}
    with create_store(tmp, "zarr", _merged_attrs(shards)) as merged:
        Path(merged.reduce_dir).mkdir(parents=True, exist_ok=True)
        for name, n, consumers, pair, outputs in shards[0].inputs:
            # pair only when set, so this runs with stores that predate pair inputs
            merged.create_input(name, n, consumers, **({"pair": True} if pair else {}),
                                **({"outputs": outputs} if outputs is not None else {}))
            tokens[name] = _merge_input(merged, name, stores)
        samples = int(shards[0].attrs["calibration"]["samples"])
        merged.commit(samples, {name: (0, []) for name in tokens}, complete=True)
    return tokens


def _merge_input(merged, name: str, stores: list) -> int:
    """Merge input ``name``'s results of ``stores`` (in part order) into ``merged``'s."""
    t0 = time.perf_counter()
    part, meta0, sources, seconds = None, None, [], 0.0
    for store in stores:
        r = read_result(store, name)
        one = Partial(r.R, r.abs_sum, r.gram, r.tokens)
        part = one if part is None else merge_partials(part, one)
        meta0 = meta0 or r.meta
        seconds += float(r.meta.get("seconds", 0.0))
        sources.append({"uuid": store.attrs.get("uuid"), "tokens": r.tokens,
                        "fingerprint": r.meta.get("fingerprint")})
    # the fingerprint of the merged store's empty input: what makes result_state call it
    # complete here (0 of 0 chunks folded) and nowhere else
    write_result(result_path(merged, name), part, {
        "input": name, "n": merged.input(name).n,
        "fingerprint": merged.fingerprint(name, upto=0), "next_chunk": 0, "chunks": 0,
        "tokens": part.tokens, "complete": True, "dtype": meta0.get("dtype"),
        "device": "merge", "threads": torch.get_num_threads(),
        "seconds": round(seconds + time.perf_counter() - t0, 3),  # the shards' reduce, and this
        "settings": meta0.get("settings"), MERGED_FROM: sources})
    return part.tokens


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished store at ``out``; an old one is moved aside first and deleted after,
    so ``out`` is never a half-made store."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.replaced")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        remove_store(old)
