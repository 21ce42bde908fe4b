"""`store_status`: what a store holds and how far capture and reduce got, as plain JSON data.

Every label comes from the code that decides: the capture's from
`capture.capture_state` (the lock a second capture would test), each input's
reduce state from `reduce.result_state` (what reduce does with it next, and
whether solve accepts it). Reads attributes and reduce-file headers, no data.
"""

from __future__ import annotations

import stat

from .capture import capture_state
from .reduce import MERGED_FROM, result_state
from .reduce.result import RESTART_HINT
from .store import format as fmt

# what each reduce state means for the next `coala-stream reduce`
NEXT_REDUCE = {
    "not started": "reduce folds it",
    "in progress": "reduce resumes it",
    "behind": "reduce extends it over the chunks committed since",
    "complete": "reduce skips it; solve accepts it",
    "mismatch": f"reduce refuses it: {RESTART_HINT}",
    "unreadable": f"reduce refuses it: {RESTART_HINT}",
}


def store_status(store) -> dict:
    """JSON-able summary of a store (an open `store.Store`)."""
    attrs = store.attrs
    capture = attrs.get("capture") or {}
    calibration = attrs.get("calibration") or {}
    inputs = [_input_status(store, name) for name in store.inputs]
    raw = sum(i["raw_bytes"] for i in inputs)
    stored = sum(i["stored_bytes"] for i in inputs)
    dropped = sum(i["dropped_chunks"] for i in inputs)
    return {
        "path": str(store.path),
        "backend": store.backend,
        "format_version": attrs.get("format_version"),
        "tool_version": attrs.get("tool_version"),
        "uuid": attrs.get("uuid"),
        "model": attrs.get("model"),
        "tokenizer": attrs.get("tokenizer"),
        "calibration": calibration,
        "dtype": attrs.get("dtype"),
        "chunk_tokens": attrs.get("chunk_tokens"),
        "capture": {
            "samples_done": int(capture.get("samples_done", 0)),
            "samples": _samples(calibration),
            "complete": bool(capture.get("complete", False)),
            **capture_state(store.path, attrs),
        },
        # a store made by `coala-stream merge`: the shards whose R's it holds, no activations
        "merged_from": attrs.get(MERGED_FROM),
        # capture --propagate: the compression applied while capturing, and its factors
        "propagate": _propagate(store, attrs),
        "reduce_dir": str(store.reduce_dir),
        "totals": {
            "inputs": len(inputs),
            "tokens": sum(i["tokens"] for i in inputs),
            "raw_bytes": raw,
            "stored_bytes": stored,
            # the codec's ratio; none once chunks were dropped (their bytes are not on disk)
            "ratio": round(raw / stored, 4) if stored and not dropped else None,
            "dropped_chunks": dropped,
            # reduce's results (the R's) and a propagating capture's factors: beside the
            # activations, and all there is on disk once they were dropped
            "reduce_bytes": _dir_bytes(store.reduce_dir),
            "applied_bytes": _dir_bytes(store.applied_dir),
            "reduce": _count_states(inputs),
        },
        "inputs": inputs,
    }


def _propagate(store, attrs: dict) -> dict | None:
    settings = (attrs.get("capture_settings") or {}).get("propagate")
    if not settings:
        return None
    blocks = sorted(store.applied_dir.glob("block-*.safetensors")) if store.applied_dir.is_dir() else []
    return {**{k: v for k, v in settings.items() if k != "ranks"},
            "ranks": "from a report" if settings.get("ranks") else None,
            "applied_dir": str(store.applied_dir), "applied_blocks": len(blocks)}


def _input_status(store, name: str) -> dict:
    info = store.input(name)
    itemsize = fmt.stored_dtype(str(info.dtype).removeprefix("torch.")).itemsize
    state = result_state(store, info)
    reduce = {"state": state.label, "next_chunk": state.next_chunk, "chunks": state.chunks,
              "tokens": state.tokens, "next": NEXT_REDUCE[state.label]}
    if state.message:
        reduce["detail"] = state.message
    return {
        "name": name,
        "consumers": info.consumers,
        "n": info.n,
        "pair": info.pair,
        **({"pair_outputs": list(info.outputs)} if info.outputs is not None else {}),
        "dropped_chunks": info.dropped,
        "tokens": info.tokens,
        "chunks": info.num_chunks,
        "raw_bytes": info.tokens * info.n * itemsize,
        "stored_bytes": store.stored_bytes(name),
        "reduce": reduce,
    }


def _dir_bytes(path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist). A running reduce or
    capture renames its temporary files into place: one gone between listing and stat counts 0."""
    total = 0
    for f in path.rglob("*") if path.is_dir() else ():
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _count_states(inputs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for i in inputs:
        counts[i["reduce"]["state"]] = counts.get(i["reduce"]["state"], 0) + 1
    return counts


def _samples(calibration: dict):
    """Samples this store's capture covers: a ``--shard`` part's own, else all of them."""
    part = calibration.get("sample_range")
    if calibration.get("shard") and part:
        return int(part[1]) - int(part[0])
    return calibration.get("samples")
