"""Propagation (``capture --sequential --propagate``): compress each block group by group.

Inside block k the linears that read one tensor form a group (q/k/v; o; gate/up;
down for a Llama block), taken in the order the forward reaches them. For each group:

1. *capture pass* (`capture_group`): every sample through block k up to the group's
   input, on the compressed model's hidden states, with the groups before it already
   compressed: the rows Xh. With ``--objective output`` the same samples also go
   through the original block k on the original model's hidden states (X), and the
   store gets the rows [Xh | X] (a pair input), or [Xh | X W_g^T] when the group's
   consumers together have fewer outputs than inputs (a narrow pair: a down_proj's fold
   is (n + m)^2 instead of (2n)^2 wide; `objective`'s docstring). Chunked, checksummed
   and committed as any capture (resume per chunk); the last, partial chunk waits in
   ``pending/``;
2. *reduce* (`reduce_inputs`): reduce's own driver on that input (it holds the reduce
   lock; resumable), the pending chunk folded on top in memory (`reduced_input`);
3. *solve*: `solve.factor_layers` (the code of ``coala-stream solve``) with the
   capture's settings gives A, B per consumer; the block now runs those consumers
   with ``(A @ B).to(W.dtype)``, and the block's factors so far are written to the
   store's ``applied/`` directory (`coala_stream.applied`, atomic).

After the last group: the original block on the original hidden states (when the
objective or the refinement needs them), ``--refine-steps`` of Adam on the block's
factors (`refine`), then the compressed block on the compressed hidden states: block
k+1's inputs. The progress record names the block, the groups done, and each of
these steps, so a killed run resumes at the step it was in and ends with the same
store, reduce results and factors.
"""

from __future__ import annotations

import dataclasses
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import applied, checkpoint, signals
from ..capture import ChunkBuffer, ChunkWriter, InputGroup, Plan, StopForward, linear_input
from ..devices import resolve_device, torch_threads
from ..errors import StoreError
from ..reduce import DTYPES, Partial, fold_group, read_result, run_reduce
from ..solve import Layer, SolveConfig, factor_layers
from ..blocks import BlockModel
from .config import SequentialConfig
from .context import SequentialRun
from .infold import GroupFold, reduce_config
from .original import OUTPUT, OriginalRows
from .passes import probe_block, save_pending
from .refine import refine_block
from .workdir import WorkDir


class BlockWeights:
    """Block k's linears: the original weights, and the compressed ones applied so far.

    The block runs compressed wherever a factor is applied; `originals` swaps the
    original weights in for the original model's passes, `restore` before the block is
    freed (so the block's buffers go back to the pool they came from).
    """

    def __init__(self, bm: BlockModel, k: int):
        head = f"{bm.prefix}.{k}."
        self.mods = {head + n: m for n, m in bm.blocks[k].named_modules()
                     if isinstance(m, torch.nn.Linear)}
        self.original = {name: m.weight for name, m in self.mods.items()}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        W = self.original[name]
        self.mods[name].weight = torch.nn.Parameter(
            (A.to(W.device) @ B.to(W.device)).to(W.dtype), requires_grad=False)  # solve --format dense
        self.factors[name] = (A, B)

    @contextmanager
    def originals(self):
        saved = {name: m.weight for name, m in self.mods.items()}
        for name, m in self.mods.items():
            m.weight = self.original[name]
        try:
            yield
        finally:
            for name, m in self.mods.items():
                m.weight = saved[name]

    def restore(self) -> None:
        for name, m in self.mods.items():
            m.weight = self.original[name]


def add_cpu(timing: dict, key: str, since: float) -> None:
    """Add this process's CPU seconds since ``since`` (`time.process_time`) to ``timing[key]``:
    beside the wall seconds, what a step costs on a shared machine (issue 25's profile)."""
    timing[key] = timing.get(key, 0.0) + time.process_time() - since


def needs_original(settings: dict) -> bool:
    """Whether the original model's hidden states must run beside the compressed ones."""
    return settings.get("objective") == "output" or bool(settings.get("refine_steps"))


