"""The gradient pass of `solve --allocate loss`: every component's projected loss gradient.

One forward and backward pass of the ORIGINAL model per calibration window (the windows
the store was captured from, drawn again from its recorded source, seed and sizes and
checked against its ``tokens_sha256``), loss = the window's mean next-token cross
entropy. After each window the gradient of every compressed linear is projected on
each of its components (`scores.drop_projections`) and dropped; the projections, not
the gradients, are kept: (windows x k) numbers per layer. Hooks on the same linears
see each one's inputs and output gradient in that backward pass, from which
`scores.position_fisher` gives a per-token Fisher term per component (windows x k).

Resume: after every window the projections so far are written atomically to
``SCORES_DIR/scores.safetensors`` (`checkpoint.save_state`), with the store, model,
layers and windows they belong to; a killed run (kill -9 included) goes on at the
next window, and a finished file is reused by every later solve of the same store
(the scores do not depend on --ratio or --selection). A file made for anything else
is refused, never overwritten.

Memory: the model in float32 on --device (whole), one float32 gradient per compressed
linear, and per linear U (m x k) and U^T W (k x n) in float32: about three times the
linears' float32 size beside the model, said before the pass starts (`memory_note`) (SmolLM2-135M: a solve that ran this pass peaked at
3.2-3.6 GB, one that reused its scores at 1.4 GB, uniform at 1.6 GB; docs/benchmarks.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import calib, checkpoint, models
from ..devices import release_free_memory
from ..errors import CheckpointMismatch, CoalaError
from ..progress import bar as progress_bar
from ..reduce import read_result
from ..scores import components, drop_projections, position_fisher
from ..signals import StopRequests
from .layer import Layer, input_view

SCORES_FILE = "scores.safetensors"
FORMAT = "coala-stream/loss-scores"
VERSION = 2  # 2: the per-token Fisher terms Q beside the projections P


def calibration_ids(store, spec, model_config, data: str | None = None) -> torch.Tensor:
    """The store's calibration windows (samples x seq_len), drawn again from ``data`` (default:
    the source the store recorded) and checked against the recorded ``tokens_sha256``."""
    cal = store.attrs.get("calibration") or {}
    if not cal.get("tokens_sha256"):
        raise CoalaError(f"{store.path} records no hash of its calibration tokens (made by an "
                         f"older coala-stream), so its windows cannot be drawn again and checked; "
                         f"recapture it to use --allocate loss")
    data = data or recorded_data(cal)
    src = calib.read_data(data, cal.get("field") or "text", bool(cal.get("chat_template")))
    draw = calib.calibration_windows(models.load_tokenizer(spec), src, int(cal["samples"]),
                                     int(cal["seq_len"]), int(cal["seed"]),
                                     models.max_positions(model_config),
                                     bos=cal.get("bos_token_id"))
    if draw.tokens_sha256 != cal["tokens_sha256"]:
        raise CheckpointMismatch(
            f"the calibration windows drawn again from {data} differ from those {store.path} was "
            f"captured from (tokens sha256 {draw.tokens_sha256[:12]} vs {cal['tokens_sha256'][:12]}); "
            f"pass --calib-data with the exact file the store was captured from")
    if cal.get("shard"):
        draw = calib.shard_calibration(draw, *cal["shard"])
    return draw.ids


def recorded_data(cal: dict) -> str:
    """The ``--data`` value behind a store's recorded calibration source description."""
    source = str(cal.get("source") or "")
    for name in sorted(calib.BUILTIN_NAMES, key=len, reverse=True):
        if source.startswith(name + ": "):
            return name
    if cal.get("format") in (None, "text"):
        return source
    # records: "PATH (layout: N records, field F)"; the path may itself hold " ("
    cuts = [i for i in range(len(source)) if source.startswith(" (", i)]
    for i in reversed(cuts):
        if Path(source[:i]).exists():
            return source[:i]
    return source


def run_key(store, model_config, layers: list[Layer], windows: int) -> dict:
    """What the projections depend on: store (its uuid, calibration draw and each input's
    reduce result), model config, layers and windows; a scores file must match it."""
    fingerprints = {}
    for name in sorted({layer.input for layer in layers}):
        fingerprints[name] = read_result(store, name).meta.get("fingerprint")
    cal = store.attrs.get("calibration") or {}
    return {"store_uuid": store.attrs.get("uuid"), "tokens_sha256": cal.get("tokens_sha256"),
            "shard": cal.get("shard"), "config_sha256": models.config_sha256(model_config),
            "inputs": fingerprints, "layers": [layer.name for layer in layers], "windows": windows}


