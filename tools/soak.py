"""Soak: kill the pipeline's stages at random moments, resume them, compare bits (issue 22).

Not a test: a tool that runs for minutes and prints a table (docs/benchmarks.md, "Soak
(issue 22)"). On a tiny random Llama saved with ``save_pretrained`` (as tests/conftest.py
builds one), each trial of a stage

1. starts the stage's CLI command with DEFAULT settings (no ``--threads``, no
   ``OMP_NUM_THREADS``), waits a uniform random time (capture and HDF5 capture: after
   the store exists; reduce: after it took its lock; compress: from the start) and sends
   SIGKILL, SIGTERM or SIGINT (uniformly chosen);
2. reruns the same command to the end;
3. compares the result bit for bit with an uninterrupted run: the store's committed
   chunks (capture), the R and abs_sum tensors (reduce), ``model.safetensors`` (compress).

A default thread count follows the load, so the uninterrupted reference is the one of
the count the trial's first run recorded in its state (reduce/run.json, the store's
``capture_settings``, compress.json): made once per count, by the same default command
with ``OMP_NUM_THREADS`` set to that count (which the rule takes as the budget).

Counted per stage: trials, kills landed (the process was still running when the signal
was sent), resumed (the rerun exited 0), bit-identical, tracebacks (any "Traceback" or
asyncio "Task was destroyed" in either run's stderr, or an exit code other than the
signal's: -9, 75/143 for SIGTERM, 75/130 for SIGINT), data lost (a store or result that
no longer opens after the kill, or a rerun that cannot finish from what was kept).

Fault injection (root only, a small tmpfs): HDF5 and zarr capture onto a full disk,
reduce onto a full disk, then the space freed and the same command rerun; plus a
truncated input zarr.json, binary garbage in the reduce lock and a truncated
applied-factors file in a compress work directory. Each must end in one line, exit 1,
and (where it resumes) give the reference bits.

    python tools/soak.py --trials 20 --minutes 25 --work /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "coala_stream"]
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
OK_CODES = {signal.SIGKILL: {-9}, signal.SIGTERM: {75, 143}, signal.SIGINT: {75, 130}}
CAPTURE = ["--samples", "32", "--seq-len", "128", "--chunk-tokens", "512"]
COMPRESS = ["--samples", "8", "--seq-len", "64", "--refine-steps", "5", "--keep-work"]


def build_model(out: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) and a byte-level BPE tokenizer, offline."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from coala_stream.calib import builtin_text

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([builtin_text()[:60_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, vocab_size=len(fast))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def run(argv: list[str], env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    p = subprocess.run(CLI + argv, env={**base_env(), **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stderr


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # default settings
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def noisy(err: str) -> bool:
    return "Traceback" in err or "Task was destroyed" in err


# -- what a stage leaves, and its thread count ----------------------------------------------------


def store_bits(path: Path) -> dict:
    """{input: (committed tokens, [chunk bytes])} of a finished store; raises if unreadable."""
    import torch

    from coala_stream.store import open_store

    with open_store(path) as s:
        out = {"complete": bool(s.attrs["capture"]["complete"])}
        for name in s.inputs:
            info = s.input(name)
            out[name] = (info.tokens, [s.read_chunk(name, i).contiguous().view(torch.uint8)
                                       .numpy().tobytes() for i in range(info.num_chunks)])
    return out


def reduce_bits(path: Path) -> dict:
    from coala_stream.checkpoint import load_state

    out = {}
    for f in sorted((path / "reduce").glob("*.safetensors")):
        t, meta = load_state(f)
        out[f.name] = (meta.get("complete"), t["R"].numpy().tobytes(),
                       t["abs_sum"].numpy().tobytes())
    return out


def capture_threads(path: Path) -> int | None:
    from coala_stream.store import open_store

    try:
        with open_store(path) as s:
            return (s.attrs.get("capture_settings") or {}).get("cpu_threads")
    except Exception:  # noqa: BLE001 - no store yet: no count recorded
        return None


def json_threads(path: Path) -> int | None:
    try:
        return json.loads(path.read_text()).get("threads")
    except (OSError, ValueError):
        return None


# -- the stages -------------------------------------------------------------------------------------


class Stage:
    """One stage's command, where its state lives, and what counts as its result."""

    def __init__(self, name: str, work: Path, model: Path):
        self.name, self.work, self.model = name, work, model
        self.refs: dict[int | None, object] = {}
        self.plain_store = work / "plain.zarr"  # reduce's input: a finished capture

    def out(self, trial: str) -> Path:
        suffix = {"capture": ".zarr", "hdf5": ".h5", "reduce": ".zarr", "compress": ""}[self.name]
        return self.work / self.name / f"{trial}{suffix}"

    def prepare(self, out: Path) -> None:
        shutil.rmtree(out, ignore_errors=True)
        for p in (out.with_name(out.name + ".work"), out.with_name(out.name + ".reduce")):
            shutil.rmtree(p, ignore_errors=True)
        if out.is_file():
            out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.name == "reduce":
            shutil.copytree(self.plain_store, out, ignore=shutil.ignore_patterns("reduce"))

    def argv(self, out: Path) -> list[str]:
        if self.name in ("capture", "hdf5"):
            backend = ["--backend", "hdf5"] if self.name == "hdf5" else []
            return ["capture", str(self.model), "--out", str(out), *CAPTURE, *backend]
        if self.name == "reduce":
            return ["reduce", str(out)]
        return ["compress", str(self.model), "--out", str(out), *COMPRESS]

    def started(self, out: Path) -> bool:
        """Whether the moment the kill window opens has come."""
        if self.name in ("capture", "hdf5"):
            return out.exists()
        if self.name == "reduce":
            return (out / "reduce" / "lock").exists()
        return True

    def threads(self, out: Path) -> int | None:
        if self.name in ("capture", "hdf5"):
            return capture_threads(out)
        if self.name == "reduce":
            return json_threads(out / "reduce" / "run.json")
        return json_threads(out.with_name(out.name + ".work") / "compress.json")

    def bits(self, out: Path):
        if self.name in ("capture", "hdf5"):
            return store_bits(out)
        if self.name == "reduce":
            return reduce_bits(out)
        return (out / "model.safetensors").read_bytes()

    def readable(self, out: Path) -> bool:
        """After a kill: whatever the stage had written still opens (no data lost)."""
        try:
            if self.name in ("capture", "hdf5") and out.exists():
                store_bits(out)
            elif self.name == "reduce":
                reduce_bits(out)
            return True
        except Exception:  # noqa: BLE001 - unreadable: counted as lost
            return False

    def reference(self, threads: int | None):
        """Bits of an uninterrupted default run with ``threads`` (cached per count)."""
        if threads not in self.refs:
            out = self.out(f"ref-{threads}")
            self.prepare(out)
            env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
            rc, err = run(self.argv(out), env)
            if rc != 0:
                raise SystemExit(f"reference run of {self.name} failed ({rc}): {err[-2000:]}")
            self.refs[threads] = self.bits(out)
        return self.refs[threads]


