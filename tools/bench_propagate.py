"""Quality of the output objective, propagation and refinement on SmolLM2-135M (issue 17).

Runs the tool itself (`coala-stream capture | reduce | solve | eval`) as subprocesses,
one row per configuration, each printed with its command, wall time and peak RSS (the
child's own VmHWM), cached in ``WORK/results.jsonl`` so an interrupted run resumes
and ``--report`` prints the table from what is there.

Protocol (the one compression papers use): calibration on WikiText-2 text disjoint from
the evaluated windows (``wiki.test.raw`` from its line 1500 on: ``--calib-from``),
32 x 512 tokens; perplexity on the first 30 non-overlapping 512-token windows of
``wiki.test.raw``. Rows:

- plain store (an ordinary capture, reduced ``--with-gram``): SVD-LLM, COALA (input
  objective), COALA with global allocation;
- one propagating capture per row (``capture --sequential --propagate``): the input
  objective (alpha 0), the output objective with alpha 0.5 / 1, with and without mu,
  with the global allocation of the plain store (``--ranks``), with refinement,
  ``--method aasvd``, and bf16 activations.

Each propagating capture takes about 20 minutes on one core of the 2-core CI machine
(other processes running); ``--rows`` picks which to run, in the order given.
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

# row name -> (label, propagating capture options or None for the plain store, solve options)
ROWS = {
    "svdllm": ("SVD-LLM, uniform", None, ["--method", "svdllm"]),
    "coala": ("COALA input objective, uniform", None, []),
    "coala-global": ("COALA input objective, global", None, ["--allocate", "global"]),
    "prop-in": ("propagated, input objective (alpha 0)", ["--objective", "input"], []),
    "prop-in-mu": ("propagated, input objective (alpha 0), mu 0.01", ["--objective", "input", "--mu", "0.01"], []),
    "prop-a05": ("propagated, output objective, alpha 0.5", ["--objective", "output", "--alpha", "0.5"], []),
    "prop-a1": ("propagated, output objective, alpha 1", ["--objective", "output", "--alpha", "1"], []),
    "prop-a1-mu": ("propagated, alpha 1, mu 0.01", ["--objective", "output", "--alpha", "1", "--mu", "0.01"], []),
    "prop-a05-mu": ("propagated, alpha 0.5, mu 0.01", ["--objective", "output", "--alpha", "0.5", "--mu", "0.01"], []),
    "prop-a05-global": ("propagated, alpha 0.5, global (ranks of the plain store)", ["--objective", "output", "--alpha", "0.5", "GLOBAL"], ["--allocate", "global"]),
    "prop-a05-refine": ("propagated, alpha 0.5, refined 25 steps", ["--objective", "output", "--alpha", "0.5", "--refine-steps", "25"], []),
    "prop-a04-refine": ("propagated, alpha 0.4, refined 25 steps", ["--objective", "output", "--alpha", "0.4", "--refine-steps", "25"], []),
    "prop-a06-refine": ("propagated, alpha 0.6, refined 25 steps", ["--objective", "output", "--alpha", "0.6", "--refine-steps", "25"], []),
    "prop-a05-refine100": ("propagated, alpha 0.5, refined 100 steps", ["--objective", "output", "--alpha", "0.5", "--refine-steps", "100"], []),
    "prop-a05-refine-lr1e-3": ("propagated, alpha 0.5, refined 25 steps at lr 1e-3", ["--objective", "output", "--alpha", "0.5", "--refine-steps", "25", "--refine-lr", "1e-3"], []),
    "prop-a05-global-refine": ("propagated, alpha 0.5, global, refined 25 steps", ["--objective", "output", "--alpha", "0.5", "GLOBAL", "--refine-steps", "25"], ["--allocate", "global"]),
    "aasvd-a05": ("aasvd (float32 Grams, Cholesky, inverse), alpha 0.5", ["--objective", "output", "--alpha", "0.5", "--method", "aasvd"], ["--method", "aasvd"]),
    "compress": ("`coala-stream compress` with its defaults (the rows above in one command)", "COMPRESS", []),
    "prop-a05-bf16": ("propagated, alpha 0.5, bf16 activations", ["--objective", "output", "--alpha", "0.5", "--dtype", "bfloat16"], []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/q17"))
    ap.add_argument("--rows", nargs="+", default=["svdllm", "coala", "coala-global", "prop-a05"],
                    choices=list(ROWS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2])
    ap.add_argument("--calib-from", type=int, default=1500, help="first line of wiki.test.raw used for calibration")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None,
                    help="an HF model directory to compress (default: SmolLM2-135M staged from the "
                         "embedded GGUF; tools/stage_phi3.py builds the second architecture)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.threads, args.report)
    model = args.model if args.model is not None else stage_model(work, runner)
    calib = wiki_calibration(work, WIKI, args.calib_from)
    threads = ["--threads", str(args.threads)]
    common = ["--data", str(calib), "--samples", str(args.samples), "--seq-len", "512"]

    def ev(key, target):
        row = runner.run(f"eval-{key}", measured("eval", str(target), "--data", str(WIKI), "--max-windows",
                                                 str(args.windows), "--json", "--quiet", *threads), json_out=True)
        return None if row is None else row["result"]["ppl"]

    rows = [{"label": "original", "ratio": "-", "ppl": ev("original", model)}]
    plain = work / "plain.zarr"
    for ratio in args.ratios:
        for name in args.rows:
            label, capture, solve = ROWS[name]
            key = f"{name}-{ratio}"
            if capture == "COMPRESS":
                out = work / "models" / key
                runner.run(f"capture-{key}", measured("compress", str(model), *common, "--ratio", str(ratio),
                                                      "--out", str(out), "--overwrite", "--json", "--quiet",
                                                      *threads))
                rows.append({"label": label, "ratio": ratio, "ppl": ev(key, out), "key": key,
                             "capture": runner.cache.get(f"capture-{key}")})
                continue
            if capture is None or "GLOBAL" in capture:
                runner.run("capture-plain", measured("capture", str(model), "--out", str(plain), *common, *threads))
                runner.run("reduce-plain", measured("reduce", str(plain), "--with-gram", *threads))
            store = plain
            if capture is not None:
                store = work / f"{key}.zarr"
                opts = list(capture)
                if "GLOBAL" in opts:
                    ranks_dir = work / "models" / f"ranks-{ratio}"
                    runner.run(f"ranks-{ratio}", measured("solve", str(plain), "--out", str(ranks_dir), "--ratio", str(ratio),
                                                          "--allocate", "global", "--overwrite", "--json", "--quiet", *threads))
                    i = opts.index("GLOBAL")
                    opts[i:i + 1] = ["--ranks", str(ranks_dir / "solve_report.json")]
                else:
                    opts += ["--ratio", str(ratio)]
                # --drop-activations: an output run's store is 2 x 6.3 GB for SmolLM2 at 32 x 512
                # tokens in float32; only the R's (and the applied factors) are needed
                runner.run(f"capture-{key}", measured("capture", str(model), "--out", str(store), *common,
                                                      "--sequential", "--propagate", *opts,
                                                      "--drop-activations", *threads))
            out = work / "models" / key
            runner.run(f"solve-{key}", measured("solve", str(store), "--out", str(out), "--ratio", str(ratio), *solve,
                                                "--overwrite", "--json", "--quiet", *threads), json_out=True)
            rows.append({"label": label, "ratio": ratio, "ppl": ev(key, out), "key": key})
            cap = runner.cache.get(f"capture-{key}") or {}
            rows[-1]["capture"] = cap
    print(table(rows, runner, args))


def table(rows, runner, args) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per command, "
             f"load average at the end {os.getloadavg()[0]:.1f}; calibration wiki.test.raw from line "
             f"{args.calib_from} ({args.samples} x 512 tokens), test: its first {args.windows} x 512-token windows",
             "", "| configuration | ratio | WikiText-2 ppl | capture s | capture peak MiB | solve s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        key = r.get("key")
        cap = r.get("capture") or {}
        solve = runner.cache.get(f"solve-{key}") or {}
        ev = runner.cache.get(f"eval-{key or 'original'}") or {}
        lines.append(f"| {r['label']} | {r['ratio']} | {fmt(r['ppl'])} | {fmt(cap.get('seconds'))} | "
                     f"{fmt(cap.get('peak_rss_mib'))} | {fmt(solve.get('seconds'))} | {fmt(ev.get('seconds'))} |")
    lines += ["", "Commands (capture, solve, eval of each row; the plain store: "
              f"`{(runner.cache.get('capture-plain') or {}).get('command', '-')}`, then "
              f"`{(runner.cache.get('reduce-plain') or {}).get('command', '-')}`):", ""]
    for r in rows:
        key = r.get("key")
        cmds = [runner.cache[k]["command"] for k in (f"capture-{key}", f"solve-{key}", f"eval-{key or 'original'}")
                if k in runner.cache]
        if cmds:
            lines.append(f"- {r['label']}, {r['ratio']}: " + "; ".join(f"`{c}`" for c in cmds))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
