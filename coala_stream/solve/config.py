"""`SolveConfig`: the settings of one solve (the CLI's options are generated from it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..devices import resolve_device
from ..errors import UsageError

METHODS = ("coala", "svd", "svdllm", "asvd", "aasvd")  # `layer.FACTORIZERS` implements each
OBJECTIVES = ("input", "output")
# methods for the output objective (a pair store, [Xh | X]); the others fit the input objective
OUTPUT_METHODS = ("coala", "aasvd")
# alpha of the output objective when neither the user nor the store says: the mix measured
# best on SmolLM2 (docs/benchmarks.md, "Quality")
DEFAULT_ALPHA = 0.5
ALLOCATIONS = ("uniform", "global", "loss")
SELECTIONS = ("zerosum", "smallest")  # `select.RULES`
LOSS_TERMS = ("first", "fisher")
FORMATS = ("factorized", "dense", "peft")  # `export.WRITERS` writes each


@dataclass
class SolveConfig:
    """Settings of one solve; each field's help is also its CLI help."""

    out: str = field(metadata={"help": "output directory (written beside it under a temporary "
                                       "name, renamed when complete)", "metavar": "DIR",
                               "required": True})
    model: str | None = field(default=None, metadata={
        "help": "the source model (HF directory or .gguf file); default: the one recorded in the store",
        "metavar": "MODEL"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "name of the GGUF file inside MODEL, when MODEL is a directory", "metavar": "NAME"})
    method: str = field(default="coala", metadata={
        "help": "coala (W R^T SVD, Gram-free) | svd (weights only) | svdllm (Gram + Cholesky, "
                "as SVD-LLM) | asvd (activation-scaled SVD) | aasvd (the output objective as "
                "AA-SVD computes it: three float32 Gram blocks, Cholesky, inverse; a baseline for "
                "--objective output)", "choices": METHODS})
    objective: str | None = field(default=None, metadata={
        "help": "input: minimise ||Xh (W - W')^T|| on the stored inputs Xh | output: minimise "
                "||T W^T - Xh W'^T||, T = alpha X + (1 - alpha) Xh, with X the original model's "
                "inputs (needs a store captured with --objective output, which holds [Xh | X]); "
                "default: the objective the store was captured for (input for ordinary stores)",
        "choices": OBJECTIVES})
    alpha: float | None = field(default=None, metadata={
        "help": "with --objective output: weight of the original inputs in the target, in [0, 1] "
                "(1: match the original outputs, 0: the input objective on Xh); default: the "
                "store's capture setting", "metavar": "A"})
    ratio: float | None = field(default=None, metadata={
        "help": "fraction of each compressed matrix's parameters to remove, in (0, 1) "
                "(SVD-LLM convention: 0.2 keeps 80 percent; rank = floor((1-F) m n / (m + n)))",
        "metavar": "F", "exclusive": "size"})
    rank: int | None = field(default=None, metadata={
        "help": "fixed rank for every layer instead of --ratio (the adapter rank for --format peft)",
        "metavar": "N", "exclusive": "size"})
    rank_multiple: int = field(default=1, metadata={
        "help": "round every layer's rank down to a multiple of N after the allocation (a rank "
                "below N stays as it is), so the factors' shapes are aligned; never more "
                "parameters than --ratio / --rank / --allocate gave (the rounding's remainder is "
                "left unspent); 1: no rounding. docs/benchmarks.md measures whether aligned ranks "
                "run faster on your hardware", "metavar": "N"})
    allocate: str = field(default="uniform", metadata={
        "help": "uniform: the same ratio (or rank) per layer | global: the same total parameter "
                "budget spent where it lowers the summed normalised error most (kept only if it "
                "beats uniform on that error) | loss: the same budget spent by each singular "
                "component's predicted change of the model's calibration loss (one gradient pass "
                "of the original model over the store's calibration windows; see --selection)",
        "choices": ALLOCATIONS})
    selection: str | None = field(default=None, metadata={
        "help": "with --allocate loss: zerosum (ZS-SVD's rule: drop components model-wide keeping "
                "the running sum of predicted changes near zero) | smallest (smallest predicted "
                "change first); default zerosum", "choices": SELECTIONS})
    loss_terms: str | None = field(default=None, metadata={
        "help": "with --allocate loss: first (first-order change, as ZS-SVD) | fisher (plus a "
                "second-order term from a per-token empirical Fisher, from the same backward "
                "pass); default first",
        "choices": LOSS_TERMS})
    scores: str | None = field(default=None, metadata={
        "help": "with --allocate loss: directory of the loss scores (resumed after a kill, reused "
                "by later solves of the same store); default OUT.scores", "metavar": "DIR"})
    calib_data: str | None = field(default=None, metadata={
        "help": "with --allocate loss: the calibration data the store was captured from, when its "
                "recorded path moved (checked against the store's token hash)", "metavar": "PATH"})
    mu: float | None = field(default=None, metadata={
        "help": "regularisation mu, relative: absolute mu = F * ||R||_F^2 / n; coala only; "
                "default: the mu a propagating capture applied (so that solve writes the "
                "factors it applied), else 0",
        "metavar": "F"})
    adaptive_mu: bool = field(default=False, metadata={
        "help": "scale mu per layer by its squared relative error at its rank (COALA authors' option)"})
    layers: str | None = field(default=None, metadata={
        "help": "regular expression (re.search) choosing the linear layers to compress among those "
                "the store has inputs for; default: all of them", "metavar": "REGEX"})
    format: str = field(default="factorized", metadata={
        "help": "factorized: two small linears per layer, load with coala_stream.load_model | "
                "dense: W' = A B in an ordinary HF checkpoint | peft: residual base W - A B plus "
                "a LoRA adapter holding A, B", "choices": FORMATS})
    asvd_alpha: float = field(default=0.5, metadata={"help": "ASVD's exponent on mean |x|",
                                                     "metavar": "A"})
    device: str = field(default="cpu", metadata={"help": "where to compute: cpu, cuda or cuda:N"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; default: the CPUs this process may use (affinity mask, "
                "cgroup quota, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS) less the cores other "
                "processes keep busy when the command starts, never more; see the README's "
                "'Threads'", "metavar": "N"})
    allow_incomplete: bool = field(default=False, metadata={
        "help": "compress from a store whose capture is not finished (killed, still running, or "
                "a sequential capture whose later blocks do not exist yet); recorded in the report"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got "
                             f"{self.allocate!r}")
        self._validate_loss()
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if (self.ratio is None) == (self.rank is None):
            raise UsageError("give exactly one of --ratio F (fraction of parameters to remove) or "
                             "--rank N")
        if self.ratio is not None:
            if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
                raise UsageError(f"--ratio: expected the fraction of parameters to remove, in "
                                 f"(0, 1), got {self.ratio!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) \
                or self.rank_multiple < 1:
            raise UsageError(f"--rank-multiple must be a positive integer, got {self.rank_multiple!r}")
        if self.mu is not None and not (isinstance(self.mu, (int, float)) and math.isfinite(self.mu)
                                        and self.mu >= 0):
            raise UsageError(f"--mu must be a finite number >= 0, got {self.mu!r}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise UsageError(f"--objective must be input or output, got {self.objective!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and 0.0 <= self.alpha <= 1.0):
            raise UsageError(f"--alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.alpha is not None and self.objective == "input":
            raise UsageError("--alpha weighs the original outputs in --objective output; drop it "
                             "or pass --objective output")
        if self.method == "aasvd" and self.objective == "input":
            raise UsageError("--method aasvd fits the output objective: pass --objective output "
                             "(with a store captured with --objective output) or another --method")
        if self.objective == "output" and self.method not in OUTPUT_METHODS:
            raise UsageError(f"--objective output is solved by --method coala or aasvd, not "
                             f"{self.method}; pass --objective input for {self.method}")
        if self.mu and self.method != "coala":  # >= 0 by now; None: none asked for
            raise UsageError(f"--mu applies to --method coala only (got --method {self.method})")
        if self.adaptive_mu and not self.mu:
            raise UsageError("--adaptive-mu scales --mu per layer; give --mu > 0 as well")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as exc:
                raise UsageError(f"--layers {self.layers!r} is not a valid regular expression: {exc}") from exc
        resolve_device(self.device)

    def _validate_loss(self) -> None:
        loss_only = {"--selection": self.selection, "--loss-terms": self.loss_terms,
                     "--scores": self.scores, "--calib-data": self.calib_data}
        given = [k for k, v in loss_only.items() if v is not None]
        if given and self.allocate != "loss":
            raise UsageError(f"{', '.join(given)} applies to --allocate loss only; add "
                             f"--allocate loss or drop it")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise UsageError(f"--selection must be one of {', '.join(SELECTIONS)}, got "
                             f"{self.selection!r}")
        if self.loss_terms is not None and self.loss_terms not in LOSS_TERMS:
            raise UsageError(f"--loss-terms must be first or fisher, got {self.loss_terms!r}")
        if self.allocate == "loss" and self.format == "peft":
            raise UsageError("--allocate loss spends a compression budget; --format peft keeps "
                             "the whole model (use --allocate uniform with --format peft)")