@dataclass
class BlockRun(SequentialRun):
    """Block k's propagation: the run's shared context (`SequentialRun`: its progress record
    and timing are the run's own objects) plus what this block's steps share: ``bw`` its
    weights, ``settings`` the capture's propagate settings, ``kept`` the original rows of
    the pair objective (`original`), set once the groups are known."""

    k: int
    bw: BlockWeights
    settings: dict
    is_last: bool
    kept: OriginalRows | None = None

    @classmethod
    def of(cls, ctx: SequentialRun, k: int, is_last: bool) -> BlockRun:
        return cls(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(SequentialRun)},
                   k=k, bw=BlockWeights(ctx.bm, k),
                   settings=ctx.plan.attrs["capture_settings"]["propagate"], is_last=is_last)

    @property
    def pair(self) -> bool:
        """The output objective: the store gets the original model's side of each row."""
        return self.settings.get("objective") == "output"

    @property
    def original_output(self) -> bool:
        """Whether the original block's output is needed: block k+1's original stream, or
        the refinement's target (the last block without refinement needs neither)."""
        return needs_original(self.settings) and not (
            self.is_last and not self.settings.get("refine_steps"))



def propagate_block(ctx: SequentialRun, k: int, targets: list, is_last: bool) -> int:
    """Block ``k`` (loaded) with --propagate, resuming at the step the progress record names
    (module docstring); returns raw bytes written. Leaves the record ready for block k+1."""
    run = BlockRun.of(ctx, k, is_last)
    store, rec = run.store, run.rec
    raw = 0
    try:
        groups = _block_groups(run, targets)
        done = rec.get("groups_done", 0)
        if done:
            got = applied.read_block(store, k)
            if got is None or got[1].get("groups_done", 0) < done:
                raise StoreError(f"{store.path}: the factors of block {k}'s first {done} groups are "
                                 f"missing from {applied.block_path(store, k).parent}; rerun with "
                                 f"--overwrite to start over")
            for name, (A, B) in got[0].items():
                run.bw.apply(name, A, B)
        run.kept = _original_rows(run, groups[done:])
        for gi in range(done, len(groups)):
            raw += _compress_group(run, gi, groups[gi])
        _finish_block(run)
    finally:
        run.bw.restore()
    return raw


