"""The gradient pass of `solve --allocate loss`, one block at a time (`BlockModel`).

What `gradients.component_scores` computes with the whole float32 model and every
linear's gradient in memory, computed here holding one decoder block: the windows'
hidden states go up through the blocks once (kept: windows x seq_len x hidden floats
per block), the loss of each window gives the gradient at the top, and the blocks are
then visited from the last to the first: block k is loaded, its linears' components
(U, U^T W) are made from the store's R, and each window's block input runs through it
again with autograd on the input only (the weights stay frozen, so no weight gradient
exists); the hooks on its linears see each one's inputs x and output gradients dy, from
which the window's gradient of W, G = dy^T x, is projected on the components
(`scores.drop_projections`) and the per-token Fisher term formed
(`scores.position_fisher`); the gradient at the block's input goes on to block k - 1.
The projections are the whole-model pass's (same windows, same loss, G = dL/dW
computed the same way) to float32 rounding.

Memory: one block and its components, the hidden states of every block for every window
(`memory_bytes`), one window's activations through one block. The model's own weights
are read block by block (safetensors), so a model that does not fit in memory can be
scored (the whole-model pass needs it and its gradients whole).

Resume: after each block, its layers' projections and the gradient at its input are
saved atomically to the scores file; a killed run (kill -9 included) recomputes the
upward pass and goes on at the next block. `gradients` then writes the finished file in
its own format, reused by every later solve.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import checkpoint, models
from ..blocks import BlockModel
from ..devices import release_free_memory
from ..errors import CheckpointMismatch
from ..progress import bar as progress_bar
from ..reduce import read_result
from ..scores import components, drop_projections, position_fisher
from ..signals import StopRequests
from ..weights import LazyWeights
from .layer import Layer, input_view

FORMAT = "coala-stream/loss-scores-by-block"  # an unfinished pass; finished: gradients.FORMAT
# model types whose logits are lm_head(norm(last hidden state)), nothing after it (no logit
# scale or soft-capping): what `_top_gradients` computes; others take the whole-model pass
PLAIN_LOGITS = ("llama", "mistral", "qwen2", "phi3")


def usable(spec, model_config) -> bool:
    """Whether the model can be scored block by block: its weights readable one block at a
    time (safetensors) and a Llama-style layout with a final norm and an output head."""
    if LazyWeights.find(spec) is None:
        return False
    try:
        skeleton = models.skeleton(model_config, "float32")
    except Exception:  # noqa: BLE001 - any failure to build it: the whole-model pass decides
        return False
    base = getattr(skeleton, "model", None)
    plain_logits = (getattr(model_config, "model_type", None) in PLAIN_LOGITS and not any(
        getattr(model_config, a, None) for a in ("logit_scale", "final_logit_softcapping")))
    return plain_logits and isinstance(getattr(skeleton, "lm_head", None), torch.nn.Linear) \
        and all(getattr(base, a, None) is not None for a in ("embed_tokens", "layers", "norm"))


def memory_bytes(model_config, layers: list[Layer], windows: int, seq_len: int) -> dict[str, int]:
    """What the block-by-block pass holds at once, in bytes (float32): the hidden states of
    every block for every window, the largest block's weights and its layers' components."""
    hidden = int(model_config.hidden_size)
    blocks = int(model_config.num_hidden_layers)
    per_block: dict[int, list[Layer]] = {}
    for layer in layers:
        per_block.setdefault(_block_index(layer.name), []).append(layer)
    comps = max((sum(min(l.m, l.n) * (l.m + l.n) for l in ls) for ls in per_block.values()),
                default=0)
    weights = max((sum(l.m * l.n for l in ls) for ls in per_block.values()), default=0)
    return {"hidden states": 4 * (blocks + 1) * windows * seq_len * hidden,
            "one block": 4 * weights, "its components": 4 * comps}


def component_scores(store, spec, model_config, layers: list[Layer], device, path: Path,
                     ids: torch.Tensor, key: dict, progress: bool = True, say=print) -> dict:
    """{module: (S, P, Q)} as `gradients.component_scores`, block by block (module doc).
    ``ids`` are the store's windows, ``key`` the run key a scores file must match, ``path``
    the scores file (unfinished here; the caller writes the finished one)."""
    bm = BlockModel(spec, model_config, "float32", torch.device(device))
    by_block: dict[int, list[Layer]] = {}
    for layer in layers:
        by_block.setdefault(bm.block_of(layer.name), []).append(layer)
    order = sorted(by_block, reverse=True)  # the top block first
    done, rows, grad = _resume(path, key, order, by_block)
    windows = ids.shape[0]
    say(f"loss scores: block by block, {len(order) - done} of {len(order)} blocks with scored "
        f"layers to go ({windows} windows, float32, {device}); saved to {path}")
    ids = ids.to(bm.device)
    # the gradient is at the output of block `cur` (the top, or below the last saved block)
    cur = order[done - 1] - 1 if done else bm.num_blocks - 1
    hidden = _upward(bm, ids, cur if done else bm.num_blocks, progress)
    if grad is None:
        grad = _top_gradients(bm, spec, model_config, hidden.pop(), ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    with StopRequests("the loss-score pass") as stop, \
            progress_bar(len(order) - done, "loss scores", "block", enabled=progress) as bar:
        for j in range(done, len(order)):
            for k in range(cur, order[j] - 1, -1):  # blocks above order[j]: the gradient only
                bm.load_block(k)
                try:
                    bases = _bases(bm, store, by_block[k]) if k == order[j] else {}
                    grad = _block_backward(bm, k, hidden[k], grad, bases, rows)
                finally:
                    bm.free_block(k)
                hidden[k] = None
                for name, (_, S, _) in bases.items():
                    rows[name]["S"] = S.cpu()
            cur = order[j] - 1
            _save_partial(path, rows, grad, key, j + 1)
            release_free_memory()  # else the heap grows by a block's activations per block
            bar.update()
            stop.check(f"after {j + 1} of {len(order)} blocks (saved)")
    return {name: (r["S"], torch.stack(r["P"], 0), torch.stack(r["Q"], 0))
            for name, r in rows.items()}


def _block_index(name: str) -> int:
    """The decoder block of a module name (its first integer part)."""
    return next(int(p) for p in name.split(".") if p.isdigit())


def _resume(path: Path, key: dict, order: list[int], by_block: dict) -> tuple[int, dict, object]:
    """(blocks done, {module: {"S", "P" [window rows], "Q"}}, gradient at the next block's
    output or None) from an unfinished block-by-block file matching ``key``."""
    rows = {layer.name: {"S": None, "P": [], "Q": []} for k in order for layer in by_block[k]}
    if not path.exists():
        return 0, rows, None
    tensors, meta = checkpoint.load_state(path)
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise CheckpointMismatch(
            f"{path} holds loss scores of another store, model, layer set, calibration or "
            f"scores format (coala-stream version); delete it or pass --scores with another "
            f"directory")
    done = int(meta["blocks_done"])
    for k in order[:done]:
        for layer in by_block[k]:
            rows[layer.name] = {"S": tensors[f"S:{layer.name}"],
                                "P": list(tensors[f"P:{layer.name}"]),
                                "Q": list(tensors[f"Q:{layer.name}"])}
    return done, rows, tensors["grad"]


def _upward(bm: BlockModel, ids: torch.Tensor, upto: int, progress: bool) -> list:
    """[block k's input for every window (windows x seq x hidden)] for k = 0..``upto``
    (``upto`` = num_blocks: the last entry is the last block's output)."""
    with torch.no_grad():
        h = torch.cat([bm.embed(ids[w:w + 1]) for w in range(ids.shape[0])])
        bm.free_embeddings()
        hidden = [h]
        with progress_bar(upto, "loss scores: hidden states", "block", enabled=progress) as bar:
            for k in range(upto):
                bm.load_block(k)
                try:
                    h = torch.cat([bm.run_block(k, h[w:w + 1]) for w in range(h.shape[0])])
                finally:
                    bm.free_block(k)
                hidden.append(h)
                release_free_memory()
                bar.update()
    return hidden


def _top_gradients(bm: BlockModel, spec, model_config, h: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """d(window's mean next-token loss) / d(last block's output), for every window."""
    norm, head = _output_layers(bm, spec, model_config)
    grads = []
    for w in range(h.shape[0]):
        x = h[w:w + 1].detach().requires_grad_(True)
        logits = torch.nn.functional.linear(norm(x), head)[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[w, 1:])
        grads.append(torch.autograd.grad(loss, x)[0])
    return torch.cat(grads)


def _output_layers(bm: BlockModel, spec, model_config):
    """(final norm module, output head weight) read from the checkpoint: lm_head.weight, or
    the embedding matrix when the model ties them."""
    norm = bm.base.norm
    prefix = next(n for n, m in bm.model.named_modules() if m is norm) + "."
    names = list(norm.state_dict())
    tensors = bm.weights.read([prefix + n for n in names])
    norm.to_empty(device=bm.device)
    norm.load_state_dict({n: tensors[prefix + n].float() for n in names}, strict=True)
    head_name = next(n for n, m in bm.model.named_modules() if m is bm.model.lm_head) + ".weight"
    if head_name not in bm.weights:
        head_name = next(n for n, m in bm.model.named_modules()
                         if m is bm.base.embed_tokens) + ".weight"
    head = bm.weights.read([head_name])[head_name].to(bm.device, torch.float32)
    return norm, head


def _bases(bm: BlockModel, store, layers: list[Layer]) -> dict:
    """{module: (U, S, U^T W)} of block's layers, from its loaded weights and the store's R."""
    out, cache = {}, {}
    for layer in layers:
        if layer.input not in cache:
            reduced = read_result(store, layer.input)
            info = store.input(layer.input)
            if info.pair:
                reduced = input_view(reduced, info.features)
            cache[layer.input] = reduced.R.to(bm.device)
        weight = bm.model.get_submodule(layer.name).weight
        out[layer.name] = components(weight.detach().float(), cache[layer.input])
    return out


def _block_backward(bm: BlockModel, k: int, inputs: torch.Tensor, grad: torch.Tensor,
                    bases: dict, rows: dict) -> torch.Tensor:
    """Every window through block ``k`` again with autograd on its input; the hooks add each
    window's projections and Fisher terms of ``bases``' layers to ``rows``; returns the
    gradient at the block's input."""
    positions = inputs.shape[1] - 1
    seen: dict[str, tuple] = {}

    def watch(name, U, UtW):
        def forward(module, args, output):
            x = args[0].detach()[0]

            def backward(dy):
                dy = dy[0].detach()
                G = dy.T.to(U.dtype) @ x.to(U.dtype)  # this window's dL/dW
                seen[name] = (drop_projections(U, UtW, G).to("cpu", torch.float64),
                              position_fisher(U, UtW, x, dy, positions).to("cpu", torch.float64))
            output.register_hook(backward)
        return forward

    handles = [bm.model.get_submodule(name).register_forward_hook(watch(name, U, UtW))
               for name, (U, _, UtW) in bases.items()]
    out = []
    try:
        for w in range(inputs.shape[0]):
            x = inputs[w:w + 1].detach().requires_grad_(True)
            with torch.enable_grad():
                y = bm.run_block(k, x)
                torch.autograd.backward(y, grad[w:w + 1])
            out.append(x.grad)
            for name in bases:
                rows[name]["P"].append(seen[name][0])
                rows[name]["Q"].append(seen[name][1])
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def _save_partial(path: Path, rows: dict, grad: torch.Tensor, key: dict, done: int) -> None:
    tensors = {"grad": grad}
    for name, r in rows.items():
        if r["S"] is not None:
            tensors[f"S:{name}"] = r["S"]
            tensors[f"P:{name}"] = torch.stack(r["P"], 0)
            tensors[f"Q:{name}"] = torch.stack(r["Q"], 0)
    checkpoint.save_state(path, tensors, {"format": FORMAT, "key": key, "blocks_done": done,
                                          "saved_at": time.time()})
