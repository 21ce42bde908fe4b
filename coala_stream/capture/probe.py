"""Which linear layers capture hooks, and which of them read the same tensor.

A *probe* forward on one sample records every hooked ``nn.Linear``'s input;
modules whose inputs are the same tensor (q/k/v, gate/up) form one
`InputGroup`, stored once under its first consumer's name. Grouping is by
tensor identity, not by names, so it holds for any architecture.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

from ..errors import CoalaError, UsageError


@dataclass
class InputGroup:
    """One distinct linear-layer input, stored as the array ``name`` (its first consumer)."""

    name: str
    n: int
    consumers: list[str]


def linear_targets(model: torch.nn.Module, pattern: str | None) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``nn.Linear`` except the output embeddings (lm_head), in module order,
    kept if ``re.search(pattern, name)``."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not out_emb]
    if not found:
        raise CoalaError("the model has no nn.Linear layers to capture")
    if pattern is None:
        return found
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--layers {pattern!r} is not a valid regular expression: {exc}") from exc
    chosen = [(n, m) for n, m in found if rx.search(n)]
    if not chosen:
        raise UsageError(f"--layers {pattern!r} matches none of the model's {len(found)} linear "
                         f"layers (names look like {found[0][0]})")
    return chosen


def linear_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def tensor_key(t: torch.Tensor) -> tuple:
    """Equal keys <=> the same memory viewed the same way, hence equal contents
    (valid while the tensors are referenced, so their memory is not reused)."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()))


class StopForward(Exception):
    """Raised by the last hook: everything needed has been captured."""


def forward(model, ids: torch.Tensor) -> None:
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    try:
        model(input_ids=ids, **kwargs)
    except StopForward:
        pass


def probe_groups(model, targets, sample: torch.Tensor, dtype: torch.dtype):
    """Forward ``sample`` (1 x seq_len) holding every hooked input; group the
    modules that read the same tensor.

    Returns (groups in module order, group names in the order their hooks fire
    in the forward pass, crc32 of the probed inputs).
    """
    return probe_run(lambda: forward(model, sample), targets, sample.numel(), dtype)


def probe_run(run, targets, tokens: int, dtype: torch.dtype, crc: int = 0):
    """`probe_groups` for any forward: ``run()`` makes every module of ``targets`` see
    ``tokens`` rows once (the sequential capture runs one decoder block). ``crc``
    continues a crc32 over earlier probes (blocks before this one)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: calls.append((name, linear_input(args, kwargs))),
        with_kwargs=True) for name, m in targets]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, torch.Tensor] = {}
    for name, x in calls:
        if name in seen:
            raise CoalaError(f"module {name} runs more than once per forward pass; capture needs "
                             f"each captured layer to run once (exclude it with --layers)")
        seen[name] = x
    groups: dict[tuple, InputGroup] = {}
    for name, mod in targets:
        if name not in seen:
            raise CoalaError(f"module {name} did not run in the forward pass; capture needs every "
                             f"captured layer to run once (exclude it with --layers)")
        x = seen[name]
        if x.numel() != tokens * mod.in_features:
            raise CoalaError(f"module {name} sees {x.numel() // mod.in_features} rows for "
                             f"{tokens} tokens; capture needs one row per token "
                             f"(mixture-of-experts layers: exclude them with --layers)")
        if x.dtype != dtype:
            raise CoalaError(f"module {name} receives {x.dtype} inputs in a {dtype} model; "
                             f"capture stores one dtype (exclude it with --layers)")
        groups.setdefault(tensor_key(x), InputGroup(name, mod.in_features, [])).consumers.append(name)
    call_index = {name: i for i, (name, _) in enumerate(calls)}
    fire_order = sorted((g.name for g in groups.values()), key=call_index.__getitem__)
    for g in groups.values():
        crc = zlib.crc32(seen[g.name].detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    return list(groups.values()), fire_order, crc
