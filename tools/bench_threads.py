"""Torch CPU threads on shared cores: dense linear algebra by thread count, load and OpenMP env.

Each configuration (threads x load x environment) runs in a fresh subprocess, because
OpenMP and MKL read their environment (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ...)
once, when torch is imported. "busy" starts ``--busy`` CPU-bound processes
(``python -c "while True: pass"``) before the worker and kills them after, like
the other jobs of a shared node. The worker times each operation (one warm-up,
then the median of up to ``--repeats`` runs, fewer when one run is slow; the best of
``--rounds`` workers, each started once no other process keeps a core busy) and the
parent prints a table, slowdowns against the quiet run of the same threads/env.

    .venv/bin/python tools/bench_threads.py
    .venv/bin/python tools/bench_threads.py --threads 1 2 --envs default passive --busy 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The parent only measures load; every timing runs in a fresh worker process.
from coala_stream.devices import busy_elsewhere, default_threads  # noqa: E402

# name -> extra environment for the worker; the defaults are cleared first so
# that the caller's own settings do not leak into the "default" row.
ENVS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin0": {"GOMP_SPINCOUNT": "0"},
    "passive+mkl": {"OMP_WAIT_POLICY": "PASSIVE", "MKL_DYNAMIC": "TRUE",
                    "KMP_BLOCKTIME": "0"},
}
CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_DYNAMIC",
           "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_CPUS_PER_TASK")
OPS = ["svd 576x576", "svd 1536x576", "qr 4096x576", "mm 2048x576@576x1536", "fwd 30x(512x576@576x576)"]


def _ops(torch, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(576, 576, generator=g, dtype=dtype)
    b = torch.randn(1536, 576, generator=g, dtype=dtype)
    c = torch.randn(4096, 576, generator=g, dtype=dtype)
    d, e = torch.randn(2048, 576, generator=g, dtype=dtype), torch.randn(576, 1536, generator=g, dtype=dtype)
    return {OPS[0]: lambda: torch.linalg.svd(a, full_matrices=False),
            OPS[1]: lambda: torch.linalg.svd(b, full_matrices=False),
            OPS[2]: lambda: torch.linalg.qr(c),
            OPS[3]: lambda: d @ e,
            OPS[4]: lambda: _forward_like(torch, b[:512], a)}


def _forward_like(torch, x, w):
    """Many mid-sized ops in a row, like a model forward: one OpenMP barrier per op."""
    for _ in range(30):
        x = torch.nn.functional.gelu(x @ w) * 0.05
    return x


def worker(threads: int, repeats: int, dtype: str) -> None:
    """Time every op with ``threads`` torch threads; one JSON line on stdout."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, fn in _ops(torch, getattr(torch, dtype)).items():
        times = []
        fn()  # warm-up: MKL/OpenMP thread pools and workspace
        while len(times) < repeats and sum(times) < 6.0:  # bounded when slow (loaded, spinning)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    print(json.dumps(out))


def _busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)  # let them get going before anything is timed
    return procs


def _wait_quiet(limit: float = 120.0) -> None:
    """On a shared machine, wait (up to ``limit`` s) until nobody else keeps a core busy."""
    end = time.monotonic() + limit
    while busy_elsewhere(0.5) > 0.3 and time.monotonic() < end:
        time.sleep(2.0)


def run_config(threads: int, env_name: str, busy: int, args) -> dict[str, float]:
    """Best of ``args.rounds`` workers (each a median): transient load from others only adds."""
    runs = [_run_once(threads, env_name, busy, args) for _ in range(args.rounds)]
    return {k: min(r[k] for r in runs) if k != "seen" else max(r[k] for r in runs) for k in runs[0]}


def _run_once(threads: int, env_name: str, busy: int, args) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(ENVS[env_name])
    _wait_quiet()
    procs = _busy(busy)
    try:
        res = subprocess.run([sys.executable, __file__, "--worker", str(threads),
                              "--repeats", str(args.repeats), "--dtype", args.dtype],
                             env=env, capture_output=True, text=True, check=True)
        seen = busy_elsewhere(0.3)  # right after: our busy loops plus anyone sharing the machine
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "seen": seen}


def budget_under_load(busy: int) -> str:
    """What devices.default_threads() picks with ``busy`` busy loops running."""
    procs = _busy(busy)
    try:
        count, why = default_threads()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return f"{count} ({why})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes in the loaded runs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="workers per cell, the fastest is kept")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.repeats, args.dtype)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"affinity {len(os.sched_getaffinity(0))} CPUs, {args.dtype}, median s (best of --rounds), "
          f"busy = {args.busy} x `python -c 'while True: pass'`")
    print("| env | threads | load (cores busy elsewhere) | " + " | ".join(OPS) + " |")
    print("|---|---|---|" + "---|" * len(OPS))
    for env_name in args.envs:
        for threads in args.threads:
            quiet = run_config(threads, env_name, 0, args)
            loaded = run_config(threads, env_name, args.busy, args)
            for load, res in (("quiet", quiet), ("busy", loaded)):
                cells = [f"{res[o]:.3f}" + ("" if load == "quiet" else f" ({res[o] / quiet[o]:.1f}x)")
                         for o in OPS]
                print(f"| {env_name} | {threads} | {load} ({res['seen']:.1f}) | " + " | ".join(cells) + " |", flush=True)
    print(f"# default rule: quiet {budget_under_load(0)}; busy {budget_under_load(args.busy)}")


if __name__ == "__main__":
    main()
