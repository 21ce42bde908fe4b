"""What a store was captured from, and what to do with a store already at --out.

A store records its model, calibration and capture settings in its root
attributes (`store_attrs`); a capture with the same hard settings resumes it
(or finds it complete), one with others is refused unless ``--overwrite``
(`existing_store`). `capture_lock` keeps two captures off one store, and
`capture_state` turns all of this into the label status shows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import calib, checkpoint, models
from ..errors import CoalaError, LockedError, StoreError
from ..store import detect_backend, open_store
from .config import CaptureConfig
from .probe import InputGroup

# Settings whose change makes other activations: a store made with different
# ones is refused (or replaced with overwrite). (label, path into the attrs)
HARD_SETTINGS = (
    ("model", ("model", "path")),
    ("gguf file", ("model", "gguf_file")),
    ("model config sha256", ("model", "config_sha256")),
    ("calibration text sha256", ("calibration", "sha256")),
    ("calibration tokens sha256", ("calibration", "tokens_sha256")),
    # the hashes already cover the field's text and the rendered chat; these make the refusal
    # say which option changed. Stores made before these were recorded read as the defaults.
    ("calibration field (--text-field)", ("calibration", "field")),
    ("--chat-template", ("calibration", "chat_template"), False),
    ("--shard", ("calibration", "shard")),
    ("samples", ("calibration", "samples")),
    ("seq_len", ("calibration", "seq_len")),
    ("seed", ("calibration", "seed")),
    # what --bos resolved to, not the word: auto and never are the same windows for a tokenizer
    # that adds no BOS, and stores made before --bos (no key) had none
    ("--bos (the token that starts each window; None: no BOS)", ("calibration", "bos_token_id")),
    ("dtype", ("dtype",)),
    ("chunk_tokens", ("chunk_tokens",)),
    ("layers", ("capture_settings", "layers")),
    # --propagate makes other activations (from compressed blocks) and another store:
    # None for an ordinary capture, so the two never resume or stand in for each other
    ("propagate", ("capture_settings", "propagate")),
    # a store made by `coala-stream merge` holds no activations: a capture never resumes it
    ("made by coala-stream merge from shards", ("capture_settings", "merged_shards")),
)


def _get(attrs: dict, path: tuple, default=None):
    for k in path:
        attrs = attrs.get(k, default) if isinstance(attrs, dict) else default
    return attrs


def settings_diff(stored: dict, wanted: dict) -> list[str]:
    """'label: store has X, this run asks for Y' for each hard setting that differs."""
    out = []
    for label, path, *default in HARD_SETTINGS:
        a, b = _get(stored, path, *default), _get(wanted, path, *default)
        if a != b:
            out.append(f"{label}: store has {a!r}, this run asks for {b!r}")
    return out


def store_attrs(config: CaptureConfig, cfg, tokenizer, cal: calib.Calibration, dtype: str,
                chunk_tokens: int, batch_size: int, device: torch.device,
                extra_settings: dict | None = None) -> dict:
    """The root attributes a store made by this capture gets; ``extra_settings`` (an
    orchestrator's: sequential, propagate) go into ``capture_settings`` and are compared
    on resume like the rest."""
    return {
        "model": models.model_attrs(config.model, cfg),
        "tokenizer": models.tokenizer_attrs(tokenizer),
        # samples is the whole draw's count; a --shard part's own is its sample_range
        "calibration": {**cal.attrs(), "samples": config.samples, "seq_len": config.seq_len,
                        "seed": config.seed, "bos": config.bos},
        "dtype": dtype,
        "chunk_tokens": chunk_tokens,
        "capture": {"samples_done": 0, "complete": False},
        "capture_settings": {"layers": config.layers, "batch_size": batch_size,
                             "device": str(device), "cpu_threads": torch.get_num_threads(),
                             "probe_crc32": None, "sequential": False, "propagate": None,
                             **(extra_settings or {})},
    }


def capture_threads(config: CaptureConfig, compute: int, say) -> tuple[int | None, int]:
    """(torch threads of the forward, of the work beside it: --propagate's reduce and solve).

    A fresh capture takes the forward's from `devices.threads_beside_writer` and ``compute``
    (the caller's count); a resumed one the counts its store recorded when it was started
    (``capture_settings.cpu_threads``, ``compute_threads``), so its activations and factors
    are those of an uninterrupted run, unless ``--threads`` is given (`devices.resumed_threads`;
    ``say`` gets its note). Call while holding the capture lock."""
    from ..devices import resumed_threads, threads_beside_writer

    forward = threads_beside_writer(config.threads, config.resolved_device(),
                                    config.resolved_writers())
    recorded = _recorded_threads(config.out)
    what = f"the capture of {config.out}"
    if forward is not None or recorded.get("cpu_threads") is not None:
        forward, note = resumed_threads(recorded.get("cpu_threads"), config.threads,
                                        forward or torch.get_num_threads(), what)
        if note:
            say(note)
    compute, note = resumed_threads(recorded.get("compute_threads"), config.threads, compute,
                                    what + " (its reduce and solve)")
    if note and getattr(config, "propagate", False):  # only --propagate computes beside it
        say(note)
    return forward, compute


def _recorded_threads(out) -> dict:
    """The thread counts an unfinished store at ``out`` recorded at its start ({} if none)."""
    path = Path(out)
    try:
        if detect_backend(path) is None:
            return {}
        with open_store(path) as store:
            attrs = store.attrs
    except (CoalaError, OSError, ValueError):  # not readable: existing_store says why, later
        return {}
    if (attrs.get("capture") or {}).get("complete"):
        return {}
    cs = attrs.get("capture_settings") or {}
    return {k: cs[k] for k in ("cpu_threads", "compute_threads")
            if isinstance(cs.get(k), int) and cs[k] >= 1}


def existing_store(config: CaptureConfig, backend: str, attrs: dict) -> str | None:
    """State of the store at config.out: None (none, or to be replaced with overwrite),
    "complete" or "resume". StoreError if its settings differ (and not overwrite) or the
    path is something else."""
    path = Path(config.out)
    if not path.exists():
        return None
    if detect_backend(path) is None:
        if path.is_dir() and not any(path.iterdir()):
            return None  # an empty directory: create_store(overwrite=True) replaces it
        raise StoreError(f"{path} exists and is not an activation store; choose another --out "
                         f"(capture never deletes what it did not write)")
    with open_store(path) as store:
        stored, kind = store.attrs, store.backend
    diff = settings_diff(stored, attrs)
    if kind != backend:
        diff.insert(0, f"backend: store is {kind}, this run asks for {backend}")
    if config.shard_chunks is not None and stored.get("shard_chunks") != config.shard_chunks:
        diff.append(f"shard_chunks: store has {stored.get('shard_chunks')}, this run asks "
                    f"for {config.shard_chunks}")
    if not diff:
        if stored["capture"]["complete"]:
            return "complete"
        started = bool((stored.get("capture_settings") or {}).get("sequential"))
        if started != bool(attrs["capture_settings"].get("sequential")):
            how = "with" if started else "without"
            raise StoreError(f"{path} is an unfinished capture started {how} --sequential; rerun "
                             f"the same command {how} --sequential to resume it (the two modes "
                             f"commit in different orders), or pass --overwrite to start over")
        return "resume"
    if config.overwrite:
        return None
    raise StoreError(f"{path} was captured with other settings: " + "; ".join(diff)
                     + ". Use another --out, rerun with the store's settings, or pass "
                       "--overwrite to replace it")


def prepare_inputs(store, groups: list[InputGroup], samples_done: int) -> None:
    """Create the arrays of a new store; check an existing store's against the probe."""
    have = set(store.inputs)
    missing = [g.name for g in groups if g.name not in have]
    extra = have - {g.name for g in groups}
    if (samples_done and missing) or extra:
        raise StoreError(f"{store.path} holds other inputs than this model gives (missing: "
                         f"{missing[:3]}, unexpected: {sorted(extra)[:3]}); was it captured with "
                         f"another model or transformers version? (--overwrite replaces it)")
    for g in groups:
        store.create_input(g.name, g.n, g.consumers)  # idempotent; StoreError if it differs


def lock_path(out) -> Path:
    """The capture lock of the store at ``out``: a file beside it, so it exists before the
    store does (two captures racing to create one store see each other)."""
    out = Path(out)
    return out.with_name(f".{out.name}.capture-lock")


def capture_lock(out) -> checkpoint.StoreLock:
    return checkpoint.StoreLock(lock_path(out), what="capture")


def check_not_in_use(path: Path) -> None:
    """LockedError if a live reduce holds the lock of the store at ``path`` (before --overwrite
    deletes it, reduce directory included)."""
    if detect_backend(path) is None:
        return
    with open_store(path) as store:
        lock = Path(store.reduce_dir) / checkpoint.REDUCE_LOCK
    holder = checkpoint.live_holder(lock)
    if holder is not None:
        raise LockedError(f"--overwrite would delete {path} while a reduce holds its lock "
                          f"({checkpoint.describe_holder(holder)}); wait for it to finish or stop it first")


def capture_state(path, attrs: dict) -> dict:
    """{"state": "complete" | "running" | "interrupted", "detail": ...} of the capture of the
    store at ``path``: "running" only while a live process holds the capture lock (the
    lock's own test, as a second capture would judge it), "interrupted" for an unfinished
    capture nobody is running (killed: rerun the same command to resume)."""
    capture = attrs.get("capture") or {}
    if capture.get("complete"):
        return {"state": "complete", "detail": ""}
    holder = checkpoint.live_holder(lock_path(path))
    if holder is not None:
        return {"state": "running", "detail": checkpoint.describe_holder(holder)}
    return {"state": "interrupted",
            "detail": "no capture is running; rerun the same capture command to resume"}
