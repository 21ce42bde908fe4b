"""A causal LM run as embeddings, then decoder blocks one at a time (`BlockModel`).

Every decoder layer is called exactly as the model's own forward calls it: the
keyword arguments (causal mask, ``position_embeddings`` = the rotary (cos, sin),
``position_ids``, ...) are recorded by running the base model's own ``forward``
with each layer replaced by a stand-in that records what it is given (GPTQ's
"catcher"), once per batch shape. So masks and rotary embeddings come from the
installed transformers' code, whatever its signature, per layer.

Lazy (safetensors): the model is a ``meta`` skeleton and a block's weights are
read by `weights.LazyWeights` when loaded, dropped when freed. GGUF models (and
checkpoints that are not safetensors) load whole on the CPU once, and only one
block at a time is moved to the device.
"""

from __future__ import annotations

import torch

from . import models
from .capture import StopForward, linear_targets
from .errors import CoalaError
from .weights import LazyWeights

SUPPORTED = ("Llama-style decoder models (Llama, Mistral, Qwen2, Phi-3, SmolLM, ...) whose base model "
             "has embed_tokens, a ModuleList `layers` of decoder blocks and rotary_emb")


class _Stop(Exception):
    """Raised by the last catcher: the base model's forward has given all it needs."""


class _Catcher(torch.nn.Module):
    """Stands in for decoder layer ``index``: records its arguments, passes the hidden states on."""

    def __init__(self, index: int, record: dict, stop: bool):
        super().__init__()
        self.index, self.record, self.stop = index, record, stop

    def forward(self, hidden_states, *args, **kwargs):
        self.record[self.index] = (hidden_states, args, kwargs)
        if self.stop:
            raise _Stop
        return hidden_states


def check_supported(model, config) -> tuple[torch.nn.Module, str]:
    """(base model, module name of its layer list); CoalaError naming what is missing."""
    what = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module):
        raise CoalaError(f"--sequential supports {SUPPORTED}; {what} has no base model "
                         f"`model.model` (capture without --sequential)")
    missing = [a for a in ("embed_tokens", "layers", "rotary_emb") if getattr(base, a, None) is None]
    if not missing and not isinstance(base.layers, torch.nn.ModuleList):
        missing = ["layers (as a ModuleList)"]
    if missing:
        raise CoalaError(f"--sequential supports {SUPPORTED}; {what} has no "
                         f"{', '.join('model.' + m for m in missing)} (capture without --sequential)")
    prefix = next(n for n, m in model.named_modules() if m is base.layers)
    return base, prefix


