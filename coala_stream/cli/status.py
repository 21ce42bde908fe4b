"""`coala-stream status`: show what a store holds and how far capture and reduce got."""

from __future__ import annotations

import json

from ._common import add_parser

DESCRIPTION = """\
Show what an activation store holds and how far capture and reduce got.

Reads only attributes and the headers of reduce's files, never the activations,
so it is quick on any store, and safe on a Zarr store that capture is still
writing (an HDF5 store being written cannot be opened by another process).
"""

EPILOG = """\
examples:
  coala-stream status calib.zarr
  coala-stream status calib.h5 --json | python -m json.tool
"""


def register(subparsers) -> None:
    p = add_parser(subparsers, "status", "show what a store holds and how far capture and reduce got",
                   DESCRIPTION, EPILOG)
    p.add_argument("store", metavar="STORE", help="a Zarr store directory or an HDF5 store file")
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..status import store_status  # imported here: `--help` stays fast
    from ..store import open_store

    with open_store(args.store) as store:
        status = store_status(store)
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def render(s: dict) -> str:
    """The status dict as a human-readable report with one table row per input."""
    cap, tot = s["capture"], s["totals"]
    model = s.get("model") or {}
    calib = s.get("calibration") or {}
    lines = [
        f"store       {s['path']}  ({s['backend']}, format {s['format_version']}, "
        f"written by coala-stream {s['tool_version']})",
        f"model       {model.get('name_or_path') or model.get('path') or '?'}",
        f"calibration {calib.get('source', '?')}: {calib.get('samples', '?')} x "
        f"{calib.get('seq_len', '?')} tokens, seed {calib.get('seed', '?')}"
        f"{'' if calib.get('bos_token_id') is None else ', each window [BOS] + text'}",
        f"dtype       {s['dtype']}, chunks of {s['chunk_tokens']} tokens",
        f"capture     {_capture_line(cap)}{_shard(calib)}",
        *_merged(s.get("merged_from")),
        *_propagate(s.get("propagate")),
        f"reduce      {_reduce_summary(tot)}  ({s['reduce_dir']})",
        f"size        {tot['inputs']} inputs, {_mb(tot['raw_bytes'])} raw, {_mb(tot['stored_bytes'])} "
        f"on disk " + (f"({tot['dropped_chunks']} chunks dropped: folded into the reduce "
                       f"results, their rows not kept)" if tot.get("dropped_chunks")
                       else f"(ratio {tot['ratio'] or '-'})")
        + f"; reduce results {_mb(tot.get('reduce_bytes', 0))}"
        + (f", applied factors {_mb(tot['applied_bytes'])}" if tot.get("applied_bytes") else ""),
        "",
    ]
    rows = [("input", "read by", "n", "tokens", "chunks", "on disk", "reduce")]
    rows += [(i["name"], _consumers(i), _width(i),
              str(i["tokens"]), str(i["chunks"])
              + (f" ({i['dropped_chunks']} dropped)" if i.get("dropped_chunks") else ""),
              _mb(i["stored_bytes"]), _reduce_line(i["reduce"])) for i in s["inputs"]]
    return "\n".join(lines + _table(rows))


def _width(i: dict) -> str:
    """n; a pair's as features x 2, a narrow pair's as features + outputs."""
    if i.get("pair_outputs"):
        outputs = sum(i["pair_outputs"])
        return f"{i['n'] - outputs}+{outputs}"
    return f"{i['n'] // 2}x2" if i.get("pair") else str(i["n"])


def _capture_line(cap: dict) -> str:
    done, total = cap["samples_done"], cap.get("samples")
    if cap["complete"]:
        return f"complete ({done} samples)"
    total = total if total is not None else "?"
    if cap.get("state") == "running":
        return f"running ({cap['detail']}): {done} of {total} samples committed"
    return f"interrupted: {done} of {total} samples committed; {cap.get('detail', '')}"


def _shard(calib: dict) -> str:
    if not calib.get("shard"):
        return ""
    (i, n), (a, b) = calib["shard"], calib.get("sample_range") or ("?", "?")
    return f", part {i}/{n} (--shard): samples {a} to {b} of {calib.get('samples', '?')}"


def _merged(merged: list | None) -> list[str]:
    if not merged:
        return []
    return [f"merged      from {len(merged)} shards by coala-stream merge; holds their merged R's "
            f"and no activations (reduce has nothing to fold): "
            + ", ".join(m["path"] for m in merged)]


def _propagate(p: dict | None) -> list[str]:
    if not p:
        return []
    size = f"ranks {p['ranks']}" if p.get("ranks") else (
        f"ratio {p['ratio']}" if p.get("ratio") is not None else f"rank {p.get('rank')}")
    objective = p.get("objective", "input")
    alpha = f" alpha {p['alpha']}" if objective == "output" else ""
    refine = f", refined {p['refine_steps']} steps per block" if p.get("refine_steps") else ""
    return [f"propagate   {p.get('method')}, {size}, objective {objective}{alpha}, mu {p.get('mu')}"
            f"{refine}; factors of {p['applied_blocks']} blocks in {p['applied_dir']}"]


def _reduce_summary(totals: dict) -> str:
    counts = totals["reduce"]
    if not counts:
        return "no inputs"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _reduce_line(r: dict) -> str:
    if r["state"] in ("in progress", "behind"):
        return f"{r['state']} {r['next_chunk']} of {r['chunks']} chunks ({r['next']})"
    if r["state"] in ("mismatch", "unreadable"):
        return f"{r['state']} ({r['next']})"
    return r["state"]


def _consumers(i: dict) -> str:
    # q/k/v share one input: show the last name component of each consumer
    return ",".join(c.rsplit(".", 1)[-1] for c in i["consumers"])


def _mb(nbytes: int) -> str:
    """Decimal units, as `du --si` and disk vendors count."""
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {2, 3, 4, 5}  # numbers align right
    return ["  ".join(v.rjust(w) if c in right else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
