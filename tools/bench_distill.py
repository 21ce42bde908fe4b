"""End-to-end distillation of a factorized solve output: a lever measured outside the tool.

Issue 17 asks whether anything beyond block refinement closes the gap to its relative
target. This script takes a ``solve --format factorized`` output (the student) and the
model it was made from (the teacher), and trains the student's factors A and B of every
low-rank linear (nothing else) so that its next-token distribution matches the teacher's
(KL(teacher || student), mean over tokens) on the calibration windows the capture used
(same text, samples, seq-len and seed: `coala_stream.calib.calibration_windows`), in
batches of ``--batch`` windows taken in order and cycled, with Adam at ``--lr``.
Every ``--eval-every`` steps it scores perplexity on the evaluation text with the
repository's protocol (`coala_stream.evaluate.perplexity`) and prints one JSON line
(``train_kl``: the KL of that step's batch before its update; ``seconds``: since the
first step, evaluations included).

It needs the whole model, its gradients and Adam's two moments of every factor in
memory at once (1.4 GB of float32 factor state for SmolLM2-135M, beside both models),
unlike the block-at-a-time capture.
Not a test; results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from coala_stream import calib, evaluate, export  # noqa: E402
from coala_stream.export.lowrank import LowRankLinear  # noqa: E402

WIKI = Path(__file__).resolve().parent.parent.parent / "shared/data/wikitext-2-raw/wiki.test.raw"


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    s = student_logits.float().log_softmax(-1).flatten(0, 1)
    t = teacher_logits.float().log_softmax(-1).flatten(0, 1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", help="a factorized solve output")
    ap.add_argument("--teacher", required=True, help="the original model (Hugging Face directory)")
    ap.add_argument("--data", required=True, help="the calibration text the capture used")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--eval-data", default=str(WIKI))
    ap.add_argument("--max-windows", type=int, default=30)
    ap.add_argument("--threads", type=int, required=True, help="torch threads (say it: the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if export.detect_format(args.student) != "factorized":
        sys.exit(f"{args.student}: not a factorized solve output")

    teacher, tokenizer, _, _ = evaluate.load_for_eval(args.teacher)
    student = export.load_output(args.student)
    for p in student.parameters():
        p.requires_grad_(False)
    factors = [p for m in student.modules() if isinstance(m, LowRankLinear)
               for p in (m.A.weight, m.B.weight)]
    for p in factors:
        p.requires_grad_(True)
    ids = calib.calibration_windows(tokenizer, args.data, args.samples, args.seq_len, args.seed).ids
    text = Path(args.eval_data).read_text(encoding="utf-8")

    def row(step: int, loss: float | None, seconds: float) -> None:
        with torch.no_grad():
            ppl = evaluate.perplexity(student, tokenizer, text, args.seq_len, args.max_windows)["ppl"]
        print(json.dumps({"step": step, "epochs": step * args.batch / args.samples,
                          "train_kl": loss, "ppl": round(ppl, 2), "seconds": round(seconds, 1)}),
              flush=True)

    print(json.dumps({"command": " ".join(sys.argv), "machine": f"{platform.machine()}, "
                      f"{torch.get_num_threads()} thread(s)", "trainable": sum(p.numel() for p in factors)}))
    t0 = time.perf_counter()
    row(0, None, 0.0)
    opt = torch.optim.Adam(factors, lr=args.lr)
    starts = list(range(0, args.samples, args.batch))
    for step in range(args.steps):
        x = ids[starts[step % len(starts)]:][:args.batch]
        with torch.no_grad():
            target = teacher(input_ids=x).logits
        loss = kl_to_teacher(student(input_ids=x).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row(step + 1, float(loss.detach()), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
