"""`Store.status()`: what a store holds and how far capture and reduce got, as plain JSON data."""

from __future__ import annotations

from ..errors import CoalaError
from . import _format as fmt


def store_status(store) -> dict:
    """JSON-able summary of a store; reads attributes and reduce-file headers, no data."""
    attrs = store.attrs
    capture = attrs.get("capture") or {}
    calibration = attrs.get("calibration") or {}
    inputs = [_input_status(store, name) for name in store.inputs]
    raw = sum(i["raw_bytes"] for i in inputs)
    stored = sum(i["stored_bytes"] for i in inputs)
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
            "samples": calibration.get("samples"),
            "complete": bool(capture.get("complete", False)),
        },
        "reduce_dir": str(store.reduce_dir),
        "totals": {
            "inputs": len(inputs),
            "tokens": sum(i["tokens"] for i in inputs),
            "raw_bytes": raw,
            "stored_bytes": stored,
            "ratio": round(raw / stored, 4) if stored else None,
            "reduce": _count_states(inputs),
        },
        "inputs": inputs,
    }


def _input_status(store, name: str) -> dict:
    info = store.input(name)
    itemsize = fmt.stored_dtype(str(info.dtype).removeprefix("torch.")).itemsize
    return {
        "name": name,
        "consumers": info.consumers,
        "n": info.n,
        "tokens": info.tokens,
        "chunks": info.num_chunks,
        "raw_bytes": info.tokens * info.n * itemsize,
        "stored_bytes": store.stored_bytes(name),
        "reduce": _reduce_status(store, info),
    }


def _reduce_status(store, info) -> dict:
    """State of reduce for one input from its file's metadata: not started / in progress / complete.

    `matches_store` is False when the file was folded from other data than this store
    holds now (its fingerprint differs), so reduce will start that input again.
    """
    path = store.factor_path(info.name)
    out = {"state": "not started", "next_chunk": 0, "chunks": info.num_chunks, "tokens": 0}
    if not path.is_file():
        return out
    try:
        meta = fmt.factor_meta(path)
    except CoalaError as exc:
        return {**out, "state": "unreadable", "error": str(exc)}
    next_chunk = int(meta.get("next_chunk", 0))
    matches = next_chunk <= info.num_chunks and meta.get("fingerprint") == store.fingerprint(info.name, next_chunk)
    state = "complete" if meta.get("complete") else "in progress"
    return {**out, "state": state, "next_chunk": next_chunk, "tokens": int(meta.get("tokens", 0)),
            "matches_store": matches}


def _count_states(inputs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for i in inputs:
        counts[i["reduce"]["state"]] = counts.get(i["reduce"]["state"], 0) + 1
    return counts
