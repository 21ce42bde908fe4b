"""The CLI as a batch job meets it (issue 16): stderr is a pipe, the node gives one CPU.

One pipeline (capture -> reduce -> solve --format factorized -> eval) runs in subprocesses
with ``SLURM_CPUS_PER_TASK=1`` under umask 022, and the tests read what it left: plain
progress lines on stderr, closing summaries naming the next command, the thread rule
applied (torch's own default would be every core of this machine), an output that plain
transformers loads with ``trust_remote_code=True`` and refuses without, and files that
colleagues can read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-c", "import sys; from coala_stream.cli import main; sys.exit(main())"]
SAMPLES, SEQ_LEN = 4, 32


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # every progress step prints (the default is one line per 30 s); one CPU for the job
    env.update(COALA_STREAM_PROGRESS_SECONDS="0", SLURM_CPUS_PER_TASK="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([*CLI, *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    from coala_stream.calib import builtin_text

    tmp = tmp_path_factory.mktemp("cli-logs")
    text = tmp / "calib.txt"
    text.write_text(builtin_text()[:20_000])
    store, out = tmp / "calib.zarr", tmp / "smol"
    umask = os.umask(0o022)  # the usual one; the subprocesses inherit it
    try:
        runs = {
            "capture": _cli("capture", str(tiny_model_dir("float32")), "--out", str(store),
                            "--data", str(text), "--samples", str(SAMPLES), "--seq-len",
                            str(SEQ_LEN), "--device", "cpu"),
            "reduce": _cli("reduce", str(store), "--device", "cpu", "--checkpoint-every", "0"),
            "solve": _cli("solve", str(store), "--ratio", "0.3", "--format", "factorized",
                          "--out", str(out)),
            "eval": _cli("eval", str(out), "--data", str(text), "--seq-len", str(SEQ_LEN),
                         "--max-windows", "3"),
        }
    finally:
        os.umask(umask)
    return {"runs": runs, "store": store, "out": out}


@pytest.mark.parametrize("command, prefix", [
    ("capture", "capture: "), ("reduce", "reduce "), ("solve", "solve: "), ("eval", "eval: "),
])
def test_every_long_command_logs_plain_progress_lines(pipeline, command, prefix):
    err = pipeline["runs"][command].stderr
    assert "\r" not in err  # no terminal bar redrawn into the log
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert lines, f"no progress line of {command} in its log:\n{err}"
    assert all("/s" in line for line in lines)  # a rate in every line
    assert any("ETA " in line for line in lines) or any(", in 0:" in line for line in lines)
    assert "(100%)" in lines[-1] and ", in 0:" in lines[-1]  # the closing line


def test_each_summary_says_what_was_written_and_what_to_run_next(pipeline):
    runs, store, out = pipeline["runs"], pipeline["store"], pipeline["out"]
    capture, reduce, solve = (runs[c].stdout for c in ("capture", "reduce", "solve"))
    assert f"{store}: " in capture and f"next: coala-stream reduce {store}" in capture
    assert str(store / "reduce") in reduce and f"next: coala-stream solve {store}" in reduce
    assert f"wrote {out} (factorized" in solve and f"next: coala-stream eval {out}" in solve
    assert "trust_remote_code=True" in solve  # how it loads outside coala-stream
    assert runs["eval"].stdout.startswith("ppl ")


def test_the_thread_rule_sets_torch_threads_in_every_command(pipeline):
    from coala_stream.checkpoint import load_meta
    from coala_stream.store import open_store

    runs = pipeline["runs"]
    for command in ("capture", "reduce", "solve"):
        out = runs[command].stdout
        assert "threads: 1 (affinity " in out and "SLURM_CPUS_PER_TASK 1" in out, \
            f"{command} did not report the thread rule:\n{out}"
    assert runs["eval"].stdout.strip().endswith(", 1 torch thread)")  # eval prints one line
    # what the work really ran on, as recorded by the stages themselves
    with open_store(pipeline["store"]) as store:
        assert store.attrs["capture_settings"]["cpu_threads"] == 1
        metas = [load_meta(p) for p in sorted(store.reduce_dir.glob("*.safetensors"))]
    assert metas and all(m["threads"] == 1 for m in metas)


def test_factorized_output_loads_in_transformers_as_in_coala_stream(pipeline, tmp_path,
                                                                   monkeypatch):
    import transformers.dynamic_module_utils as dmu
    from transformers import AutoModelForCausalLM

    from coala_stream import load_output

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # init_hf_modules appends the cache
    monkeypatch.setattr(dmu, "TIME_OUT_REMOTE_CODE", 0)  # never prompt "[y/N]"
    out = pipeline["out"]
    ids = torch.tensor([[1, 17, 42, 250, 3, 99, 7, 8]])
    ours = load_output(out).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert any(type(m).__name__ == "LowRankLinear" for m in theirs.modules())
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)  # refused, not loaded with random weights


def test_output_and_store_files_are_readable_under_umask_022(pipeline):
    store, out = pipeline["store"], pipeline["out"]
    files = [p for root in (out, store) for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "solve_report.json"} <= names
    assert any(p.parent.name == "reduce" and p.suffix == ".safetensors" for p in files)
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in files}
    assert {m for m in modes.values()} == {"0o644"}, {p: m for p, m in modes.items() if m != "0o644"}
    report = json.loads((out / "solve_report.json").read_text())
    assert report["layers"]  # the output is the solved model, not an empty shell
