"""Inference speed of compressed models on CPU: prefill and decode tokens/s, peak memory,
and the rank at which one factorized linear stops paying.

Models: ``--model LABEL=DIR`` (repeatable): any directory ``coala_stream.load_output``
reads (the original as a Hugging Face directory, solve's dense and factorized outputs),
loaded in float32. Each (model, threads) pair runs in a fresh worker process, so torch
reads its thread count before the first op and the peak RSS (VmHWM) is that model's
alone (loading included). A worker, at batch 1 on a fixed random prompt:
- prefill: one forward over ``--prompt`` tokens (KV cache on), tokens/s = prompt / time;
- decode: ``--new`` greedy steps, one token each, on the prefill's cache; tokens/s =
  new / time. Each is timed ``--repeats`` times after one warm-up; the best run is
  reported (on a shared machine, other jobs only ever add time), in wall seconds and in
  CPU seconds of the worker (per CPU s: with one thread, what an idle core would give).

Linears (``--linears``): for every distinct (out, in) shape among the model's linear
layers, ``x @ W^T`` against ``(x @ B^T) @ A^T`` (``torch.nn.functional.linear``, as
LowRankLinear runs it; CPU seconds with one thread, wall seconds with more) for ranks in
steps of ``--rank-step``, at 1 token (decode) and ``--prompt`` tokens (prefill): the largest rank at which the factorized pair is still
faster (the break-even) next to the rank at which it stops saving parameters,
mn / (m + n). With ``--align N``, every rank of a window of ``2 N`` ranks below a few
points is timed too, to see whether multiples of N run faster than their neighbours.

    PYTHONPATH=$PWD .venv/bin/python tools/bench_inference.py \\
        --model original=runs/infer/smollm2-hf --model dense-0.2=runs/infer/dense-0.2 \\
        --model factorized-0.2=runs/infer/factorized-0.2 --threads 1 2 --linears --align 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vm(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of ``fn``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _best(fn, repeats: int) -> tuple[float, float]:
    """The least wall and the least CPU seconds of ``repeats`` calls of ``fn``, after one
    warm-up call. On a shared machine other jobs add wall time (and, less, CPU time through
    the caches): the least of each is the nearest to a quiet machine."""
    fn()
    runs = [_timed(fn) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def worker_model(path: str, prompt: int, new: int, repeats: int) -> dict:
    import torch

    from coala_stream import load_output

    t0 = time.perf_counter()
    model = load_output(path, dtype="float32")
    load_s, rss_loaded = time.perf_counter() - t0, _vm("VmRSS")
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        def prefill():
            return model(ids, use_cache=True)

        def decode(out):
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new):
                out = model(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

        prefill_s = _best(prefill, repeats)
        runs = []
        for _ in range(repeats + 1):  # each decode starts from a fresh prefill's cache
            out = prefill()
            runs.append(_timed(lambda: decode(out)))
        decode_s = min(r[0] for r in runs[1:]), min(r[1] for r in runs[1:])  # [0]: warm-up
    return {"params": params, "load_s": load_s, "rss_loaded_mib": rss_loaded,
            "peak_rss_mib": _vm("VmHWM"), "prefill_tok_s": prompt / prefill_s[0],
            "decode_tok_s": new / decode_s[0], "prefill_tok_cpu_s": prompt / prefill_s[1],
            "decode_tok_cpu_s": new / decode_s[1]}


def _linear_shapes(path: str) -> list[tuple[int, int]]:
    """Distinct (out, in) shapes of the linear layers of a Hugging Face directory's model."""
    import torch

    from coala_stream import load_output

    from coala_stream.export import LowRankLinear

    model = load_output(path, dtype="float32")
    shapes, factors = set(), set()
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):  # the layer it replaced, not its two factors
            shapes.add((m.out_features, m.in_features))
            factors |= {f"{name}.A", f"{name}.B"}
        elif isinstance(m, torch.nn.Linear) and name not in factors and name != "lm_head":
            shapes.add((m.out_features, m.in_features))
    return sorted(shapes)


