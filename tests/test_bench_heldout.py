"""tools/bench_heldout.py (a benchmark's validation set): its windows never touch the
calibration draw and take every whole window each gap between drawn windows holds."""

from __future__ import annotations

import torch

from coala_stream import calib

from .tools import load_tool


def test_heldout_windows_avoid_the_draw_and_fill_each_gap():
    tool = load_tool("bench_heldout")
    for seed in range(20):
        total = 5000 + 97 * seed
        drawn = calib.window_starts(total, 6, 300, seed)
        for length in (1, 64, 300, 1000):
            got = tool.heldout_windows(total, drawn, 300, length)
            used = torch.zeros(total, dtype=torch.bool)
            for s in drawn:
                used[s:s + 300] = True
            assert got == sorted(got)
            for s in got:
                assert s + length <= total and not used[s:s + length].any()
                used[s:s + length] = True  # also: no two held-out windows overlap
            edges = sorted(drawn) + [total]
            gaps = [edges[0]] + [b - (a + 300) for a, b in zip(edges, edges[1:])]
            assert len(got) == sum(g // length for g in gaps), (seed, length)
