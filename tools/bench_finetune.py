"""Fine-tuning from COALA-initialised LoRA adapters (the seed paper's second use).

On SmolLM2-135M, LoRA adapters of one rank on every linear of the decoder
blocks (q, k, v, o, gate, up, down) are initialised in three ways and trained
with the same budget, data order, seed and learning rate:

- ``lora``: PEFT's default init (A Kaiming-uniform, B = 0) on the original model;
- ``pissa``: PEFT's PiSSA (``init_lora_weights="pissa_niter_4"``: the top-r SVD
  of W by 4 subspace iterations; weights only, no data), base = W - B A;
- ``coala``: ``coala-stream capture | reduce | solve --format peft --rank R``
  (mu = 0): DIR/base holds W - A B, DIR/adapter the factors, loaded with
  ``PeftModel.from_pretrained(base, DIR/adapter, is_trainable=True)``;
- ``coala-mu``: the same with ``solve --mu F`` (one variant per ``--mu`` value).

Before training, pissa and coala reproduce the original model: their step-0
held-out loss must equal the original's (checked and reported, together with
the largest relative weight error of base + scaling B A against W).

Data: training windows of ``--seq-len`` tokens from the calibration part of the
builtin text (``builtin``: CPython's pydoc topics, 80 percent), non-overlapping,
visited in one seeded order shared by every variant; evaluation: the first
``--eval-windows`` non-overlapping windows of ``builtin:heldout`` (disjoint),
scored with the repository's own protocol (`coala_stream.evaluate.window_nll`:
mean NLL per predicted token; perplexity = exp). ``--lowdata``: COALA
calibrates on 2 samples (1024 tokens, fewer than the MLP's 1536 input features)
and training cycles over only 8 windows, to provoke overfitting; the paper
expects mu > 0 to help there.

Training: AdamW (weight decay 0, so principal-component adapters are not pulled
to zero), the same ``--lr`` for all, linear warm-up over the first 5 percent of
steps then constant, gradient norm clipped at 1, float32, LoRA dropout 0,
lora_alpha = r for every variant (scaling 1: what ``solve --format peft``
writes, so the four differ only in their initialisation).

The coala-stream steps run as subprocesses (as tools/bench_quality.py does);
their commands, wall time and peak RSS are printed, cached in WORK/results.jsonl
and written to the JSON and markdown beside the numbers, together with the
command line of this script that trained each variant. ``--store`` reuses a
store already captured and reduced (runs/quality/normal.zarr has exactly this
script's default calibration: 32 x 512 tokens of builtin, seed 0, float32) and
reports the commands that made it. Each trained variant is cached in
WORK/variants under a hash of its settings, so an interrupted run resumes and
variants may be trained in separate invocations (``--variants lora`` then
``--variants pissa`` ...); the table, JSON and PNG always cover every variant
asked for. Outputs: a markdown table on stdout and in WORK/finetune[-lowdata].md,
a JSON with every curve, and a PNG of the loss curves (held-out loss per variant,
smoothed training loss faint).

Cost (SmolLM2-135M, rank 16, 4 x 128 tokens per step, float32): about 3-5 s
per step on 2 free cores (15 s measured at load average 7), so 200 steps x 4
variants is 45-60 minutes plus the evaluations, plus capture and reduce (a few
minutes, ~10 at load) unless ``--store`` is given. Real runs:

    .venv/bin/python tools/bench_finetune.py --model runs/quality/smollm2-135m-hf \
        --store runs/quality/normal.zarr
    .venv/bin/python tools/bench_finetune.py --model runs/quality/smollm2-135m-hf --lowdata
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_quality import Runner, measured, stage_model  # noqa: E402

VARIANTS = ("lora", "pissa", "coala", "coala-mu")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOWDATA_CALIB_SAMPLES = 2
LOWDATA_TRAIN_WINDOWS = 8


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="Hugging Face model directory (float32 safetensors); default: the embedded "
                         "SmolLM2-135M de-quantised once into WORK/smollm2-135m-hf (as "
                         "tools/bench_quality.py stages it); runs/quality/smollm2-135m-hf is the same")
    ap.add_argument("--work", type=Path, default=Path("runs/finetune"),
                    help="work dir: stores, solve outputs, command cache, JSON, markdown")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank, the same for every variant and layer")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per training and evaluation window")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="AdamW learning rate, the same for every variant: 1e-4 is the usual LoRA "
                         "rate for a model of this size, low enough that the principal-component "
                         "inits (pissa, coala), whose adapters already carry the large singular "
                         "directions, are not thrown off in the first steps, and high enough for "
                         "the zero-init default to move within a few hundred steps")
    ap.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps")
    ap.add_argument("--eval-windows", type=int, default=16,
                    help="held-out windows of --seq-len tokens (the first N of builtin:heldout)")
    ap.add_argument("--mu", type=float, nargs="+", default=[0.01],
                    help="relative mu (solve --mu) of coala-mu; several values give one variant each "
                         "(note: choosing the best of several on this held-out text is optimistic; "
                         "tools/bench_quality.py picks mu on a validation text)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help=f"capture --samples for the COALA store (default 32; {LOWDATA_CALIB_SAMPLES} "
                         f"with --lowdata)")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="capture --seq-len")
    ap.add_argument("--store", type=Path, default=None,
                    help="reuse this captured and reduced store (e.g. runs/quality/normal.zarr: 32 x 512 "
                         "tokens of builtin, seed 0, float32, the same as this script's own capture) "
                         "instead of running capture and reduce; its calibration settings are "
                         "reported, and its commands when its work dir's results.jsonl has them")
    ap.add_argument("--train-windows", type=int, default=None,
                    help=f"training windows cycled over (default: every window of the text; "
                         f"{LOWDATA_TRAIN_WINDOWS} with --lowdata)")
    ap.add_argument("--lowdata", action="store_true",
                    help=f"low-data regime: {LOWDATA_CALIB_SAMPLES} calibration samples and "
                         f"{LOWDATA_TRAIN_WINDOWS} training windows, repeated")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads here and OMP/MKL threads of the coala-stream children")
    ap.add_argument("--seed", type=int, default=0, help="data order, LoRA/PiSSA init, capture windows")
    ap.add_argument("--fresh", action="store_true",
                    help="retrain variants whose result is cached in WORK/variants (by default a "
                         "variant already trained with the same settings is reused, so an "
                         "interrupted run resumes and variants can be run in separate invocations)")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window of the plotted train loss")
    ap.add_argument("--plot", type=Path, default=None,
                    help="PNG of the loss curves (default docs/finetune.png, docs/finetune-lowdata.png "
                         "with --lowdata)")
    ap.add_argument("--json", type=Path, default=None,
                    help="JSON with every curve (default WORK/finetune[-lowdata].json)")
    args = ap.parse_args(argv)
    tag = "finetune-lowdata" if args.lowdata else "finetune"
    if args.calib_samples is None:
        args.calib_samples = LOWDATA_CALIB_SAMPLES if args.lowdata else 32
    if args.train_windows is None and args.lowdata:
        args.train_windows = LOWDATA_TRAIN_WINDOWS
    args.plot = args.plot or Path("docs") / f"{tag}.png"
    args.json = args.json or args.work / f"{tag}.json"
    args.markdown = args.json.with_suffix(".md")
    for name in ("rank", "steps", "batch", "eval_every", "eval_windows", "calib_samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.train_windows is not None and args.train_windows < 1:
        ap.error("--train-windows must be at least 1")
    if any(m <= 0 for m in args.mu):
        ap.error("--mu values must be > 0 (mu = 0 is the coala variant)")
    return args


# -- data ----------------------------------------------------------------------------


def token_windows(tokenizer, data: str, seq_len: int):
    """Every non-overlapping window of ``seq_len`` tokens of ``data`` (evaluate's tokenization)."""
    from coala_stream import calib, evaluate

    text, source = calib.load_text(data)
    ids = evaluate.token_ids(tokenizer, evaluate.normalise_newlines(text))
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len), source, ids


