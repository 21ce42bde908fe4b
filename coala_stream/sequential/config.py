"""`SequentialConfig`: a capture's settings plus block-by-block capture and propagation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..capture import CaptureConfig
from ..errors import UsageError
from ..solve import METHODS, SolveConfig


@dataclass
class SequentialConfig(CaptureConfig):
    """`CaptureConfig` and what `coala-stream capture --sequential [--propagate]` adds."""

    sequential: bool = field(default=False, metadata={
        "help": "run the model one decoder block at a time (Llama-style models: Llama, Mistral, "
                "Qwen2, SmolLM): only the embeddings, then one block's weights are loaded at a "
                "time, and the hidden states between blocks go to disk (see --hidden-dir), so "
                "models larger than device memory or RAM can be captured; the store is the same "
                "(GGUF models load whole on the CPU and go to the device one block at a time)",
        "group": "block by block (--sequential)"})
    hidden_dir: str | None = field(default=None, metadata={
        "help": "with --sequential: the work directory for the hidden states between blocks "
                "(two arrays of samples x seq_len x hidden) and the progress record; deleted "
                "when the capture completes; default: OUT.sequential next to the store", "metavar": "DIR", "group": "block by block (--sequential)"})
    propagate: bool = field(default=False, metadata={
        "help": "with --sequential: capture each block's inputs from the already compressed "
                "blocks before it (as SVD-LLM's parameter update and sequential GPTQ do): after "
                "block k's inputs are captured they are reduced, block k is compressed with "
                "--ratio/--rank, --method, --mu (as `coala-stream solve` computes it from this "
                "store) and the compressed block's outputs become block k+1's inputs. Block-level: "
                "the inputs inside block k (o_proj, down_proj) come from block k uncompressed. "
                "The store ends reduced; solve it with the same --ratio/--rank, --method, --mu", "group": "compression while capturing (--sequential --propagate)"})
    ratio: float | None = field(default=None, metadata={
        "help": "with --propagate: fraction of each compressed matrix's parameters to remove, "
                "in (0, 1), as solve's --ratio (0.2 keeps 80 percent)", "metavar": "F", "group": "compression while capturing (--sequential --propagate)"})
    rank: int | None = field(default=None, metadata={
        "help": "with --propagate: fixed rank for every layer instead of --ratio, as solve's --rank", "metavar": "N", "group": "compression while capturing (--sequential --propagate)"})
    method: str = field(default="coala", metadata={
        "help": "with --propagate: coala | svd | svdllm | asvd, as solve's --method", "choices": METHODS, "group": "compression while capturing (--sequential --propagate)"})
    mu: float = field(default=0.0, metadata={
        "help": "with --propagate: relative regularisation (coala only), as solve's --mu", "metavar": "F", "group": "compression while capturing (--sequential --propagate)"})

    def propagate_settings(self) -> dict | None:
        """The compression --propagate applies ({method, ratio, rank, mu}), None without it;
        UsageError for a combination that makes no sense (checked before anything loads)."""
        if not self.propagate:
            given = [flag for flag, value, default in (
                ("--ratio", self.ratio, None), ("--rank", self.rank, None),
                ("--method", self.method, "coala"), ("--mu", self.mu, 0.0)) if value != default]
            if given:
                raise UsageError(f"{', '.join(given)}: only used with --sequential --propagate "
                                 f"(compression while capturing); give "
                                 f"{'it' if len(given) == 1 else 'them'} to `coala-stream solve` "
                                 f"instead, or add --sequential --propagate")
            return None
        if not self.sequential:
            raise UsageError("--propagate works block by block: add --sequential "
                             "(capture --sequential --propagate --ratio F)")
        SolveConfig(out="-", method=self.method, ratio=self.ratio, rank=self.rank,
                    mu=self.mu).validate()  # solve's own checks and messages
        return {"method": self.method, "ratio": None if self.ratio is None else float(self.ratio),
                "rank": self.rank, "mu": float(self.mu)}

    def check(self) -> None:
        super().check()
        self.propagate_settings()
        if self.hidden_dir is not None and not self.sequential:
            raise UsageError("--hidden-dir is only used with --sequential")

    def extra_settings(self) -> dict:
        """What the store records of this capture beyond `CaptureConfig` (compared on resume)."""
        return {"sequential": bool(self.sequential), "propagate": self.propagate_settings()}
