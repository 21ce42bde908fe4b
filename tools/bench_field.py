"""The field's protocol (issue 24): 2048-token WikiText-2 perplexity and seven-task accuracy.

Runs the tool itself (`coala-stream capture | reduce | solve | compress | eval`) as
subprocesses, one row per configuration, each with its command, wall time and peak RSS
(the child's own VmHWM), cached in ``WORK/results.jsonl`` so an interrupted run resumes
and ``--report`` prints the tables from what is there.

Protocol (LowRankArena's, where this machine allows):
- calibration: WikiText-2 text disjoint from the evaluated windows (``wiki.test.raw``
  from its line 1500 on), ``--samples`` x ``--seq-len`` tokens (32 x 512 as the earlier
  tables; ``--calibrations 64x2048`` adds the closest to LowRankArena's 256 x 2048 that
  this text allows) for the one-shot rows; 32 x 512 for ``compress``;
- perplexity on the first ``--windows`` (30) non-overlapping windows of 2048 tokens of
  ``wiki.test.raw`` (and of 512 tokens: the earlier protocol, ``--short-windows``);
- with ``--tasks``: `coala-stream eval --tasks` (lm-eval) on the seven multiple-choice
  tasks, the first ``--limit`` documents of each validation split.

Rows: original, SVD-LLM uniform, COALA uniform and ZS-SVD's one-shot selection on COALA's
components (``zssvd``: `solve --allocate loss`; plain store), `compress --allocate uniform`
(``--rows compress``) and `compress --allocate loss` (``--rows compress-loss``), at each of
``--ratios``; compress's default is the second below ratio 0.4 and the first from 0.4 on
(`compress.default_allocation`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import Runner, measured, stage_model, wiki_calibration  # noqa: E402

WIKI = Path(__file__).resolve().parent.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"
TASKS = "arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande"
ONE_SHOT = {"svdllm": ("SVD-LLM, uniform", ["--method", "svdllm"]),
            "coala": ("COALA, uniform", []),
            # ZS-SVD's one-shot recipe (its first-order scores, zero-sum selection, break-even
            # layers dense) on COALA's components; its correction step is not run
            "zssvd": ("ZS-SVD's selection (`solve --allocate loss`)", ["--allocate", "loss"])}
# "compress" was compress's defaults until --allocate loss became the default: its rows (and
# the records cached under its keys) are uniform ranks, now asked for by name
COMPRESS = {"compress": ("`compress --allocate uniform`", ["--allocate", "uniform"]),
            "compress-loss": ("`compress --allocate loss`", ["--allocate", "loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/field"))
    ap.add_argument("--model", type=Path, default=None,
                    help="HF model directory (default: SmolLM2-135M staged from the embedded GGUF)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    ap.add_argument("--rows", nargs="+", default=["svdllm", "coala", "compress"],
                    choices=[*ONE_SHOT, *COMPRESS])
    ap.add_argument("--calibrations", nargs="+", default=["32x512"],
                    help="SAMPLESxSEQ_LEN of the one-shot rows' plain stores")
    ap.add_argument("--fold", nargs="*", default=[], metavar="CAL",
                    help="calibrations captured with --sequential --drop-activations (the R's "
                         "only, folded in memory: 64x2048 would not fit on disk as activations; "
                         "SVD-LLM then forms its Gram matrix from R)")
    ap.add_argument("--calib-from", type=int, default=1500)
    ap.add_argument("--windows", type=int, default=30)
    ap.add_argument("--short-windows", action="store_true",
                    help="also the earlier protocol: the first --windows windows of 512 tokens")
    ap.add_argument("--skip-long", action="store_true",
                    help="leave out the 30 x 2048 perplexity not yet measured (22 CPU minutes a "
                         "row for a 0.5B model); a later run without it adds it")
    ap.add_argument("--skip-original", action="store_true",
                    help="leave out the original model's evals not yet measured (measured once "
                         "per model; a later run without it adds them)")
    ap.add_argument("--tasks", action="store_true", help="also the seven tasks (lm-eval)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--task-batch", type=int, default=16,
                    help="eval --tasks --batch-size (lm-eval's batches: the same scores, fewer "
                         "small GEMMs; 1.5x less CPU than 1 on SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.threads, args.report)
    model = args.model if args.model is not None else stage_model(work, runner)
    calib = wiki_calibration(work, WIKI, args.calib_from)
    threads = ["--threads", str(args.threads)]
    rows = [evaluate(runner, args, "original", model, {"label": "original", "ratio": "-",
                                                        "calibration": "-"},
                     cached_only=args.skip_original)]
    for ratio in args.ratios:
        for name in args.rows:
            if name in COMPRESS:
                label, extra = COMPRESS[name]
                out = work / "models" / f"{name}-{ratio}"
                runner.run(f"build-{name}-{ratio}", measured(
                    "compress", str(model), "--data", str(calib), "--samples", "32", "--seq-len",
                    "512", "--ratio", str(ratio), *extra, "--out", str(out), *fresh(out),
                    "--json", "--quiet", *threads), json_out=steps)
                rows.append(evaluate(runner, args, f"{name}-{ratio}", out, {
                    "label": label, "ratio": ratio, "calibration": "32x512",
                    "build": f"build-{name}-{ratio}"}))
                continue
            for cal in args.calibrations:
                samples, seq_len = cal.split("x")
                store = work / f"plain-{cal}.zarr"
                # --fold: no activations on disk, the store ends reduced (SVD-LLM's Gram from R)
                fold = ["--sequential", "--drop-activations"] if cal in args.fold else []
                runner.run(f"capture-{cal}", measured(
                    "capture", str(model), "--out", str(store), "--data", str(calib),
                    "--samples", samples, "--seq-len", seq_len, *fold, *threads))
                if not fold:
                    runner.run(f"reduce-{cal}", measured("reduce", str(store), "--with-gram",
                                                         *threads))
                key = f"{name}-{cal}-{ratio}"
                out = work / "models" / key
                runner.run(f"build-{key}", measured(
                    "solve", str(store), "--out", str(out), "--ratio", str(ratio),
                    *ONE_SHOT[name][1], *scores(work, name, cal), "--overwrite", "--json", "--quiet",
                    *threads),
                    json_out=True)
                rows.append(evaluate(runner, args, key, out, {
                    "label": ONE_SHOT[name][0], "ratio": ratio, "calibration": cal,
                    "build": f"build-{key}"}))
    print(table(rows, runner, args))


def steps(summary: dict) -> dict:
    """What a compress build row keeps of the command's JSON: its steps' seconds and status
    (the solve report, with every layer's ranks and scores, stays in the output's
    solve_report.json)."""
    return {k: summary.get(k) for k in ("seconds", "threads", "status", "steps")}


def fresh(out: Path) -> list[str]:
    """--overwrite unless a stopped compress left its work directory: a build that was
    interrupted (hours for a 0.5B model) resumes where it stopped; its record then holds the
    cost of the resumed part only."""
    return [] if (out.with_name(out.name + ".work") / "compress.json").is_file() else ["--overwrite"]


def scores(work: Path, name: str, cal: str) -> list[str]:
    """--scores for the loss-aware rows: one gradient pass per calibration store, kept and
    reused by every ratio."""
    return ["--scores", str(work / f"scores-{cal}")] if name == "zssvd" else []


def evaluate(runner: Runner, args, key: str, target: Path, row: dict,
             cached_only: bool = False) -> dict:
    """The row's metrics (each eval cached under its own key); with ``cached_only`` only
    those measured already, and the 2048-token one only so with ``--skip-long``."""
    threads = ["--threads", str(args.threads)]
    row["evals"], row["ppl2048"] = [], None

    def run(name: str, argv: list[str], skip: bool = False) -> dict | None:
        if (cached_only or skip) and name not in runner.cache:
            return None
        row["evals"].append(name)
        return runner.run(name, measured(*argv), json_out=True)

    got = run(f"ppl2048-{key}", ["eval", str(target), "--data", str(WIKI), "--seq-len", "2048",
                                 "--max-windows", str(args.windows), "--json", "--quiet",
                                 *threads], skip=args.skip_long)
    row["ppl2048"] = got and got["result"]["ppl"]
    if args.short_windows:
        got = run(f"ppl512-{key}", ["eval", str(target), "--data", str(WIKI), "--max-windows",
                                    str(args.windows), "--json", "--quiet", *threads])
        row["ppl512"] = got and got["result"]["ppl"]
    if args.tasks:
        got = run(f"tasks-{key}", ["eval", str(target), "--tasks", TASKS, "--limit",
                                   str(args.limit), "--batch-size", str(args.task_batch),
                                   "--json", "--quiet", *threads])
        row["tasks"] = got and got["result"]
    return row


def table(rows: list[dict], runner: Runner, args) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    names = TASKS.split(",")
    head = ["configuration", "ratio", "calibration", "ppl 30 x 2048"]
    head += ["ppl 30 x 512"] if args.short_windows else []
    head += [*names, "avg"] if args.tasks else []
    head += ["build wall s", "build CPU s", "build peak MiB"]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) "
             f"per command, load average at the end {os.getloadavg()[0]:.1f}",
             "", "| " + " | ".join(head) + " |", "|---" * 3 + "|---:" * (len(head) - 3) + "|"]
    for r in rows:
        build = runner.cache.get(r.get("build") or "") or {}
        cells = [r["label"], fmt(r["ratio"]), r["calibration"], fmt(r.get("ppl2048"))]
        cells += [fmt(r.get("ppl512"))] if args.short_windows else []
        if args.tasks:
            res = r.get("tasks") or {}
            per = res.get("tasks") or {}
            avg = res.get("average")
            cells += [fmt(_score(per.get(t))) for t in names] + [
                "-" if avg is None else f"{avg:.3f}"]
        cells += [fmt(build.get(k)) for k in ("seconds", "cpu_seconds", "peak_rss_mib")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""]
    for key, row in runner.cache.items():
        lines.append(f"- {key}: `{row['command']}` ({row['seconds']} s wall, "
                     f"{row.get('cpu_seconds', '-')} CPU s, peak {row.get('peak_rss_mib')} MiB)")
    return "\n".join(lines)


def _score(metrics: dict | None) -> float | None:
    """acc_norm where the task defines it, else acc (LowRankArena's average)."""
    if not metrics:
        return None
    value = metrics.get("acc_norm", metrics.get("acc"))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
