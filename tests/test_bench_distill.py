"""tools/bench_distill.py (end-to-end distillation of a factorized output, a benchmark):
its loss is KL(teacher || student) per token, and its steps lower it on the calibration."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from .test_capture import text_file  # noqa: F401
from .test_solve import make_store, solve
from .tools import TOOLS, load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOOL = TOOLS / "bench_distill.py"


def _tool():
    return load_tool("bench_distill")


def test_loss_is_the_mean_kl_per_token_against_float64():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), 3 * torch.randn(2, 5, 11, generator=g)
    p = t.double().softmax(-1)
    want = (p * (p.log() - s.double().log_softmax(-1))).sum(-1).mean()
    got = _tool().kl_to_teacher(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert float(_tool().kl_to_teacher(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_steps_lower_the_kl_and_print_one_row_per_evaluation(tiny_model_dir, text_file, tmp_path,
                                                           monkeypatch, capsys):
    model = tiny_model_dir(tie_word_embeddings=True)
    store = make_store(model, tmp_path / "calib.zarr")  # 4 x 64 tokens of builtin, seed 0
    solve(store, tmp_path / "out", ratio=0.5)
    argv = [str(TOOL), str(tmp_path / "out"), "--teacher", str(model), "--data", "builtin",
            "--samples", "4", "--seq-len", "64", "--batch", "4", "--lr", "1e-3",
            "--eval-data", str(text_file), "--max-windows", "2", "--threads", "1"]
    kls = []
    for steps in (1, 6):
        monkeypatch.setattr(sys, "argv", argv + ["--steps", str(steps), "--eval-every", str(steps)])
        _tool().main()
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert rows[0]["trainable"] > 0 and [r["step"] for r in rows[1:]] == [0, steps]
        assert all(r["ppl"] > 1 for r in rows[1:])
        kls.append(rows[-1]["train_kl"])
    # one batch, so every step sees the same windows: the loss at step 6 is below step 1's
    assert 0 < kls[1] < kls[0]