def batch_plan(n_windows: int, steps: int, batch: int, seed: int, subset: int | None):
    """Window indices of every step: seeded epochs over the (subset of) windows; shared by all variants."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(n_windows, generator=g)
    if subset is not None:
        pool = pool[:subset]
    order = []
    while len(order) < steps * batch:
        order += pool[torch.randperm(len(pool), generator=g)].tolist()
    return [order[i * batch:(i + 1) * batch] for i in range(steps)], pool.tolist()


# -- models ----------------------------------------------------------------------------


def load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def lora_config(args, init):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights=init)


def build_variant(variant: dict, args, model_dir: Path):
    """(peft model, seconds) for one variant; only the LoRA parameters are trainable."""
    import torch
    from peft import PeftModel, get_peft_model

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if variant["init"] in ("lora", "pissa"):
        init = True if variant["init"] == "lora" else "pissa_niter_4"
        model = get_peft_model(load_hf(model_dir), lora_config(args, init))
    else:
        out = variant["solve_dir"]
        model = PeftModel.from_pretrained(load_hf(out / "base"), str(out / "adapter"), is_trainable=True)
    return model, time.perf_counter() - t0


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def init_check(model, model_dir: Path) -> dict:
    """Adapter shape/scaling summary and max_l ||W_base + s B A - W_orig||_F / ||W_orig||_F."""
    from coala_stream.weights import LazyWeights

    source = LazyWeights(model_dir)
    layers = lora_layers(model)
    worst, scalings, ranks, modules = 0.0, set(), set(), set()
    for name, m in layers:
        key = name.removeprefix("base_model.model.") + ".weight"
        W0 = source.get(key).float()
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        s = m.scaling["default"]
        W = m.get_base_layer().weight.detach().float() + s * (B.detach() @ A.detach())
        worst = max(worst, float((W - W0).norm() / W0.norm().clamp_min(1e-30)))
        scalings.add(float(s))
        ranks.add(int(A.shape[0]))
        modules.add(name.rsplit(".", 1)[-1])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"lora_modules": len(layers), "module_kinds": sorted(modules), "ranks": sorted(ranks),
            "scalings": sorted(scalings), "max_rel_weight_error": worst,
            "trainable_params": trainable, "only_lora_trainable": trainable == lora_params}


def heldout_loss(model, eval_ids, args) -> float:
    from coala_stream import evaluate

    model.eval()
    total, predicted, _ = evaluate.window_nll(model, eval_ids, args.seq_len, args.eval_windows,
                                              batch_size=args.batch)
    return total / predicted


def train(model, windows, plan, eval_ids, args, label: str) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, round(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
    evals = [(0, heldout_loss(model, eval_ids, args))]
    eval_s = 0.0  # held-out evaluations during training, not counted as training time
    print(f"  {label} step 0: held-out loss {evals[0][1]:.4f}", flush=True)
    train_losses = []
    t_train = time.perf_counter()
    for step, idx in enumerate(plan, 1):
        model.train()
        batch = windows[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            te = time.perf_counter()
            evals.append((step, heldout_loss(model, eval_ids, args)))
            eval_s += time.perf_counter() - te
            el = time.perf_counter() - t_train
            print(f"  {label} step {step}/{args.steps}: train {smooth(train_losses, args.smooth)[-1]:.4f} "
                  f"held-out {evals[-1][1]:.4f} ({el:.0f} s)", flush=True)
    return {"heldout": evals, "train": train_losses,
            "train_smoothed": smooth(train_losses, args.smooth),
            "train_seconds": round(time.perf_counter() - t_train - eval_s, 1),
            "eval_seconds": round(eval_s, 1)}


def smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


# -- the COALA pipeline ---------------------------------------------------------------


def coala_solves(runner: Runner, args, model_dir: Path, mus: list[float]) -> dict[float, dict]:
    """capture | reduce (unless --store) | solve --format peft for each mu;
    {mu: {"dir", "commands", "mean_calib_rel_error"}}."""
    if args.store is not None:
        store = args.store.resolve()
        skey = store.name.split(".")[0]
        made_by = reused_store_commands(store)
    else:
        store = (args.work / f"calib-s{args.calib_samples}-L{args.calib_seq_len}-seed{args.seed}.zarr").resolve()
        skey = store.stem
        done = store.exists() and (store / "reduce").exists()
        cap = runner.run(f"capture-{skey}", measured(
            "capture", str(model_dir.resolve()), "--out", str(store), "--data", "builtin",
            "--samples", str(args.calib_samples), "--seq-len", str(args.calib_seq_len), "--seed",
            str(args.seed), "--dtype", "float32", "--device", "cpu"), force=not done)
        red = runner.run(f"reduce-{skey}", measured("reduce", str(store), "--device", "cpu"),
                         force=not done)
        made_by = [cap, red]
    out = {}
    for mu in mus:
        key = f"{skey}-r{args.rank}-mu{mu:g}"
        target = (args.work / "adapters" / key).resolve()
        opts = ["--mu", str(mu)] if mu > 0 else []
        row = runner.run(f"solve-{key}", measured(
            "solve", str(store), "--model", str(model_dir.resolve()), "--out", str(target), "--rank",
            str(args.rank), "--format", "peft", *opts, "--overwrite", "--json", "--quiet"),
            json_out=True, force=not (target / "adapter").exists())
        report = row["result"]
        errs = [r["rel_error"] for r in report.get("layers", []) if isinstance(r.get("rel_error"), float)]
        out[mu] = {"dir": target, "commands": [*made_by, {k: v for k, v in row.items() if k != "result"}],
                   "mean_calib_rel_error": sum(errs) / len(errs) if errs else None}
    return out


def store_calibration(store: Path) -> dict:
    from coala_stream.store import open_store

    s = open_store(store)
    try:
        return dict(s.attrs.get("calibration") or {})
    finally:
        s.close()


def reused_store_commands(store: Path) -> list[dict]:
    """The capture/reduce rows of a store made by another bench (its work dir's results.jsonl)."""
    rows = []
    log = store.parent / "results.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row.get("key", "").startswith(("capture-", "reduce-")) and \
                    f"{store.name} " in row.get("command", "") + " ":
                rows.append({k: v for k, v in row.items() if k != "result"})
    if not rows:
        rows.append({"command": f"(store {store} reused; the commands that made it are not recorded "
                               f"beside it)", "seconds": None, "peak_rss_mib": None})
    return rows


def variant_cache(args, variant: dict, model_dir: Path) -> Path:
    """Where one variant's finished result is kept: keyed by every setting that shapes it, so a
    rerun (or a run of other --variants) reuses it and a changed setting retrains."""
    import hashlib

    key = {"model": str(model_dir.resolve()), "init": variant["init"], "mu": variant["mu"],
           **{k: getattr(args, k) for k in ("rank", "steps", "batch", "seq_len", "lr", "eval_every",
                                            "eval_windows", "train_windows", "seed", "smooth")}}
    if variant["init"] == "coala":
        key.update(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                   store=str(args.store.resolve()) if args.store else None)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = variant["label"].replace(" ", "").replace("(", "-").replace(")", "").replace("=", "")
    return args.work / "variants" / f"{name}-{digest}.json"


# -- report ---------------------------------------------------------------------------


def table(results: list[dict], meta: dict) -> str:
    made_by = sorted({r.get("command", meta["command"]) for r in results})
    head = ([f"command: `{made_by[0]}`"] if len(made_by) == 1 else
            ["commands:"] + [f"- {r['label']}: `{r.get('command', meta['command'])}`" for r in results])
    lines = [*head, "",
             f"machine: {meta['machine']}; {meta['model']}; rank {meta['rank']} on "
             f"{', '.join(TARGETS)}; {meta['steps']} steps x {meta['batch']} windows x "
             f"{meta['seq_len']} tokens, lr {meta['lr']:g}; train: {meta['train']}; held-out: "
             f"{meta['heldout']}; COALA calibration: {meta['calib_samples']} x {meta['calib_seq_len']} "
             f"tokens of builtin", "",
             f"original model held-out loss {meta['original_loss']:.4f} (ppl "
             f"{math.exp(meta['original_loss']):.2f})", "",
             "| variant | mu | step-0 loss | final loss | final ppl | best ppl (step) | train loss (last "
             f"{meta['smooth']}) | trainable | max init weight err | init s | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        h = r["heldout"]
        best = min(h, key=lambda e: e[1])
        lines.append(
            f"| {r['label']} | {'-' if r['mu'] is None else format(r['mu'], 'g')} | {h[0][1]:.4f} | "
            f"{h[-1][1]:.4f} | {math.exp(h[-1][1]):.2f} | {math.exp(best[1]):.2f} ({best[0]}) | "
            f"{r['train_smoothed'][-1]:.4f} | {r['check']['trainable_params']:,} | "
            f"{r['check']['max_rel_weight_error']:.1e} | {r['init_seconds']:.1f} | {r['train_seconds']:.1f} |")
    cmds = [c for r in results for c in r.get("commands", [])]
    seen = set()
    if cmds:
        lines += ["", "coala-stream commands (wall s, peak RSS MiB):", ""]
        for c in cmds:
            if c["command"] not in seen:
                seen.add(c["command"])
                lines.append(f"- `{c['command']}` ({c['seconds']} s, {c['peak_rss_mib']} MiB)")
    return "\n".join(lines)


def plot(results: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        color = f"C{i}"
        ax.plot(range(1, len(r["train_smoothed"]) + 1), r["train_smoothed"], color=color, alpha=0.25,
                linewidth=1)
        steps, losses = zip(*r["heldout"])
        ax.plot(steps, losses, color=color, marker="o", markersize=3, linewidth=1.8,
                label=f"{r['label']} (final ppl {math.exp(losses[-1]):.2f})")
    ax.axhline(meta["original_loss"], color="gray", linestyle=":", linewidth=1, label="original model")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    regime = "low data" if meta["lowdata"] else "normal"
    ax.set_title(f"LoRA r={meta['rank']} fine-tuning, {regime}: held-out (solid), train smoothed (faint)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.work, args.threads, dry_run=False)
    model_dir = args.model if args.model is not None else stage_model(args.work, runner)
    command = " ".join(shlex.quote(a) for a in ["python", "tools/bench_finetune.py",
                                                 *(sys.argv[1:] if argv is None else argv)])

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows, train_source, _ = token_windows(tokenizer, "builtin", args.seq_len)
    _, heldout_source, eval_ids = token_windows(tokenizer, "builtin:heldout", args.seq_len)
    if eval_ids.numel() // args.seq_len < args.eval_windows:
        raise SystemExit(f"builtin:heldout holds only {eval_ids.numel() // args.seq_len} windows")
    plan, pool = batch_plan(len(windows), args.steps, args.batch, args.seed, args.train_windows)
    train_desc = (f"{len(pool)} windows of builtin (cycled)" if args.train_windows else
                  f"builtin, {len(windows)} windows, {args.steps * args.batch / len(windows):.2f} epochs")

    variants = []
    for v in args.variants:
        if v in ("lora", "pissa"):
            variants.append({"label": v, "init": v, "mu": None})
        elif v == "coala":
            variants.append({"label": "coala (mu=0)", "init": "coala", "mu": 0.0})
        else:
            variants += [{"label": f"coala (mu={mu:g})", "init": "coala", "mu": mu} for mu in args.mu]
    mus = [v["mu"] for v in variants if v["init"] == "coala"]
    if args.store is not None:
        cal = store_calibration(args.store)
        args.calib_samples, args.calib_seq_len = cal.get("samples"), cal.get("seq_len")
        print(f"reusing store {args.store}: {cal}", flush=True)
    if mus:
        solves = coala_solves(runner, args, model_dir, mus)
        for v in variants:
            if v["init"] == "coala":
                s = solves[v["mu"]]
                v.update(solve_dir=s["dir"], commands=s["commands"],
                         mean_calib_rel_error=s["mean_calib_rel_error"])

    t0 = time.perf_counter()
    original = load_hf(model_dir)
    original_loss = heldout_loss(original, eval_ids, args)
    del original
    print(f"original model: held-out loss {original_loss:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    results = []
    for v in variants:
        cache = variant_cache(args, v, model_dir)
        if cache.exists() and not args.fresh:
            results.append(json.loads(cache.read_text()))
            print(f"[{time.strftime('%H:%M:%S')}] {v['label']}: cached in {cache} (made by "
                  f"{results[-1]['command']}; --fresh retrains)", flush=True)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {v['label']}", flush=True)
        model, init_s = build_variant(v, args, model_dir)
        check = init_check(model, model_dir)
        print(f"  init {init_s:.1f} s: {check}", flush=True)
        run = train(model, windows, plan, eval_ids, args, v["label"])
        step0 = run["heldout"][0][1]
        if v["init"] != "lora" and abs(step0 - original_loss) > 1e-3 * max(1.0, abs(original_loss)):
            print(f"  WARNING: {v['label']} starts at held-out loss {step0:.5f}, not the original "
                  f"model's {original_loss:.5f}", file=sys.stderr, flush=True)
        results.append({"label": v["label"], "init": v["init"], "mu": v["mu"], "init_seconds": round(init_s, 1),
                        "check": check, "step0_minus_original": step0 - original_loss,
                        "solve_dir": str(v.get("solve_dir", "")) or None,
                        "mean_calib_rel_error": v.get("mean_calib_rel_error"),
                        "commands": v.get("commands", []), "command": command,
                        "load_average_end": round(os.getloadavg()[0], 1), **run})
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(results[-1], default=str) + "\n")
        del model

    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                            f"torch threads {torch.get_num_threads()}, load average "
                                            f"{os.getloadavg()[0]:.1f}",
            "model": str(model_dir), "rank": args.rank, "steps": args.steps, "batch": args.batch,
            "seq_len": args.seq_len, "lr": args.lr, "lowdata": args.lowdata, "seed": args.seed,
            "train": train_desc, "train_source": train_source,
            "heldout": f"first {args.eval_windows} windows of builtin:heldout", "heldout_source": heldout_source,
            "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
            "calib_source": (store_calibration(args.store).get("source", "?") if args.store else "builtin"),
            "store": str(args.store) if args.store else None,
            "smooth": args.smooth, "eval_every": args.eval_every, "original_loss": original_loss,
            "train_windows": pool if args.train_windows else None}
    text = table(results, meta)
    print(text)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results, "plot": str(args.plot)},
                                    indent=1, default=str) + "\n")
    plot(results, meta, args.plot)
    print(f"\nwrote {args.plot}, {args.json}, {args.markdown}")


if __name__ == "__main__":
    main()
