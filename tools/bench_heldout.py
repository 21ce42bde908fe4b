"""Held-out validation perplexity (issue 23): choose between settings without the test windows.

The field table evaluates on the first windows of ``wiki.test.raw`` and calibrates on the
file from its line 1500 on (``WORK/wiki_calib.txt``), drawing ``--samples`` x ``--seq-len``
tokens at random, non-overlapping positions (`calib.calibration_windows`, the capture's own
draw, seed 0). The tokens of
that calibration text which the draw left out are a validation set disjoint from both the
calibration and the evaluated windows: this tool cuts them into non-overlapping windows of
``--eval-seq-len`` tokens, each inside one gap between drawn windows, and reports each
model's perplexity on the first ``--windows`` of them. A setting chosen by this figure is
not chosen by its score on the evaluated text.

    python tools/bench_heldout.py --calib runs/field/wiki_calib.txt --samples 32 --seq-len 512 \\
        --models runs/field/models/compress-0.6 runs/field/models/compress-loss-0.6 --threads 1

Results are cached in ``--results`` (one JSON line per model and protocol), so a stopped run
resumes and ``--report`` prints what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch

from coala_stream import calib
from coala_stream.evaluate import load_for_eval, nll_sum, normalise_newlines, token_ids


def heldout_windows(total: int, drawn: list[int], draw_len: int, length: int) -> list[int]:
    """Starts of non-overlapping windows of ``length`` tokens in ``[0, total)`` that overlap
    none of the drawn windows ``[s, s + draw_len)``, in text order, each inside one gap."""
    starts, pos = [], 0
    for s in sorted(drawn) + [total]:
        while pos + length <= s:
            starts.append(pos)
            pos += length
        pos = max(pos, s + draw_len)
    return starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=Path, required=True, help="the calibration text file")
    ap.add_argument("--samples", type=int, required=True, help="the draw's samples")
    ap.add_argument("--seq-len", type=int, required=True, help="the draw's tokens per sample")
    ap.add_argument("--seed", type=int, default=0, help="the draw's seed")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--models", nargs="*", type=Path, default=[])
    ap.add_argument("--store", type=Path, default=None,
                    help="a store captured with this draw: its tokens' sha256 is checked")
    ap.add_argument("--results", type=Path, default=Path("runs/heldout.jsonl"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print the cached results only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    protocol = {"calib": str(args.calib), "samples": args.samples, "seq_len": args.seq_len,
                "seed": args.seed, "eval_seq_len": args.eval_seq_len, "windows": args.windows}
    cache = {}
    if args.results.is_file():
        for line in args.results.read_text().splitlines():
            rec = json.loads(line)
            cache[(rec["model"], json.dumps(rec["protocol"], sort_keys=True))] = rec
    key = json.dumps(protocol, sort_keys=True)
    if not args.report:
        for path in args.models:
            if (str(path), key) in cache:
                continue
            rec = measure(path, args, protocol)
            cache[(str(path), key)] = rec
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"held-out: {args.windows} x {args.eval_seq_len} tokens of {args.calib} outside the "
          f"{args.samples} x {args.seq_len} draw (seed {args.seed})")
    print("| model | held-out ppl | CPU s | peak MiB |\n|---|---:|---:|---:|")
    for (model, k), rec in cache.items():
        if k == key:
            print(f"| {model} | {rec['ppl']:.2f} | {rec['cpu_seconds']:.0f} | "
                  f"{rec['peak_rss_mib']:.0f} |")


def measure(path: Path, args, protocol: dict) -> dict:
    t, c = time.perf_counter(), time.process_time()
    net, tok, desc, fmt = load_for_eval(str(path))
    net.eval()
    ids = token_ids(tok, normalise_newlines(args.calib.read_text(encoding="utf-8")))
    # the draw exactly as capture makes it (no BOS: SmolLM2's and Qwen2.5's tokenizers add none)
    if calib.bos_token(tok, "auto") is not None:
        raise SystemExit(f"{path}: its tokenizer adds a BOS; this tool takes BOS-less draws only")
    # the capture's own draw; the text's tokens here must be the ones it drew from
    cal = calib.calibration_windows(tok, str(args.calib), args.samples, args.seq_len, args.seed)
    drawn = cal.starts
    if not torch.equal(torch.stack([ids[s:s + args.seq_len] for s in drawn]), cal.ids):
        raise SystemExit(f"{path}: the text tokenized here differs from the capture's draw")
    if args.store is not None:  # the draw must be the store's, or the two sets may overlap
        from coala_stream.store import open_store

        with open_store(args.store) as st:
            want = (st.attrs.get("calibration") or {}).get("tokens_sha256")
        if cal.tokens_sha256 != want:
            raise SystemExit(f"{path}: this draw is not {args.store}'s (tokens sha256 "
                             f"{cal.tokens_sha256[:12]} vs {str(want)[:12]})")
    starts = heldout_windows(ids.numel(), drawn, args.seq_len, args.eval_seq_len)
    if len(starts) < args.windows:
        raise SystemExit(f"only {len(starts)} held-out windows of {args.eval_seq_len} tokens; "
                         f"ask for fewer --windows or a shorter --eval-seq-len")
    total = 0.0
    with torch.inference_mode():
        for s in starts[:args.windows]:
            window = ids[s:s + args.eval_seq_len].unsqueeze(0)
            total += nll_sum(net(input_ids=window).logits, window)
    predicted = args.windows * (args.eval_seq_len - 1)
    return {"model": str(path), "protocol": protocol, "format": fmt,
            "ppl": math.exp(total / predicted), "nll": total / predicted,
            "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "heldout_windows_available": len(starts)}


if __name__ == "__main__":
    main()