def timed_reference(stage: Stage) -> tuple[float, float]:
    """(seconds until the kill window opens, its length) of one uninterrupted default run;
    its bits become the reference of the count it recorded."""
    out = stage.out("timing")
    stage.prepare(out)
    t0 = time.monotonic()
    proc = subprocess.Popen(CLI + stage.argv(out), env=base_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    opened = None
    while proc.poll() is None:
        if opened is None and stage.started(out):
            opened = time.monotonic() - t0
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{stage.name} failed uninterrupted ({proc.returncode}): {err[-2000:]}")
    total = time.monotonic() - t0
    opened = total if opened is None else opened
    stage.refs[stage.threads(out)] = stage.bits(out)
    return opened, max(0.2, total - opened)


def trial(stage: Stage, k: int, window: float, rng: random.Random) -> dict:
    out = stage.out(f"t{k}")
    stage.prepare(out)
    sig = rng.choice(SIGNALS)
    proc = subprocess.Popen(CLI + stage.argv(out), env=base_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and not stage.started(out):
        time.sleep(0.01)
    time.sleep(rng.uniform(0, window))
    landed = proc.poll() is None
    if landed:
        proc.send_signal(sig)
    err1 = proc.communicate(timeout=600)[1]
    rc1 = proc.returncode
    readable = stage.readable(out)
    rc2, err2 = run(stage.argv(out))
    threads = stage.threads(out)
    identical = rc2 == 0 and stage.bits(out) == stage.reference(threads)
    bad_code = landed and rc1 not in OK_CODES[sig] and rc1 != 0
    row = {"stage": stage.name, "trial": k, "signal": sig.name, "landed": landed, "rc": rc1,
           "resumed": rc2 == 0, "identical": identical, "threads": threads,
           "traceback": noisy(err1) or noisy(err2) or bad_code,
           "lost": not readable or rc2 != 0}
    if row["traceback"] or row["lost"]:
        row["stderr"] = (err1[-1500:], err2[-1500:])
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)
    return row


# -- fault injection (a small tmpfs: root only) ------------------------------------------------------


def _mount(d: Path, size: str) -> bool:
    d.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                          capture_output=True).returncode == 0


def _umount(d: Path) -> None:
    subprocess.run(["umount", str(d)], capture_output=True)


def one_line(err: str) -> bool:
    return not noisy(err) and sum(ln.startswith("coala-stream ") for ln in err.splitlines()) == 1