class BlockModel:
    """A causal LM run as embeddings, then decoder blocks one at a time.

    Lazy (safetensors checkpoint): the model is a ``meta`` skeleton and a block's
    weights are read from disk by `load_block` and dropped by `free_block`.
    Otherwise (GGUF): the whole model is on the CPU and blocks move to ``device``
    one at a time.
    """

    def __init__(self, spec: models.ModelSpec, config, dtype: str, device: torch.device,
                 progress: bool = False, say=lambda msg: None):
        self.device, self.dtype = device, getattr(torch, dtype)
        skeleton = models.skeleton(config, dtype)
        base, _ = check_supported(skeleton, config)  # before loading any weight
        self.weights = LazyWeights.find(spec)
        if self.weights is not None:
            volatile = [f"{i}.{n}" for i, b in enumerate(base.layers)
                        for n, _ in b.named_buffers() if n not in b.state_dict()]
            if volatile:  # computed at construction, not stored: cannot be restored per block
                say(f"note: decoder blocks hold computed buffers ({volatile[0]}, ...): "
                    f"loading the model whole on the CPU")
                self.weights = None
        if self.weights is None:
            say("note: this model's weights cannot be read one block at a time (GGUF, or not "
                "safetensors): it is loaded whole on the CPU once, and one block at a time "
                "goes to the device")
            self.model = models.load_model(spec, dtype, "cpu", config=config, progress=progress)
        else:
            self.model = skeleton
        self.base, self.prefix = check_supported(self.model, config)
        self.blocks = list(self.base.layers)
        self._kwargs: dict[int, list] = {}
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._embedding_loaded = False
        if self.weights is not None:
            # non-persistent buffers (inv_freq): computed by the constructor, as from_pretrained does
            rotary = self.base.rotary_emb
            with torch.device("cpu"):
                try:
                    fresh = type(rotary)(config=rotary.config if hasattr(rotary, "config") else config)
                except TypeError:
                    fresh = type(rotary)(config, device="cpu")
            self.base.rotary_emb = fresh.to(device)
        else:
            self.base.rotary_emb.to(device)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_of(self, module_name: str) -> int | None:
        """Index of the block holding module ``module_name``, None if outside every block."""
        head = self.prefix + "."
        if not module_name.startswith(head):
            return None
        return int(module_name[len(head):].split(".", 1)[0])

    def block_targets(self, pattern: str | None) -> dict[int, list[tuple[str, torch.nn.Linear]]]:
        """The linear layers to capture, per block; CoalaError for any outside the blocks."""
        out: dict[int, list] = {}
        outside = []
        for name, mod in linear_targets(self.model, pattern):
            k = self.block_of(name)
            (outside.append(name) if k is None else out.setdefault(k, []).append((name, mod)))
        if outside:
            raise CoalaError(f"--sequential captures linear layers inside the decoder blocks "
                             f"({self.prefix}.N); {outside[0]} is outside them: exclude it with "
                             f"--layers or capture without --sequential")
        return out

    # -- materialising parts --------------------------------------------------
    # A block's tensors come from a pool of buffers that every block reuses (all blocks
    # have the same shapes): allocating and freeing a block's worth of tensors per block
    # made glibc's heap grow by about half a block each time (its mmap threshold adapts
    # to the freed sizes), so peak RSS grew with the number of blocks.
    def _take(self, shape, dtype) -> torch.Tensor:
        free = self._pool.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=self.device)

    def load_block(self, k: int) -> torch.nn.Module:
        block = self.blocks[k]
        if self.weights is None:
            return block.to(self.device)
        prefix = f"{self.prefix}.{k}."
        shapes = block.state_dict(keep_vars=True)
        tensors = self.weights.read([prefix + n for n in shapes])
        for name, meta in shapes.items():
            owner, _, attr = name.rpartition(".")
            mod = block.get_submodule(owner)
            buf = self._take(meta.shape, meta.dtype)
            buf.copy_(tensors.pop(prefix + name))  # casts to the model dtype, as .to(dtype) does
            if attr in mod._parameters:
                mod._parameters[attr] = torch.nn.Parameter(buf, requires_grad=False)
            else:
                mod._buffers[attr] = buf
        return block

    def free_block(self, k: int) -> None:
        block = self.blocks[k]
        if self.weights is None:
            if self.device.type != "cpu":
                block.to("cpu")
            return
        for mod in block.modules():
            for table in (mod._parameters, mod._buffers):
                for attr, t in table.items():
                    if t is None or t.device.type == "meta":
                        continue
                    self._pool.setdefault((tuple(t.shape), t.dtype), []).append(t.detach())
                    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    table[attr] = (torch.nn.Parameter(meta, requires_grad=False)
                                   if isinstance(t, torch.nn.Parameter) else meta)

    def materialised_blocks(self) -> list[int]:
        """Blocks whose parameters are on a real device (lazy mode; for tests)."""
        return [k for k, b in enumerate(self.blocks)
                if any(p.device.type != "meta" for p in b.parameters())]

    def load_embeddings(self) -> None:
        if not self._embedding_loaded:
            emb = self.base.embed_tokens
            if self.weights is not None:
                prefix = next(n for n, m in self.model.named_modules() if m is emb) + "."
                names = list(emb.state_dict())
                tensors = self.weights.read([prefix + n for n in names])
                emb.to_empty(device=self.device)
                emb.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True)
            else:
                emb.to(self.device)
            self._embedding_loaded = True

    def free_embeddings(self) -> None:
        if self._embedding_loaded:
            emb = self.base.embed_tokens
            if self.weights is not None:
                emb.to_empty(device="meta")
            elif self.device.type != "cpu":
                emb.to("cpu")
            self._embedding_loaded = False

    # -- running ----------------------------------------------------------------
    def _run_base(self, stop_at: int, **inputs) -> dict:
        """The base model's forward with every layer replaced by a catcher; returns
        {layer index: (hidden_states, args, kwargs)} for layers 0..stop_at."""
        record: dict = {}
        layers = self.base.layers
        for i in range(len(layers)):
            layers[i] = _Catcher(i, record, stop=(i == stop_at))
        try:
            with torch.no_grad():
                self.base(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            for i, b in enumerate(self.blocks):
                layers[i] = b
        if stop_at not in record:
            raise CoalaError(f"--sequential supports {SUPPORTED}; the forward of "
                             f"{type(self.base).__name__} did not call all its layers once")
        return record

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for ``ids`` (batch x seq_len), as the model computes them."""
        self.load_embeddings()
        return self._run_base(0, input_ids=ids.to(self.device))[0][0]

    def layer_args(self, k: int, batch: int, seq_len: int) -> tuple[tuple, dict]:
        """(args, kwargs) the model passes to layer ``k`` besides the hidden states, for
        ``batch`` x ``seq_len`` inputs (no padding: the same for every batch of that shape)."""
        if batch not in self._kwargs:
            dummy = torch.zeros(batch, seq_len, self.model.config.hidden_size,
                                dtype=self.dtype, device=self.device)
            rec = self._run_base(len(self.blocks) - 1, inputs_embeds=dummy)
            self._kwargs[batch] = [(rec[i][1], rec[i][2]) for i in range(len(self.blocks))]
        return self._kwargs[batch][k]

    def run_block(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        """Block ``k`` on ``x`` (batch x seq_len x hidden, on the device); None if a hook stopped it."""
        args, kwargs = self.layer_args(k, x.shape[0], x.shape[1])
        try:
            out = self.blocks[k](x, *args, **kwargs)
        except StopForward:
            return None
        return out[0] if isinstance(out, tuple) else out
