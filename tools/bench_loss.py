"""Loss-aware selection (issue 23) on the real SmolLM2-135M: uniform vs --allocate loss.

Two parts, each cached in the work dir so that a rerun resumes:

``run``: `coala-stream capture | reduce | solve | eval` as subprocesses under
/usr/bin/time (wall seconds and peak RSS of each command): one plain store, then
uniform COALA and `--allocate loss` with each selection rule and loss terms at each
ratio (the loss rows share one gradient pass: the scores file is reused), each
evaluated by perplexity. Nothing is chosen by its score on the evaluated windows.

``check``: does the first-order score predict what dropping a component does? For a
few layers it drops single components (and uniform's whole tail) from the original
model and measures the calibration loss on the store's own windows, beside the
first-order prediction and first order + empirical-Fisher term read from the scores
file. Only the blocks from the layer's on are re-run (their inputs are cached).

    python tools/bench_loss.py run --work runs/q23 --calib runs/q23/wiki_calib.txt
    python tools/bench_loss.py check --work runs/q23 --layers model.layers.2.mlp.down_proj ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

WIKI = Path(__file__).resolve().parent.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"
ROWS = (("uniform", "uniform", []),
        ("loss, zerosum, first order (ZS-SVD's selection)", "zs", ["--allocate", "loss"]),
        ("loss, zerosum, + Fisher term", "zs-fisher", ["--allocate", "loss", "--loss-terms", "fisher"]),
        ("loss, smallest first, first order", "smallest",
         ["--allocate", "loss", "--selection", "smallest"]),
        ("loss, smallest first, + Fisher term", "smallest-fisher",
         ["--allocate", "loss", "--selection", "smallest", "--loss-terms", "fisher"]))


def cli(*args: str) -> list[str]:
    return ["/usr/bin/time", "-f", "BENCH_TIME %e %M", sys.executable, "-m", "coala_stream", *args]


def run_cached(work: Path, key: str, cmd: list[str]) -> dict:
    """Run ``cmd`` once; its result (stdout JSON, seconds, peak MiB) is kept in results.jsonl."""
    results = work / "results.jsonl"
    done = {}
    if results.exists():
        done = {r["key"]: r for r in map(json.loads, results.read_text().splitlines())}
    if key in done:
        return done[key]
    print("$", shlex.join(cmd[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    secs, kib = next(l.split()[1:] for l in reversed(proc.stderr.splitlines()) if l.startswith("BENCH_TIME"))
    out = proc.stdout.strip().splitlines()
    row = {"key": key, "cmd": shlex.join(["coala-stream", *cmd[6:]]), "seconds": float(secs),
           "peak_mib": round(int(kib) / 1024, 1), "json": json.loads(out[-1]) if out and out[-1].startswith("{") else None}
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def run(args) -> None:
    work = Path(args.work)
    model, store = str(work / "smollm2-hf"), str(work / "plain.zarr")
    t = ["--threads", "1"]
    if not (work / "smollm2-hf" / "config.json").exists():  # the embedded GGUF, de-quantised once
        code = ("import sys; from pathlib import Path; from coala_stream import models, weights;"
                "spec = models.ModelSpec.from_args(None);"
                "m = models.load_model(spec, 'float32', progress=False);"
                "weights.save_loaded(m, Path(sys.argv[1])); "
                "models.load_tokenizer(spec).save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, model], check=True)
    run_cached(work, "capture", cli("capture", model, "--out", store, "--data", args.calib, "--samples",
                                    str(args.samples), "--seq-len", "512", *t))
    run_cached(work, "reduce", cli("reduce", store, *t))
    ev = lambda out: cli("eval", out, "--data", str(args.eval_data), "--max-windows", "30",
                         "--json", "--quiet", *t)
    run_cached(work, "eval original", ev(model))
    for ratio in args.ratios:
        for label, slug, extra in ROWS:
            out = str(work / "models" / f"{slug}-{ratio}")
            scores = ["--scores", str(work / "scores")] if extra else []
            run_cached(work, f"solve {label} {ratio}",
                       cli("solve", store, "--ratio", str(ratio), "--out", out, "--overwrite",
                           "--json", "--quiet", *extra, *scores, *t))
            run_cached(work, f"eval {label} {ratio}", ev(out))
    report(work)


def report(work: Path) -> None:
    rows = {r["key"]: r for r in map(json.loads, (work / "results.jsonl").read_text().splitlines())}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 thread per command, load "
          f"average {os.getloadavg()[0]:.1f} at the end")
    print("| configuration | ratio | ppl | predicted loss change | solve s | solve peak MiB | eval s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        if not key.startswith("eval "):
            continue
        label, solve = key[5:], rows.get("solve " + key[5:])
        alloc = (solve or {}).get("json", {}) or {}
        alloc = alloc.get("allocation", {})
        name, _, ratio = label.rpartition(" ")
        pred = alloc.get("predicted_loss_change")
        print(f"| {name if solve else label} | {ratio if solve else '-'} | {r['json']['ppl']:.2f} | "
              f"{'-' if pred is None else f'{pred:.4f}'} | {solve['seconds'] if solve else '-'} | "
              f"{solve['peak_mib'] if solve else '-'} | {r['seconds']} |")
    for key, r in rows.items():
        print(f"- {key}: `{r['cmd']}`")


def check(args) -> None:
    import torch

    from coala_stream import checkpoint, models
    from coala_stream.scores import dropped_weight, loss_estimates
    from coala_stream.linalg import coala_svd, rank_for_ratio
    from coala_stream.reduce import read_result
    from coala_stream.solve import gradients
    from coala_stream.store import open_store

    torch.set_num_threads(1)
    work = Path(args.work)
    spec = models.ModelSpec.from_args(str(work / "smollm2-hf"))
    cfg = models.load_config(spec)
    model = models.load_model(spec, "float32", "cpu", config=cfg, progress=False)
    tensors, meta = checkpoint.load_state(work / "scores" / gradients.SCORES_FILE)
    lines = []
    with open_store(work / "plain.zarr") as store, torch.no_grad():
        ids = gradients.calibration_ids(store, spec, cfg)
        for name in args.layers:
            block = int(name.split(".")[2])
            cache = _block_inputs(model, block, ids)
            base = _tail_loss(model, block, cache, ids)
            lin = model.get_submodule(name)
            W = lin.weight.detach().clone()
            U, _ = coala_svd(W, read_result(store, _input_of(store, name)).R)
            first, window, token = loss_estimates(tensors[f"P:{name}"], tensors.get(f"Q:{name}"))
            k = U.shape[1]
            r = rank_for_ratio(*W.shape, args.ratio)
            picks = sorted({0, 1, k // 4, k // 2, r, k - 50, k - 10, k - 2, k - 1})
            for label, drop in [(f"component {i}", [i]) for i in picks] + \
                               [(f"uniform tail {r}..{k - 1} at ratio {args.ratio}", list(range(r, k)))]:
                lin.weight.copy_(dropped_weight(W, U, drop))
                measured = _tail_loss(model, block, cache, ids) - base
                lin.weight.copy_(W)
                f1 = float(first[drop].sum())
                lines.append({"layer": name, "drop": label, "measured": measured, "first": f1,
                              "first_plus_window_fisher": f1 + float(window[drop].sum()),
                              "first_plus_token_fisher": None if token is None
                              else f1 + float(token[drop].sum())})
                print(json.dumps(lines[-1]), flush=True)
    (work / "check.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))


def _input_of(store, name: str) -> str:
    return next(i for i in store.inputs if name in store.input(i).consumers)


def _block_inputs(model, block: int, ids):
    """Each window's (args, kwargs) entering decoder block ``block`` (one forward each)."""
    import torch

    seen = []

    def grab(module, a, kw):
        seen.append((a, kw))
        raise StopIteration  # nothing after this block is needed

    handle = model.model.layers[block].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for w in range(ids.shape[0]):
            try:
                model(ids[w:w + 1])
            except StopIteration:
                pass
    finally:
        handle.remove()
    return seen


def _tail_loss(model, block: int, cache, ids) -> float:
    """Mean over windows of the window's mean cross entropy, from block ``block`` on."""
    import torch

    losses = []
    for w, (a, kw) in enumerate(cache):
        h = a[0] if a else kw["hidden_states"]
        kw = {k: v for k, v in kw.items() if k != "hidden_states"}
        for layer in model.model.layers[block:]:
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(model.model.norm(h))[0, :-1].float()
        losses.append(float(torch.nn.functional.cross_entropy(logits, ids[w, 1:])))
    return sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--calib", required=True)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    r.add_argument("--eval-data", default=str(WIKI))
    c = sub.add_parser("check")
    c.add_argument("--work", required=True)
    c.add_argument("--layers", nargs="+", required=True)
    c.add_argument("--ratio", type=float, default=0.2)
    sub.add_parser("report").add_argument("--work", required=True)
    args = p.parse_args()
    {"run": run, "check": check, "report": lambda a: report(Path(a.work))}[args.what](args)


if __name__ == "__main__":
    t0 = time.time()
    main()