def faults(stages: dict[str, Stage], work: Path) -> list[dict]:
    rows = []
    if os.geteuid() != 0:
        return [{"fault": "full disk (tmpfs)", "result": "skipped: needs root to mount a tmpfs"}]
    d = work / "tmpfs"
    for name in ("hdf5", "capture"):
        st = stages[name]
        if not _mount(d, "6m"):
            return rows + [{"fault": "full disk", "result": "skipped: mount refused"}]
        try:
            out = d / ("c.h5" if name == "hdf5" else "c.zarr")
            rc, err = run(st.argv(out))
            subprocess.run(["mount", "-o", "remount,size=200m", str(d)], capture_output=True)
            rc2, err2 = run(st.argv(out))
            same = rc2 == 0 and st.bits(out) == st.reference(st.threads(out))
            rows.append({"fault": f"{name} capture, full disk (6 MB tmpfs)", "rc": rc,
                         "one_line": one_line(err), "resumed_identical": same,
                         "line": err.strip().splitlines()[-2:] if err.strip() else ""})
        finally:
            _umount(d)
    st = stages["reduce"]
    if _mount(d, "24m"):
        try:
            out = d / "s.zarr"
            shutil.copytree(st.plain_store, out, ignore=shutil.ignore_patterns("reduce"))
            free = shutil.disk_usage(d).free
            filler = d / "filler"
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - 20_000))
            rc, err = run(st.argv(out))
            filler.unlink()
            rc2, err2 = run(st.argv(out))
            same = rc2 == 0 and st.bits(out) == st.reference(st.threads(out))
            rows.append({"fault": "reduce, full disk (tmpfs, 20 kB left)", "rc": rc,
                         "one_line": one_line(err), "resumed_identical": same,
                         "line": err.strip().splitlines()[-2:] if err.strip() else ""})
        finally:
            _umount(d)
    rows += _damaged_files(stages, work)
    return rows


def _damaged_files(stages: dict[str, Stage], work: Path) -> list[dict]:
    rows = []
    st = stages["reduce"]
    out = work / "faults" / "s.zarr"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(st.plain_store, out, ignore=shutil.ignore_patterns("reduce"))
    meta = next((out / "inputs").iterdir()) / "zarr.json"
    good = meta.read_bytes()
    meta.write_bytes(good[:40])
    rc, err = run(["status", str(out)])
    rows.append({"fault": "truncated input zarr.json (status)", "rc": rc, "one_line": one_line(err)})
    rc, err = run(st.argv(out))
    rows.append({"fault": "truncated input zarr.json (reduce)", "rc": rc, "one_line": one_line(err)})
    meta.write_bytes(good)
    (out / "reduce").mkdir(exist_ok=True)
    (out / "reduce" / "lock").write_bytes(bytes(range(256)) * 4)
    rc, err = run(st.argv(out))
    rows.append({"fault": "binary garbage in a fresh reduce lock", "rc": rc,
                 "one_line": one_line(err)})
    cs = stages["compress"]
    ref = cs.out("timing")  # the uninterrupted run's, kept with its work directory
    applied = ref.with_name(ref.name + ".work") / "prop.zarr" / "applied" / "block-00000.safetensors"
    if applied.is_file():
        shutil.rmtree(ref)
        applied.write_bytes(applied.read_bytes()[:500])
        rc, err = run(cs.argv(ref))
        rows.append({"fault": "truncated applied block-00000 (compress rerun)", "rc": rc,
                     "one_line": one_line(err) and "--overwrite" in err})
    return rows


# -- the table ----------------------------------------------------------------------------------------


def table(rows: list[dict], stages: list[str]) -> str:
    head = "| stage | trials | kills landed | resumed | bit-identical | tracebacks | data lost |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name in stages:
        r = [x for x in rows if x["stage"] == name]
        lines.append(f"| {name} | {len(r)} | {sum(x['landed'] for x in r)} | "
                     f"{sum(x['resumed'] for x in r)} | {sum(x['identical'] for x in r)} | "
                     f"{sum(x['traceback'] for x in r)} | {sum(x['lost'] for x in r)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per stage")
    ap.add_argument("--minutes", type=float, default=25.0,
                    help="wall-time budget for the trials, shared equally by the stages")
    ap.add_argument("--stages", default="capture,reduce,compress,hdf5")
    ap.add_argument("--work", default="/tmp/coala-soak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-faults", action="store_true", help="skip the fault injection")
    ap.add_argument("--json", help="write every trial's row here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    model = build_model(work / "model")
    names = a.stages.split(",")
    stages = {n: Stage(n, work, model) for n in ("capture", "reduce", "compress", "hdf5")}
    plain = work / "plain.zarr"
    if not (plain / "zarr.json").is_file():  # reduce's input, captured once
        rc, err = run(["capture", str(model), "--out", str(plain), *CAPTURE])
        if rc:
            raise SystemExit(err)
    t_start, rows = time.monotonic(), []
    budget = a.minutes * 60 / len(names)
    for name in names:
        st, t0 = stages[name], time.monotonic()
        opened, window = timed_reference(st)
        print(f"{name}: kill window opens at {opened:.1f} s, lasts {window:.1f} s", flush=True)
        for k in range(a.trials):
            if time.monotonic() - t0 > budget:
                print(f"{name}: time budget spent after {k} trials", flush=True)
                break
            row = trial(st, k, window, rng)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
            if "stderr" in row:
                print("  stderr:", row["stderr"], flush=True)
    print(f"\ntrials took {(time.monotonic() - t_start) / 60:.1f} min\n")
    print(table(rows, names))
    fault_rows = [] if a.no_faults else faults(stages, work)
    for f in fault_rows:
        print(json.dumps(f))
    if a.json:
        Path(a.json).write_text(json.dumps({"trials": rows, "faults": fault_rows}, indent=1,
                                           default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
