"""Block-by-block capture and propagation: an orchestrator above capture, reduce and solve.

- `config`: `SequentialConfig` (a `CaptureConfig` plus --sequential, --propagate, ...);
- `blocks`: the model as embeddings + decoder blocks loaded one at a time;
- `workdir`: hidden states between blocks, the progress record, pending chunks;
- `context`: `SequentialRun`, what every block of one run shares;
- `infold`: an input's rows folded in memory as they are made (--drop-activations);
- `passes`: one pass of all samples through a block (capture and/or propagate);
- `propagate`: compress a block group by group (--propagate);
- `refine`: a few Adam steps on a compressed block's factors (--refine-steps);
- `run`: `run_sequential`, and `run`, which is what `coala-stream capture` calls.
"""

from ..blocks import BlockModel, check_supported
from .config import SequentialConfig
from .context import SequentialRun
from .passes import capture_block, finish
from .propagate import (BlockRun, BlockWeights, capture_group, propagate_block, reduce_inputs,
                        reduced_input, run_pass, solve_group)
from .run import run, run_sequential
from .workdir import WorkDir, default_hidden_dir

__all__ = ["BlockModel", "check_supported", "SequentialConfig", "SequentialRun", "capture_block", "finish",
           "BlockRun", "BlockWeights", "capture_group", "propagate_block", "run_pass",
           "solve_group", "reduce_inputs", "reduced_input", "run", "run_sequential", "WorkDir",
           "default_hidden_dir"]