def _time_pair(torch, x, m: int, n: int, ranks: list[int], loops: int, repeats: int):
    """(dense seconds, {rank: factorized seconds}) for one token count, per call."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g)

    def many(fn):
        return lambda: [fn() for _ in range(loops)]

    pick = 1 if torch.get_num_threads() == 1 else 0  # one thread: its CPU time; else wall
    dense = _best(many(lambda: F.linear(x, W)), repeats)[pick] / loops
    low = {}
    for r in ranks:
        A, B = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
        low[r] = _best(many(lambda: F.linear(F.linear(x, B), A)), repeats)[pick] / loops
    return dense, low


def worker_linears(path: str, prompt: int, step: int, align: int, repeats: int) -> list[dict]:
    import torch

    rows = []
    for m, n in _linear_shapes(path):
        full = min(m, n)
        ranks = list(range(step, full + 1, step))
        for tokens in (1, prompt):
            x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1))
            loops = max(3, int(1e9 // (2 * tokens * m * n)))  # ~20 ms a timing at 50 GF/s
            dense, low = _time_pair(torch, x, m, n, ranks, loops, repeats)
            paying = [r for r in ranks if low[r] < dense]
            row = {"shape": [m, n], "tokens": tokens, "dense_us": dense * 1e6,
                   "break_even_rank": max(paying) if paying else 0,
                   "param_break_even_rank": m * n // (m + n),
                   "ratio_at": {r: low[r] / dense for r in ranks}}
            if align > 1:
                row["align"] = _alignment(torch, x, m, n, full, align, loops, repeats)
            rows.append(row)
    return rows


def _alignment(torch, x, m, n, full, align, loops, repeats) -> dict:
    """Seconds per call of every rank in windows below a quarter, half and three quarters of
    the full rank, and the mean time of the multiples of ``align`` against the others,
    each taken relative to the straight line through the window (a rank costs ~linearly)."""
    out = {}
    for frac in (0.25, 0.5, 0.75):
        top = max(align * 2, int(full * frac) // align * align)
        ranks = list(range(top - 2 * align + 1, top + 1))
        _, low = _time_pair(torch, x, m, n, ranks, loops, repeats)
        # a least-squares line of time over rank; residuals of aligned vs other ranks
        k = len(ranks)
        mr, mt = sum(ranks) / k, sum(low.values()) / k
        slope = sum((r - mr) * (low[r] - mt) for r in ranks) / sum((r - mr) ** 2 for r in ranks)
        resid = {r: low[r] / (mt + slope * (r - mr)) - 1 for r in ranks}
        on = [resid[r] for r in ranks if r % align == 0]
        off = [resid[r] for r in ranks if r % align]
        out[str(top)] = {"aligned_resid": sum(on) / len(on), "other_resid": sum(off) / len(off),
                         "us": {r: low[r] * 1e6 for r in ranks}}
    return out


def _spawn(args: list[str], threads: int) -> dict | list:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *args],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (batch 1)")
    p.add_argument("--new", type=int, default=32, help="decode steps (batch 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--linears", action="store_true", help="also the per-linear break-even ranks "
                   "(for the shapes of the first --model's linear layers)")
    p.add_argument("--linears-only", action="store_true", help="only those, no model timings")
    p.add_argument("--rank-step", type=int, default=16)
    p.add_argument("--align", type=int, default=0, help="also time ranks near multiples of N")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _run_worker(args)
    models = [m.split("=", 1) for m in args.model]
    if not models or any(len(m) != 2 for m in models):
        p.error("give at least one --model LABEL=DIR")
    result = {"load_before": _load(), "cpus": os.cpu_count(), "prompt": args.prompt,
              "new": args.new, "repeats": args.repeats, "models": [], "linears": {}}
    for threads in args.threads:
        for label, path in ([] if args.linears_only else models):
            row = _spawn(["model", path, str(args.prompt), str(args.new), str(args.repeats)], threads)
            result["models"].append({"label": label, "threads": threads, **row, "load": _load()})
            _print_model(result["models"][-1])
        if args.linears or args.linears_only:
            rows = _spawn(["linears", models[0][1], str(args.prompt), str(args.rank_step),
                           str(args.align), str(args.repeats)], threads)
            result["linears"][str(threads)] = rows
            _print_linears(threads, rows)
    result["load_after"] = _load()
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def _run_worker(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    kind, path, *rest = args.worker
    rest = [int(v) for v in rest]
    out = worker_model(path, *rest) if kind == "model" else worker_linears(path, *rest)
    print(json.dumps(out))


def _print_model(r: dict) -> None:
    print(f"{r['label']:>16} threads {r['threads']}: params {r['params'] / 1e6:7.1f} M  "
          f"prefill {r['prefill_tok_s']:8.1f} tok/s ({r['prefill_tok_cpu_s']:8.1f} per CPU s)  "
          f"decode {r['decode_tok_s']:6.1f} tok/s ({r['decode_tok_cpu_s']:6.1f} per CPU s)  "
          f"RSS loaded {r['rss_loaded_mib']:6.0f} MiB peak {r['peak_rss_mib']:6.0f} MiB  "
          f"(load {r['load']})", flush=True)


def _print_linears(threads: int, rows: list[dict]) -> None:
    for r in rows:
        m, n = r["shape"]
        line = (f"threads {threads} linear {m}x{n} tokens {r['tokens']:4d}: dense {r['dense_us']:8.1f} us, "
                f"factorized faster up to rank {r['break_even_rank']} (parameters break even "
                f"at {r['param_break_even_rank']})")
        for top, a in (r.get("align") or {}).items():
            line += (f"; near {top}: multiples {a['aligned_resid'] * 100:+.1f}% vs others "
                     f"{a['other_resid'] * 100:+.1f}% off the line")
        print(line, flush=True)


if __name__ == "__main__":
    main()