def _original_rows(run: BlockRun, todo: list[InputGroup]) -> OriginalRows | None:
    """Where the pair objective's original rows of this block are kept (`original`)."""
    if not run.pair:
        return None
    return OriginalRows([g.name for g in todo], [g.n for g in todo],
                        run.bm.model.config.hidden_size if run.original_output else 0,
                        run.work.samples * run.work.seq_len, torch.finfo(run.bm.dtype).bits // 8)


def _block_groups(run: BlockRun, targets: list) -> list[InputGroup]:
    """Block k's groups in forward order (probed with the original weights); the store's
    inputs for them are created (pairs for the output objective)."""
    with run.bw.originals():
        groups, fire_order = probe_block(run, run.k, run.rec["src"], targets)
    by_name = {g.name: g for g in groups}
    ordered = [by_name[name] for name in fire_order]
    for g in ordered:
        outputs = pair_outputs(g, run.bw, run.store, run.settings) if run.pair else None
        if outputs is not None:
            run.store.create_input(g.name, g.n + sum(outputs), g.consumers, outputs=outputs)
        else:
            run.store.create_input(g.name, 2 * g.n if run.pair else g.n, g.consumers,
                                   pair=run.pair)
    return ordered


def pair_outputs(g: InputGroup, bw: BlockWeights, store, settings: dict) -> list[int] | None:
    """The consumers' output widths when group ``g``'s pair is folded narrow ([Xh | X W_g^T]),
    else None: only for --method coala (aasvd is run as its authors run it, on the Gram
    matrix of [Xh | X], although it can solve a narrow pair), only when the outputs
    together are fewer than the inputs, and never for an input a store begun before narrow
    pairs already holds wide (so such a store resumes as it began)."""
    if settings.get("method", "coala") != "coala":
        return None
    outputs = [bw.mods[c].out_features for c in g.consumers]
    if sum(outputs) >= g.n:
        return None
    if g.name in store.inputs and store.input(g.name).outputs is None:
        return None
    return outputs


def _compress_group(run: BlockRun, gi: int, g: InputGroup) -> int:
    raw, rec, timing = 0, run.rec, run.timing
    if rec.get("group_captured") != gi:
        raw = capture_group(run, g)
        rec["group_captured"] = gi
        run.save()
    t, c = time.perf_counter(), time.process_time()
    reduce_inputs(run.config, run.plan, [g.name])
    timing["reduce_seconds"] += time.perf_counter() - t
    add_cpu(timing, "reduce_cpu_seconds", c)
    t, c = time.perf_counter(), time.process_time()
    with torch_threads(run.plan.compute_threads):
        factors = solve_group(run, g)
    for name, (A, B) in factors.items():
        run.bw.apply(name, A, B)
    timing["solve_seconds"] += time.perf_counter() - t
    add_cpu(timing, "solve_cpu_seconds", c)
    timing["compressed_layers"] += len(factors)
    applied.write_block(run.store, run.k, run.bw.factors,
                        {"groups_done": gi + 1, "refine_steps": 0, "settings": run.settings})
    if run.config.drop_activations:
        run.store.drop_activations(g.name)
    rec.update(groups_done=gi + 1)
    rec.pop("group_captured", None)
    run.save()
    signals.check("capture", f"after block {run.k}'s group {g.name} (progress saved in "
                             f"{run.work.path})")
    return raw


def _finish_block(run: BlockRun) -> None:
    """After the groups: the original block's pass, the refinement, the compressed pass."""
    bm, k, work, rec, bw, settings = run.bm, run.k, run.work, run.rec, run.bw, run.settings
    batch = run.plan.batch_size
    src, dst = rec["src"], ("b" if rec["src"] == "a" else "a")
    osrc = rec.get("osrc") or src  # before block 0 the two models' hidden states are one
    odst = "o" + dst
    original = run.original_output
    if original and not rec.get("original_done"):
        starts = range(0, work.samples, batch)
        if run.kept is not None and run.kept.has_outputs(starts):
            write_kept(bm, k, work, odst, batch, run.kept)
        else:
            with bw.originals():
                run_pass(bm, k, work, osrc, odst, batch)
        rec["original_done"] = True
        run.save()
    steps = settings.get("refine_steps") or 0
    if steps and bw.factors and not rec.get("refined"):
        t, c = time.perf_counter(), time.process_time()
        refined = refine_block(bm, k, bw, work, src, odst, steps, settings["refine_lr"], batch)
        for name, (A, B) in refined.items():
            bw.apply(name, A, B)
        applied.write_block(run.store, k, bw.factors, {"groups_done": rec.get("groups_done", 0),
                                                       "refine_steps": steps, "settings": settings})
        run.timing["refine_seconds"] = (run.timing.get("refine_seconds", 0.0)
                                        + time.perf_counter() - t)
        add_cpu(run.timing, "refine_cpu_seconds", c)
        rec["refined"] = True
        run.save()
    if run.kept is not None:
        run.kept.clear()
    if not run.is_last:
        run_pass(bm, k, work, src, dst, batch)
    for key in ("groups_done", "group_captured", "original_done", "refined"):
        rec.pop(key, None)
    rec.update(next_block=k + 1, src=src if run.is_last else dst,
               osrc=(odst if original and not run.is_last else rec.get("osrc")))


def run_pass(bm: BlockModel, k: int, work: WorkDir, src: str, dst: str, batch: int) -> None:
    """Every sample through block ``k`` as it is now, outputs to ``dst``; resumes after the
    rows an earlier run wrote there for this block."""
    block, rows = work.state(dst)
    start = rows if block == k else 0
    if block != k:
        work.claim(dst, k, bm.model.config.hidden_size)
    with torch.no_grad():
        for s in range(start - start % batch, work.samples, batch):
            out = bm.run_block(k, work.read(src, s, s + batch).to(bm.device))
            work.write(dst, s, out, block=k)
            if signals.requested():
                break
    signals.check("capture", f"in block {k}'s pass to {dst} (the rows written are kept)")


def write_kept(bm: BlockModel, k: int, work: WorkDir, dst: str, batch: int,
               kept: OriginalRows) -> None:
    """`run_pass` of the original block with the outputs ``kept`` from the first group's
    pass (the same tensors it would compute); resumes as run_pass does."""
    block, rows = work.state(dst)
    start = rows if block == k else 0
    if block != k:
        work.claim(dst, k, bm.model.config.hidden_size)
    for s in range(start - start % batch, work.samples, batch):
        work.write(dst, s, kept.take(OUTPUT, s), block=k)
        if signals.requested():
            break
    signals.check("capture", f"in block {k}'s pass to {dst} (the rows written are kept)")


def input_at(bm: BlockModel, k: int, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The input ``module`` of block ``k`` receives when the block runs on ``x``; the forward
    stops there."""
    got: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        got.append(linear_input(args, kwargs))
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        bm.run_block(k, x)
    finally:
        handle.remove()
    return got[0]


def capture_group(run: BlockRun, g: InputGroup) -> int:
    """All samples' rows of group ``g``'s input into the store (step 1 of the module
    docstring); resumes after its committed chunks. Returns raw bytes written. The original
    block's rows of this block come from or go to ``run.kept`` (`original`)."""
    bm, k, work, plan, store = run.bm, run.k, run.work, run.plan, run.store
    samples, seq_len, B = work.samples, work.seq_len, plan.batch_size
    info = store.input(g.name)
    dtype = getattr(torch, plan.dtype)
    per_chunk = plan.chunk_tokens // seq_len
    cap_start = info.tokens // seq_len  # whole chunks: a batch boundary
    src = run.rec["src"]
    # rows that would be dropped once reduced are folded in memory, never written (`infold`)
    fold = GroupFold.open(store, g.name, reduce_config(plan)) if run.config.drop_activations \
        else None
    if fold is not None:
        info = store.input(g.name)  # as the fold found it (a commit written ahead is rolled forward)
        cap_start = info.tokens // seq_len
    buffer = ChunkBuffer(plan.chunk_tokens, info.n, dtype, info.num_chunks)
    writer = None if fold is not None else ChunkWriter(
        store, {g.name: list(info.chunk_crc32)}, {g.name: info.n}, dtype.itemsize, 1)
    module = run.bw.mods[g.name]
    done_chunks = cap_start // per_chunk
    # a narrow pair's target: the original outputs X W_g^T (no bias: the objective is W's)
    Wg = None if info.outputs is None else torch.cat([run.bw.original[c].detach()
                                                      for c in g.consumers]).T
    try:
        with torch.no_grad():
            for s in range(cap_start, samples, B):
                rows = input_at(bm, k, work.read(src, s, s + B).to(bm.device), module)
                if run.pair:
                    x = _original_input(run, g, s)
                    rows = torch.cat([rows, x if Wg is None else x @ Wg.to(x.dtype)], dim=-1)
                for index, chunk in buffer.add(rows.reshape(-1, info.n)):
                    if fold is not None:
                        fold.add(index, chunk)
                    else:
                        writer.put(("chunk", g.name, index, chunk))
                if signals.requested():
                    break  # no commit after a signal: what follows is redone on resume
                done = min(s + B, samples)
                while writer is not None and (done_chunks + 1) * per_chunk <= done:
                    done_chunks += 1
                    writer.put(("commit", 0, done_chunks * plan.chunk_tokens, False))
            else:
                if fold is not None:
                    fold.flush()  # the last group: it ends at the last whole chunk, as reduce's
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.close()  # finish queued commits; a writer error (disk full) replaces this one
        raise
    finally:
        if fold is not None:
            run.timing["reduce_seconds"] += fold.seconds
            run.timing["reduce_cpu_seconds"] = (run.timing.get("reduce_cpu_seconds", 0.0)
                                                + fold.cpu_seconds)
    signals.check("capture", f"in block {k}, group {g.name} (every committed chunk is kept)")
    save_pending(work, {g.name: buffer}, k)
    return 0 if writer is None else writer.raw_bytes


def _original_input(run: BlockRun, g: InputGroup, s: int) -> torch.Tensor:
    """Group ``g``'s input in the original block for batch ``s``: kept from an earlier
    group's pass, else computed (and, when ``run.kept`` is enabled, the later groups' inputs
    and the block's output kept beside it)."""
    kept, bm, bw = run.kept, run.bm, run.bw
    x = None if kept is None else kept.take(g.name, s)
    if x is not None:
        return x
    osrc = run.rec.get("osrc") or run.rec["src"]
    xo = run.work.read(osrc, s, s + run.plan.batch_size).to(bm.device)
    with bw.originals():
        if kept is None or not kept.enabled:
            return input_at(bm, run.k, xo, bw.mods[g.name])
        return kept.fill(lambda t: bm.run_block(run.k, t), bw.mods, g.name, s, xo,
                         run.original_output)


def solve_group(run: BlockRun, g: InputGroup) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A, B for the consumers of ``g`` as ``coala-stream solve`` computes them from this store
    with the capture's settings, on the capture's device. Layers whose rank saves no
    parameters (or that ``ranks`` leaves out) stay dense, as solve keeps them."""
    bm, bw, settings, plan, store = run.bm, run.bw, run.settings, run.plan, run.store
    cfg = SolveConfig(out="-", method=settings["method"], ratio=settings["ratio"],
                      rank=settings["rank"], mu=settings["mu"],
                      objective=settings.get("objective", "input"), alpha=settings.get("alpha"),
                      rank_multiple=settings.get("rank_multiple", 1))
    layers = [Layer(c, g.name, bw.mods[c].out_features, bw.mods[c].in_features)
              for c in g.consumers]

    def weight(consumer: str) -> torch.Tensor:
        if bm.weights is not None:  # as stored, as solve reads it
            return bm.weights.read([consumer + ".weight"])[consumer + ".weight"]
        return bw.original[consumer].detach()  # loaded whole (GGUF): as the model holds it

    device = resolve_device(str(plan.device))
    info = store.input(g.name)
    factors = factor_layers(layers, weight, lambda n: reduced_input(store, run.work, n, device),
                            cfg, plan.device, settings.get("ranks"), with_error=False,
                            narrow=lambda layer: info.narrow(layer.name))
    return {c: (res["A"], res["B"]) for c, res in factors.items()}


def reduce_inputs(config: SequentialConfig, plan: Plan, names: list[str] | None) -> dict:
    """``run_reduce`` with its defaults on the capture's device: ``names`` (exactly) or every
    input; a finished result is skipped, a checkpoint resumed, a longer input extended."""
    pattern = None if names is None else "^(?:" + "|".join(map(re.escape, names)) + ")$"
    return run_reduce(config.out, reduce_config(plan, pattern), progress=False)


def reduced_input(store, work: WorkDir, name: str, device: torch.device):
    """The store's reduce result of ``name`` with its pending partial chunk (if any) folded on
    top in memory, as the final reduce will fold it; a ``ReducedInput``."""
    red = read_result(store, name)
    info = store.input(name)
    if red is None or not red.complete or red.meta.get("next_chunk") != info.num_chunks:
        raise StoreError(f"{store.path}: input {name} has no complete reduce result after "
                         f"reducing it; rerun the same command")
    if info.tokens == work.samples * work.seq_len:
        return red
    p = work.pending_path(name)
    if not p.is_file():
        raise StoreError(f"{store.path}: input {name} holds {info.tokens} of "
                         f"{work.samples * work.seq_len} rows and its last chunk is missing from "
                         f"{p.parent}; delete {work.path} and rerun to recompute it")
    t, meta = checkpoint.load_state(p)
    if meta.get("index") != info.num_chunks:
        raise StoreError(f"{p}: pending chunk {meta.get('index')} does not follow the "
                         f"{info.num_chunks} committed chunks of {name}")
    part = Partial(red.R, red.abs_sum, red.gram, red.tokens).to(device)
    fold_group(part, [(info.num_chunks, t["rows"])], name=name, n=info.n,
               dtype=DTYPES[red.meta["settings"]["dtype"]], device=device)
    return dataclasses.replace(red, R=part.R, abs_sum=part.abs_sum, gram=part.gram,
                               tokens=part.tokens, meta={**red.meta, "pending_folded": True})
