"""`SequentialConfig`: a capture's settings plus block-by-block capture and propagation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..capture import CaptureConfig
from ..errors import UsageError
from ..solve import DEFAULT_ALPHA, METHODS, SolveConfig


@dataclass
class SequentialConfig(CaptureConfig):
    """`CaptureConfig` and what `coala-stream capture --sequential [--propagate]` adds."""

    sequential: bool = field(default=False, metadata={
        "help": "run the model one decoder block at a time (Llama-style models: Llama, Mistral, "
                "Qwen2, Phi-3, SmolLM): only the embeddings, then one block's weights are loaded at a "
                "time, and the hidden states between blocks go to disk (see --hidden-dir), so "
                "models larger than device memory or RAM can be captured; the store is the same "
                "(GGUF models load whole on the CPU and go to the device one block at a time)",
        "group": "block by block (--sequential)"})
    hidden_dir: str | None = field(default=None, metadata={
        "help": "with --sequential: the work directory for the hidden states between blocks "
                "(two arrays of samples x seq_len x hidden) and the progress record; deleted "
                "when the capture completes; default: OUT.sequential next to the store", "metavar": "DIR", "group": "block by block (--sequential)"})
    propagate: bool = field(default=False, metadata={
        "help": "with --sequential: compress while capturing, group by group (q/k/v, o, gate/up, "
                "down): each group's inputs are captured from the model with everything before "
                "it already compressed, reduced, and the group compressed with --ratio/--rank "
                "(or --ranks), --method, --mu, --objective (as `coala-stream solve` computes it "
                "from this store) before the next group's inputs are captured. The store ends "
                "reduced, with the applied factors; `coala-stream solve` with the same settings "
                "writes exactly that model", "group": "compression while capturing (--sequential --propagate)"})
    ratio: float | None = field(default=None, metadata={
        "help": "with --propagate: fraction of each compressed matrix's parameters to remove, "
                "in (0, 1), as solve's --ratio (0.2 keeps 80 percent)", "metavar": "F", "group": "compression while capturing (--sequential --propagate)"})
    rank: int | None = field(default=None, metadata={
        "help": "with --propagate: fixed rank for every layer instead of --ratio, as solve's --rank", "metavar": "N", "group": "compression while capturing (--sequential --propagate)"})
    rank_multiple: int = field(default=1, metadata={
        "help": "with --propagate: round every rank down to a multiple of N, as solve's "
                "--rank-multiple", "metavar": "N", "group": "compression while capturing (--sequential --propagate)"})
    method: str = field(default="coala", metadata={
        "help": "with --propagate: coala | svd | svdllm | asvd (--objective input) | coala | "
                "aasvd (--objective output), as solve's --method", "choices": METHODS, "group": "compression while capturing (--sequential --propagate)"})
    mu: float = field(default=0.0, metadata={
        "help": "with --propagate: relative regularisation (coala only), as solve's --mu", "metavar": "F", "group": "compression while capturing (--sequential --propagate)"})
    objective: str = field(default="input", metadata={
        "help": "with --propagate: input: fit each layer to its inputs in the compressed model "
                "(Xh) | output: fit it to the ORIGINAL model's outputs, min ||T W^T - Xh W'^T|| "
                "with T = alpha X + (1 - alpha) Xh; the store then holds [Xh | X] per input "
                "(twice the bytes) and the original hidden states run beside the compressed ones",
        "choices": ("input", "output"), "group": "compression while capturing (--sequential --propagate)"})
    alpha: float | None = field(default=None, metadata={
        "help": "with --objective output: weight of the original inputs X in the target T, in "
                "[0, 1]; default 0.5 (measured best on SmolLM2, docs/benchmarks.md)",
        "metavar": "A", "group": "compression while capturing (--sequential --propagate)"})
    ranks: str | None = field(default=None, metadata={
        "help": "with --propagate: per-layer ranks from a solve_report.json (e.g. of `solve "
                "--allocate global` on an ordinary capture of the same model and data) instead "
                "of --ratio/--rank: global rank allocation needs every rank before block 0 is "
                "compressed", "metavar": "REPORT", "group": "compression while capturing (--sequential --propagate)"})
    refine_steps: int = field(default=0, metadata={
        "help": "with --propagate: Adam steps per block on its factors A, B after the block is "
                "compressed, so its output on the compressed hidden states matches the original "
                "block's output (AA-SVD's refinement; 0: none)", "metavar": "N", "group": "compression while capturing (--sequential --propagate)"})
    refine_lr: float = field(default=1e-4, metadata={
        "help": "with --refine-steps: Adam's learning rate", "metavar": "LR", "group": "compression while capturing (--sequential --propagate)"})
    drop_activations: bool = field(default=False, metadata={
        "help": "with --sequential: keep no activations in the store (zarr only): each input's "
                "rows are folded into its R as they are made, in reduce's groups (the same R "
                "as `coala-stream reduce` makes from a written store), and never written; only "
                "their checksums are committed. The store ends reduced, ready for `coala-stream "
                "solve`, and the disk holds the R's, not the calibration's activations (at 256 x "
                "2048 tokens, hundreds of GB for a 7B model). reduce --restart and --with-gram "
                "no longer can run on it (SVD-LLM's Gram matrix is then formed from R)",
        "group": "block by block (--sequential)"})

    def propagate_settings(self) -> dict | None:
        """The compression --propagate applies ({method, ratio, rank, ranks, mu, objective,
        alpha, refine_steps, refine_lr}), None without it; UsageError for a combination that
        makes no sense (checked before anything loads)."""
        if not self.propagate:
            given = [flag for flag, value, default in (
                ("--ratio", self.ratio, None), ("--rank", self.rank, None),
                ("--method", self.method, "coala"), ("--mu", self.mu, 0.0),
                ("--objective", self.objective, "input"), ("--alpha", self.alpha, None),
                ("--ranks", self.ranks, None), ("--refine-steps", self.refine_steps, 0),
                ("--rank-multiple", self.rank_multiple, 1),
                ("--refine-lr", self.refine_lr, 1e-4)) if value != default]
            if given:
                raise UsageError(f"{', '.join(given)}: only used with --sequential --propagate "
                                 f"(compression while capturing); give "
                                 f"{'it' if len(given) == 1 else 'them'} to `coala-stream solve` "
                                 f"instead, or add --sequential --propagate")
            return None
        if not self.sequential:
            raise UsageError("--propagate works block by block: add --sequential "
                             "(capture --sequential --propagate --ratio F)")
        ranks, ranks_ratio = self._ranks()
        if ranks is not None and (self.ratio is not None or self.rank is not None):
            raise UsageError("--ranks sets every layer's rank: drop --ratio/--rank")
        ratio = self.ratio if ranks is None else ranks_ratio
        alpha = self._alpha()
        SolveConfig(out="-", method=self.method, ratio=ratio,  # solve's own checks
                    rank=self.rank if ranks is None else (None if ratio else 1), mu=self.mu,
                    objective=self.objective, alpha=alpha,
                    rank_multiple=self.rank_multiple).validate()
        if self.refine_steps < 0 or self.refine_lr <= 0:
            raise UsageError(f"--refine-steps must be >= 0 and --refine-lr > 0, got "
                             f"{self.refine_steps} and {self.refine_lr}")
        settings = {"method": self.method, "ratio": None if ratio is None else float(ratio),
                    "rank": self.rank, "ranks": ranks, "mu": float(self.mu),
                    "objective": self.objective, "alpha": alpha,
                    "refine_steps": int(self.refine_steps),
                    "refine_lr": float(self.refine_lr) if self.refine_steps else None}
        if self.rank_multiple > 1:  # absent at 1, so stores of earlier versions still resume
            settings["rank_multiple"] = int(self.rank_multiple)
        return settings

    def _alpha(self) -> float | None:
        if self.objective != "output":
            if self.alpha is not None:
                raise UsageError("--alpha weighs the original outputs: add --objective output")
            return None
        alpha = DEFAULT_ALPHA if self.alpha is None else float(self.alpha)
        if alpha == 0.0:
            raise UsageError("--objective output --alpha 0 fits the compressed model's own inputs, "
                             "which --objective input does with half the store: use that")
        return alpha

    def _ranks(self) -> tuple[dict | None, float | None]:
        """({module: rank}, the ratio they were allocated for) from --ranks REPORT (a
        solve_report.json); (None, None) without it."""
        if self.ranks is None:
            return None, None
        try:
            report = json.loads(Path(self.ranks).read_text())
            ranks = {str(r["module"]): int(r["rank"]) for r in report["layers"]
                     if not r.get("kept_dense")}
            ratio = (report.get("settings") or {}).get("ratio")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"--ranks {self.ranks}: expected a solve_report.json written by "
                             f"`coala-stream solve` ({type(exc).__name__}: {exc})") from exc
        return ranks, None if ratio is None else float(ratio)

    def check(self) -> None:
        super().check()
        self.propagate_settings()
        if self.hidden_dir is not None and not self.sequential:
            raise UsageError("--hidden-dir is only used with --sequential")
        if self.drop_activations and not self.sequential:
            raise UsageError("--drop-activations folds each input as a block's pass makes it: add "
                             "--sequential, or drop the flag and run `coala-stream reduce` after")
        if self.drop_activations and self.resolved_backend() != "zarr":
            raise UsageError("--drop-activations frees disk space chunk by chunk, which an HDF5 "
                             "file cannot: use a zarr store (--out DIR) or drop the flag")

    def extra_settings(self) -> dict:
        """What the store records of this capture beyond `CaptureConfig` (compared on resume)."""
        return {"sequential": bool(self.sequential), "propagate": self.propagate_settings()}
