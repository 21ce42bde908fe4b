"""Capture: run a model over calibration windows and store every distinct linear-layer input.

- `config`: `CaptureConfig` and its resolution (chunk size, batch size, backend, writers);
- `probe`: which linears are hooked and which read the same tensor;
- `writer`: chunk buffers and the writer threads (compress, write, commit);
- `settings`: what a store was made from, resume decisions, the capture lock;
- `run`: `run_capture`, the whole-model run.

Capture depends on the store and on models only; the block-by-block capture
(`coala_stream.sequential`) builds on these public pieces.
"""

from .config import DEFAULT_CHUNK_TOKENS, CaptureConfig
from .probe import (InputGroup, StopForward, forward, linear_input, linear_targets, probe_groups,
                    probe_run)
from .run import (Plan, committed_crcs, complete_without_lock, open_or_create_store,
                  plan_capture, run_capture, summary_of)
from .settings import (HARD_SETTINGS, capture_lock, capture_state, capture_threads,
                       existing_store, lock_path, prepare_inputs, settings_diff, store_attrs)
from .writer import ChunkBuffer, ChunkWriter, assign_writers

__all__ = ["DEFAULT_CHUNK_TOKENS", "CaptureConfig", "InputGroup", "StopForward", "forward",
           "linear_input", "linear_targets", "probe_groups", "probe_run", "Plan", "committed_crcs",
           "complete_without_lock", "open_or_create_store", "plan_capture", "run_capture",
           "summary_of", "HARD_SETTINGS", "capture_lock", "capture_state", "capture_threads",
           "existing_store", "lock_path", "prepare_inputs", "settings_diff", "store_attrs",
           "ChunkBuffer", "ChunkWriter", "assign_writers"]
