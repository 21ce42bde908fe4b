"""`SequentialRun`: what every block of one block-by-block capture shares.

The blocks' loop (`run`), a plain block's pass (`passes.capture_block`) and a propagated
block (`propagate.propagate_block`) read the same model, store, work directory, progress
record, plan and settings; they travel as this one object, and a propagated block's
`propagate.BlockRun` extends it with what belongs to that block alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..blocks import BlockModel
from ..capture import Plan
from .config import SequentialConfig
from .workdir import WorkDir


@dataclass
class SequentialRun:
    """``rec`` is the progress record (`save` writes it), ``timing`` the propagation's
    per-step seconds, ``bar`` the progress bar the passes advance."""

    bm: BlockModel
    store: object
    work: WorkDir
    rec: dict
    plan: Plan
    config: SequentialConfig
    say: Callable[[str], None]
    timing: dict
    bar: object

    def save(self) -> None:
        self.work.write_progress(self.rec)
