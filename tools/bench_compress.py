"""`coala-stream compress` in forward passes of CPU time (issue 25).

Runs ``coala-stream compress`` as a child process on the embedded SmolLM2-135M (or
``--model``) with ``--samples`` x ``--seq-len`` calibration tokens of WikiText-2
(``wiki.test.raw`` from line ``--calib-from`` on, written to a temporary file), ratio
0.2, ``--refine-steps 0``, ``--allocate uniform`` and one thread by default, and reports:

- the CPU seconds of the whole command (user + system of the child, from
  ``resource.getrusage(RUSAGE_CHILDREN)``: model loading included);
- the CPU seconds of one forward pass of the same model over the same calibration
  tokens on one thread, measured in this same run (best of ``--forward-repeats``);
- their ratio: the command's cost in *forward passes*, the unit of issue 25;
- the peak RSS of the compress child (``ru_maxrss``);
- compress's own per-step seconds from its ``--json`` summary (``reduce_seconds``,
  ``solve_seconds``, ``refine_seconds``, the capture's and solve's wall seconds) and, where
  compress reports them, the same steps' CPU seconds (``*_cpu_seconds``; the propagating
  capture's blocks loop as ``capture_cpu_seconds``).

The machine is shared: the load (``os.getloadavg``) before and after is printed with
the result, and one JSON line is appended to ``--results`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"


def calibration_file(wiki: Path, first_line: int, folder: Path) -> Path:
    """``wiki`` from line ``first_line`` (1-based) on, as a text file in ``folder``."""
    lines = wiki.read_text(encoding="utf-8").splitlines(keepends=True)
    path = folder / "calib.txt"
    path.write_text("".join(lines[first_line - 1:]), encoding="utf-8")
    return path


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_compress(args, calib: Path, out: Path, env: dict) -> tuple[dict, float, float]:
    """(compress's JSON summary, CPU seconds, wall seconds) of one compress child."""
    cmd = [sys.executable, "-m", "coala_stream", "compress", "--out", str(out),
           "--data", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--ratio", str(args.ratio), "--refine-steps", str(args.refine_steps),
           "--allocate", args.allocate,
           "--threads", str(args.threads), "--json", "--quiet", "--overwrite"]
    if args.model:
        cmd[4:4] = [str(args.model)]
    print("$ " + " ".join(cmd), flush=True)
    cpu0, t0 = child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
    # the largest child so far: compress runs before the forward's child (which loads whole)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        sys.exit(f"compress failed with exit code {proc.returncode}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "peak_rss_mib": peak}, cpu, wall


FORWARD = """
import json, resource, sys, torch
from coala_stream import calib, models
torch.set_num_threads(1)
spec = models.ModelSpec.from_args(sys.argv[1] or None)
tok = models.load_tokenizer(spec)
ids = calib.calibration_windows(tok, calib.read_data(sys.argv[2]), int(sys.argv[3]),
                                int(sys.argv[4])).ids
model = models.load_model(spec, "float32", progress=False).eval()
best = None
for _ in range(int(sys.argv[5])):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    best = cpu if best is None else min(best, cpu)
print(json.dumps({"forward_cpu_seconds": best, "tokens": int(ids.numel())}))
"""


def forward_cpu(args, calib: Path, env: dict) -> dict:
    """CPU seconds of one forward pass of the model over the calibration tokens, one thread
    (the logits included, as a model forward computes them)."""
    cmd = [sys.executable, "-c", FORWARD, str(args.model or ""), str(calib), str(args.samples),
           str(args.seq_len), str(args.forward_repeats)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps_of(summary: dict) -> dict:
    """Per-step seconds from compress's summary."""
    capture = summary["steps"]["capture"]
    prop = capture.get("propagate") or {}
    out = {"compress_seconds": summary["seconds"], "capture_seconds": capture.get("seconds")}
    for key in ("reduce_seconds", "solve_seconds", "refine_seconds", "cpu_seconds",
                "reduce_cpu_seconds", "solve_cpu_seconds", "refine_cpu_seconds"):
        if key in prop:  # the capture's own CPU seconds (model loading excluded): capture_cpu
            out["capture_cpu_seconds" if key == "cpu_seconds" else key] = prop[key]
    out["final_solve_seconds"] = summary["report"].get("seconds")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to compress (default: embedded SmolLM2)")
    ap.add_argument("--wiki", type=Path, default=WIKI)
    ap.add_argument("--calib-from", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--refine-steps", type=int, default=0)
    ap.add_argument("--allocate", default="uniform", choices=["uniform", "global", "loss"],
                    help="compress --allocate (default uniform: the issue's measurement; "
                         "compress's own default is loss)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forward-repeats", type=int, default=3)
    ap.add_argument("--label", default="", help="a name for this measurement in the output")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the compressed model here (kept, to evaluate) instead of a "
                         "temporary directory")
    ap.add_argument("--results", type=Path, default=None, help="append the result (JSON line)")
    args = ap.parse_args()
    if not args.wiki.is_file():
        sys.exit(f"{args.wiki} not found: pass --wiki")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_compress.") as tmp:
        calib = calibration_file(args.wiki, args.calib_from, Path(tmp))
        summary, cpu, wall = run_compress(args, calib, args.keep or Path(tmp) / "out", env)
        fwd = forward_cpu(args, calib, {**env, "OMP_NUM_THREADS": "1"})
    result = {"label": args.label, "model": args.model or "embedded SmolLM2-135M",
              "samples": args.samples, "seq_len": args.seq_len, "ratio": args.ratio,
              "refine_steps": args.refine_steps, "allocate": args.allocate,
              "threads": args.threads, "compress_cpu_seconds": cpu,
              "compress_wall_seconds": wall, "compress_peak_rss_mib": summary["peak_rss_mib"],
              **fwd,
              "forward_passes": cpu / fwd["forward_cpu_seconds"], "steps": steps_of(summary),
              "load_before": load0, "load_after": os.getloadavg(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