def load_scores(path: Path, key: dict) -> tuple[dict, int]:
    """({module: (S, P, Q)}, windows done) of a scores file matching ``key``; ({}, 0) if none."""
    if not path.exists():
        return {}, 0
    tensors, meta = checkpoint.load_state(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("key") != key:
        raise CheckpointMismatch(
            f"{path} holds loss scores of another store, model, layer set, calibration or "
            f"scores format (coala-stream version); "
            f"delete it or pass --scores with another directory")
    done = int(meta["windows_done"])
    return {name: (tensors[f"S:{name}"], tensors[f"P:{name}"], tensors[f"Q:{name}"])
            for name in key["layers"]}, done


def component_scores(store, spec, model_config, layers: list[Layer], device, scores_dir: Path,
                     data: str | None = None, progress: bool = True, say=print,
                     by_block: bool | None = None) -> dict:
    """{module: (S (k,), P (windows x k), Q (windows x k))}: the spectrum of W R^T, every
    window's projection of dL/dW on each component and its per-token Fisher term
    (`scores.position_fisher`); computed, resumed or read back (module doc). ``by_block``:
    the pass one block at a time (`blockgrad`), the whole-model one, or (None) the first
    where the model allows it, unless an unfinished file of the other is there to resume."""
    from . import blockgrad

    path = Path(scores_dir) / SCORES_FILE
    ids = calibration_ids(store, spec, model_config, data)
    key = run_key(store, model_config, layers, int(ids.shape[0]))
    if by_block is None:
        by_block = (checkpoint.load_meta(path).get("format") == blockgrad.FORMAT if path.exists()
                    else blockgrad.usable(spec, model_config))
    if by_block:
        if path.exists() and checkpoint.load_meta(path).get("format") == FORMAT:
            scores, done = load_scores(path, key)  # finished (either pass): reused
            if done == ids.shape[0]:
                say(f"loss scores: reusing {path} ({done} windows)")
                return scores
        say(memory_note(model_config, layers, device, ids.shape))
        scores = blockgrad.component_scores(store, spec, model_config, layers, device, path,
                                            ids, key, progress, say)
        save_scores(path, scores, key, int(ids.shape[0]))
        return scores
    scores, done = load_scores(path, key)
    if done == ids.shape[0]:
        say(f"loss scores: reusing {path} ({done} windows)")
        return scores
    say(f"loss scores: {ids.shape[0] - done} of {ids.shape[0]} windows to go "
        f"(gradient pass of the original model, float32, {device}); saved to {path}")
    say(memory_note(model_config, layers, device))
    model = models.load_model(spec, "float32", device, config=model_config, progress=False)
    bases = _bases(model, store, layers, device, progress)
    rows = {name: [list(scores[name][1]), list(scores[name][2])] if scores else [[], []]
            for name in bases}
    Path(scores_dir).mkdir(parents=True, exist_ok=True)
    with StopRequests("the loss-score pass") as stop, \
            progress_bar(ids.shape[0] - done, "loss scores", "window", enabled=progress) as bar:
        for w in range(done, ids.shape[0]):
            for name, (p, q) in _window_projections(model, bases, ids[w:w + 1].to(device)).items():
                rows[name][0].append(p)
                rows[name][1].append(q)
            _save(path, bases, rows, key, w + 1)
            release_free_memory()  # the heap would keep every window's freed activations
            bar.update()
            stop.check(f"after window {w + 1} of {ids.shape[0]} (saved)")
    return {name: (bases[name][1].cpu(), torch.stack(rows[name][0]), torch.stack(rows[name][1]))
            for name in bases}


def memory_bytes(model_config, layers: list[Layer]) -> dict[str, int]:
    """What the gradient pass holds at once, in bytes (float32): the whole model, one
    gradient per compressed linear, and per linear its components U (m x k) and U^T W
    (k x n), k = min(m, n); activations of one window come on top."""
    params = sum(p.numel() for p in models.skeleton(model_config, "float32").parameters())
    linears = sum(layer.m * layer.n for layer in layers)
    comps = sum(min(layer.m, layer.n) * (layer.m + layer.n) for layer in layers)
    return {"model": 4 * params, "gradients": 4 * linears, "components": 4 * comps}


def memory_note(model_config, layers: list[Layer], device, windows=None) -> str:
    """One line saying what the gradient pass needs (`memory_bytes`; block by block,
    `blockgrad.memory_bytes`, when ``windows`` (the windows' shape) is given), and, on a
    CPU, how that compares with the memory available now."""
    from . import blockgrad

    if windows is None:
        need = memory_bytes(model_config, layers)
        what = (f"the float32 model ({need['model'] / 2**30:.1f} GiB), its linears' gradients "
                f"({need['gradients'] / 2**30:.1f} GiB) and their components "
                f"({need['components'] / 2**30:.1f} GiB)")
    else:
        need = blockgrad.memory_bytes(model_config, layers, int(windows[0]), int(windows[1]))
        what = ", ".join(f"{k} ({v / 2**30:.2f} GiB)" for k, v in need.items())
    total = sum(need.values())
    line = (f"loss scores: the gradient pass holds {what}: about {total / 2**30:.2f} GiB on "
            f"{device} before activations")
    available = _available_bytes() if torch.device(device).type == "cpu" else None
    if available is not None and total > available:
        line += (f"; only {available / 2**30:.1f} GiB are available now: expect swapping or "
                 f"an out-of-memory kill (compress and solve without --allocate loss hold one "
                 f"block at a time)")
    return line


def _available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _bases(model, store, layers: list[Layer], device, progress: bool) -> dict:
    """{module: (U, S, U^T W)} from the model's weights and the plain capture's R."""
    out, cache = {}, {}
    with progress_bar(len(layers), "loss scores: components", "layer", enabled=progress) as bar:
        for layer in layers:
            if layer.input not in cache:
                cache.clear()  # layers sharing an input are adjacent in store order
                reduced = read_result(store, layer.input)
                info = store.input(layer.input)
                if info.pair:  # [Xh | X]: the compressed model's own inputs, as the plain capture
                    reduced = input_view(reduced, info.features)
                cache[layer.input] = reduced.R.to(device)
            weight = model.get_submodule(layer.name).weight
            out[layer.name] = components(weight.detach(), cache[layer.input])
            weight.requires_grad_(True)
            bar.update()
    return out


def _window_projections(model, bases: dict, ids: torch.Tensor) -> dict:
    """One window: loss, backward, each layer's (projections, per-token Fisher terms), float64
    on CPU; the gradients are freed."""
    model.zero_grad(set_to_none=True)
    positions = ids.shape[1] - 1
    fisher: dict[str, torch.Tensor] = {}

    def watch(name, U, UtW):
        def forward(module, inputs, output):
            x = inputs[0].detach()[0]  # (T x n): a batch of one window

            def backward(grad):
                fisher[name] = position_fisher(U, UtW, x, grad[0], positions).to("cpu", torch.float64)
            output.register_hook(backward)
        return forward

    handles = [model.get_submodule(name).register_forward_hook(watch(name, U, UtW))
               for name, (U, _, UtW) in bases.items()]
    try:
        logits = model(ids).logits[0, :-1].float()
        torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (U, _, UtW) in bases.items():
        weight = model.get_submodule(name).weight
        out[name] = (drop_projections(U, UtW, weight.grad).to("cpu", torch.float64), fisher[name])
        weight.grad = None
    return out


def _save(path: Path, bases: dict, rows: dict, key: dict, done: int) -> None:
    save_scores(path, {name: (S, torch.stack(rows[name][0]), torch.stack(rows[name][1]))
                       for name, (_, S, _) in bases.items()}, key, done)


def save_scores(path: Path, scores: dict, key: dict, done: int) -> None:
    """Write {module: (S, P, Q)} with ``done`` windows (all of them: a finished file that
    every later solve of the same store reuses) atomically."""
    tensors = {}
    for name, (S, P, Q) in scores.items():
        tensors[f"S:{name}"], tensors[f"P:{name}"], tensors[f"Q:{name}"] = S, P, Q
    checkpoint.save_state(path, tensors, {"format": FORMAT, "version": VERSION, "key": key,
                                          "windows_done": done, "saved_at": time.time()})
