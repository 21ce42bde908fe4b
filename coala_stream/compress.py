"""`coala-stream compress`: capture, reduce, solve (and refinement) in one resumable command.

For people who just want a compressed model. Its defaults are the recipe that measured
best (docs/benchmarks.md, "The output objective, ..." and "The field's protocol on
SmolLM2 ...", "A held-out choice ..."): ranks from the calibration loss (``--allocate
loss``) below ratio 0.4, uniform ranks from it on, propagation group
by group with the output objective (alpha = 0.5), 25 refinement steps per block. Steps,
each resumable on its own, in a work directory (default ``OUT.work``, deleted at the end
unless ``--keep-work``):

1. with ``--allocate loss`` (the default below ratio 0.4) or ``global``: an ordinary (block by block)
   capture into ``WORK/plain.zarr``, its reduce, and the allocation of the ranks
   (`solve.allocate_ranks`, written to ``WORK/ranks.json``): propagation needs every
   rank before block 0 is compressed;
2. the propagating capture into ``WORK/prop.zarr`` (`sequential.run_sequential`), which
   reduces, solves, compresses (and refines) each group as it goes;
3. `solve.run_solve` of that store with the same settings: it writes exactly the factors
   the capture applied, in ``--format``.

A source without safetensors (a GGUF file, the embedded default) is de-quantised once into
``WORK/source`` and every step reads its weights from there, block by block
(`weights.staged_sources`).

A killed run rerun with the same command continues where it stopped: finished stores
are not captured again, a started one resumes, and the output appears only when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .devices import resumed_threads, torch_threads
from .errors import StoreError, UsageError
from .export import REPORT_FILE, check_out_dir
from .files import write_json
from .reduce import ReduceConfig, run_reduce
from .sequential import SequentialConfig, run_sequential
from .solve import DEFAULT_ALPHA, SolveConfig, allocate_ranks, run_solve
from .weights import staged_sources

# Left out, --allocate is loss below this ratio and uniform from it on: on held-out text (the
# calibration text outside the draw, tools/bench_heldout.py; docs/benchmarks.md, "A held-out
# choice of compress's allocation") loss-aware ranks won at 0.2 (Qwen2.5-Coder-0.5B -16 %),
# tied at 0.4 (SmolLM2 +0.7 %: uniform costs 1.6x less CPU) and lost at 0.6 (SmolLM2 +26 %)
# once propagation and refinement run: the first-order scores mislead where most is removed.
LOSS_BELOW_RATIO = 0.4
MARK = "compress.json"  # marks a work directory as compress's own (it may delete it)


def _like(cls, name: str, **changes):
    """A field with the default, help and choices of ``cls``'s field ``name`` (each option's
    text exists once), ``changes`` applied (``default``, or metadata keys)."""
    f = next(x for x in fields(cls) if x.name == name)
    default = changes.pop("default", f.default)
    meta = {k: v for k, v in f.metadata.items() if k not in ("group", "exclusive", "required")}
    return field(default=default, metadata={**meta, **changes})


@dataclass
class CompressConfig:
    """Settings of one `coala-stream compress`; the CLI's options are generated from it."""

    out: str = field(metadata={"help": "output directory of the compressed model", "metavar": "DIR",
                               "required": True})
    ratio: float = field(default=0.2, metadata={
        "help": "fraction of the decoder linears' parameters to remove, in (0, 1) (SVD-LLM "
                "convention: 0.2 keeps 80 percent)", "metavar": "F"})
    model: str | None = _like(SequentialConfig, "model")
    gguf_file: str | None = _like(SequentialConfig, "gguf_file")
    data: str = _like(SequentialConfig, "data")
    text_field: str = _like(SequentialConfig, "text_field")
    chat_template: bool = _like(SequentialConfig, "chat_template")
    samples: int = _like(SequentialConfig, "samples")
    seq_len: int = _like(SequentialConfig, "seq_len")
    seed: int = _like(SequentialConfig, "seed")
    bos: str = _like(SequentialConfig, "bos")
    dtype: str = _like(SequentialConfig, "dtype")
    device: str = _like(SequentialConfig, "device")
    objective: str = _like(SequentialConfig, "objective", default="output")
    alpha: float | None = _like(SequentialConfig, "alpha")
    mu: float = _like(SequentialConfig, "mu")
    method: str = _like(SequentialConfig, "method")
    allocate: str | None = _like(SolveConfig, "allocate", default=None, help=(
        next(f for f in fields(SolveConfig) if f.name == "allocate").metadata["help"]
        + f". compress's default: loss below --ratio {LOSS_BELOW_RATIO}, uniform from it on "
        "(chosen on held-out text; see the description) and with --format peft (an adapter on "
        "every layer)"))
    rank_multiple: int = _like(SolveConfig, "rank_multiple")
    refine_steps: int = _like(SequentialConfig, "refine_steps", default=25)
    refine_lr: float = _like(SequentialConfig, "refine_lr")
    format: str = _like(SolveConfig, "format")
    threads: int | None = _like(SolveConfig, "threads")
    work: str | None = field(default=None, metadata={
        "help": "work directory for the stores (their R factors; with --keep-activations "
                "the calibration's activations, twice them with --objective output) and, for a "
                "GGUF source, its weights de-quantised once; default: OUT.work beside the "
                "output", "metavar": "DIR"})
    keep_activations: bool = field(default=False, metadata={
        "help": "keep every input's activations in the propagating capture's store; by default "
                "each group's rows are folded into its R in memory and never written (capture "
                "--drop-activations), so the disk holds the R's, not the whole calibration's "
                "activations (twice them with --objective output)"})
    keep_work: bool = field(default=False, metadata={
        "help": "keep the work directory (the stores, their R factors and applied factors) "
                "after the output is written"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing output, and start the work directory over"})

    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(self.out).with_name(Path(self.out).name + ".work")

    def __post_init__(self) -> None:
        if self.allocate is None:  # resolved here, so the work directory records what ran
            self.allocate = default_allocation(self.format, self.ratio)

    def capture(self, out: Path, propagate: bool, ranks: Path | None = None) -> SequentialConfig:
        """The capture of step 1 (``propagate=False``) or 2."""
        shared = dict(out=str(out), model=self.model, gguf_file=self.gguf_file, data=self.data,
                      text_field=self.text_field, chat_template=self.chat_template,
                      samples=self.samples, seq_len=self.seq_len, seed=self.seed,
                      bos=self.bos, dtype=self.dtype, device=self.device, threads=self.threads,
                      overwrite=self.overwrite, sequential=True)
        if not propagate:
            return SequentialConfig(**shared)
        return SequentialConfig(**shared, propagate=True, method=self.method, mu=self.mu,
                                ratio=None if ranks else self.ratio,
                                ranks=str(ranks) if ranks else None, objective=self.objective,
                                alpha=self.alpha, refine_steps=self.refine_steps,
                                rank_multiple=self.rank_multiple,
                                refine_lr=self.refine_lr,
                                drop_activations=not self.keep_activations)

    def solve(self, out: str, **changes) -> SolveConfig:
        # alpha left None: solve takes the one the propagating capture resolved and recorded
        settings = dict(out=out, ratio=self.ratio, method=self.method, mu=self.mu,
                        objective=self.objective, alpha=self.alpha,
                        allocate=self.allocate, rank_multiple=self.rank_multiple,
                        format=self.format, device=self._solve_device(),
                        threads=self.threads, overwrite=self.overwrite)
        return SolveConfig(**{**settings, **changes})

    def _solve_device(self) -> str:
        from .devices import resolve_device

        return str(resolve_device(self.device))

    def check(self) -> None:
        """Every usage error before anything is loaded or written."""
        if not self.published():
            check_out_dir(self.out, self.overwrite)
        self.capture(self.work_dir() / "prop.zarr", True).check()
        self.solve("-").validate()
        work = self.work_dir()
        if work.exists() and not (work / MARK).is_file() and any(work.iterdir()):
            raise UsageError(f"--work {work} exists and is not a compress work directory; choose "
                             f"another --work (compress deletes its work directory when done)")

    def published(self) -> bool:
        """Whether ``out`` is this work directory's finished output: a run killed after solve
        published it (a rename: whole or absent) but before compress returned. A rerun then
        has nothing left to do, instead of refusing an output that "already exists"."""
        mark, out = self.work_dir() / MARK, Path(self.out)
        try:
            recorded = json.loads(mark.read_text())
            ours = (recorded.get("out") == str(self.out)
                    and recorded.get("settings") == self.recipe_settings())
        except (OSError, ValueError, AttributeError):
            return False
        return not self.overwrite and ours and (out / REPORT_FILE).is_file()

    def recipe_settings(self) -> dict:
        """What decides the output (not where the work goes, threads or clean-up): a rerun
        with other settings must not take a finished output of these for its own."""
        skip = {"out", "work", "threads", "overwrite", "keep_work"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def run_compress(config: CompressConfig, progress: bool = True) -> dict:
    """Compress the model (module docstring); returns a summary with the solve report."""
    config.check()
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    work = config.work_dir()
    if config.published():  # killed after the output appeared: only the clean-up was left
        say(f"compress: {config.out} was written before the last run was stopped; nothing to do")
        if not config.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        report = json.loads((Path(config.out) / REPORT_FILE).read_text())
        return {"out": str(config.out), "work": str(work) if config.keep_work else None,
                "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                "status": "already complete", "steps": {}, "report": report}
    if config.overwrite and (work / MARK).is_file():  # start the work over, as --help says
        shutil.rmtree(work)  # (check() refused a --work that is not compress's own)
    work.mkdir(parents=True, exist_ok=True)
    # a resumed run computes with the count the work directory was started with (D0)
    threads, note = resumed_threads(_recorded_threads(work), config.threads,
                                    torch.get_num_threads(), f"compress's work in {work}")
    if note:
        say(note)
    write_json(work / MARK, {"out": str(config.out), "threads": threads,
                             "settings": config.recipe_settings()})
    # a GGUF (or .bin) source is de-quantised once, into the work directory, for every step
    with torch_threads(threads), staged_sources(work / "source", say):
        return _steps(config, work, say, t0, progress)


def _recorded_threads(work: Path) -> int | None:
    """The thread count recorded in the work directory's mark (None: none, or unreadable)."""
    try:
        threads = json.loads((work / MARK).read_text()).get("threads")
    except (OSError, ValueError, AttributeError):
        return None
    return threads if isinstance(threads, int) and threads >= 1 else None


def _steps(config: CompressConfig, work: Path, say, t0: float, progress: bool) -> dict:
    steps: dict[str, dict] = {}
    ranks = None
    if config.allocate in ("global", "loss"):  # ranks from a plain store, before propagation
        say(f"compress: step 1 of 3, an ordinary capture for the {config.allocate} rank allocation")
        plain = work / "plain.zarr"
        steps["plain_capture"] = _brief(run_sequential(config.capture(plain, False), progress))
        steps["plain_reduce"] = _brief(run_reduce(plain, ReduceConfig(
            device=config._solve_device(), threads=config.threads), progress=progress))
        report = allocate_ranks(plain, config.solve("-", objective="input", alpha=None),
                                work / "stage", progress)
        report["settings"] = {"ratio": config.ratio}
        ranks = work / "ranks.json"
        write_json(ranks, report)
        steps["allocation"] = report["allocation"]
    say(f"compress: step {2 if ranks else 1} of {3 if ranks else 2}, the propagating capture "
        f"(compresses group by group as it goes)")
    prop = work / "prop.zarr"
    steps["capture"] = _brief(run_sequential(config.capture(prop, True, ranks), progress))
    say(f"compress: step {3 if ranks else 2} of {3 if ranks else 2}, writing {config.out}")
    report = run_solve(prop, config.solve(config.out), progress)
    if not report["allocation"].get("applied_factors"):
        raise StoreError(f"{prop}: solve did not find the factors the capture applied; rerun with "
                         f"--overwrite to start over")
    if not config.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return {"out": report["out"], "work": None if not config.keep_work else str(work),
            "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "steps": steps, "report": report}


def _brief(summary: dict) -> dict:
    keep = ("status", "seconds", "stored_bytes", "raw_bytes", "propagate", "bytes_folded")
    return {k: v for k, v in summary.items() if k in keep}


def default_allocation(fmt: str, ratio: float) -> str:
    """compress's --allocate when left out: uniform for --format peft (an adapter on every
    layer), else loss below `LOSS_BELOW_RATIO` and uniform from it on."""
    if fmt == "peft" or not isinstance(ratio, (int, float)) or ratio >= LOSS_BELOW_RATIO:
        return "uniform"
    return "loss"


def recipe() -> str:
    """The default recipe as options (for --help)."""
    d = CompressConfig(out="-")
    alpha = f" --alpha {DEFAULT_ALPHA if d.alpha is None else d.alpha}" if d.objective == "output" else ""
    return (f"--objective {d.objective}{alpha} --allocate {d.allocate} (uniform from --ratio "
            f"{LOSS_BELOW_RATIO} on) --mu {d.mu} --refine-steps {d.refine_steps}")
