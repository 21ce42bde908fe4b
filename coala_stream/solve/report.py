"""What solve reports: one row per layer, the totals, the table printed to the terminal."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .._version import __version__
from .layer import Layer, normalised_tail

if TYPE_CHECKING:
    from .config import SolveConfig


def layer_row(layer: Layer, res: dict, cond, peft: bool) -> dict:
    S = res["spectrum"]
    row = {"module": layer.name, "input": layer.input, "shape": [layer.m, layer.n],
           "rank": layer.rank, "params_before": layer.m * layer.n,
           "params_after": layer.rank * layer.cost, "kept_dense": False,
           "rel_error": res["rel_error"],
           "optimal_rel_error": math.sqrt(normalised_tail(S, layer.rank)) if S is not None else None,
           "cond_R": cond[0], "cond_method": cond[1], "mu": res["mu"], "note": res["note"]}
    if "gram_source" in res:
        row["gram_source"] = res["gram_source"]
    if peft:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "params_after = adapter parameters"
    return row


def dense_row(layer: Layer) -> dict:
    return {"module": layer.name, "input": layer.input, "shape": [layer.m, layer.n],
            "rank": layer.rank, "params_before": layer.m * layer.n,
            "params_after": layer.m * layer.n, "kept_dense": True, "rel_error": 0.0,
            "optimal_rel_error": None, "cond_R": None, "cond_method": None, "mu": 0.0,
            "note": f"kept dense: rank {layer.rank} x ({layer.m} + {layer.n}) >= {layer.m} x "
                    f"{layer.n} parameters"}


def build_report(store, spec, config, layers, rows, allocation, notes, seconds) -> dict:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    return {
        "tool_version": __version__,
        "store": str(store.path),
        "model": spec.describe(),
        "settings": {k: v for k, v in asdict(config).items()},
        "allocation": allocation,
        "totals": {"layers": len(rows), "kept_dense": sum(r["kept_dense"] for r in rows),
                   "params_before": before, "params_after": after,
                   "removed_fraction": 1 - after / before if before else 0.0,
                   "total_normalised_error": sum(r["rel_error"] ** 2 for r in rows)},
        "notes": notes,
        "seconds": round(seconds, 3),
        "layers": [jsonable(r) for r in rows],
    }


def config_section(store, spec, config, allocation) -> dict:
    """What config.json's ``coala_stream`` section records besides the format and ranks."""
    return {"method": config.method, "ratio": config.ratio, "rank": config.rank,
            "rank_multiple": config.rank_multiple, "allocate": allocation["allocate"], "mu": config.mu, "adaptive_mu": config.adaptive_mu,
            "layers": config.layers, "source_model": spec.describe(),
            "store": {"path": str(Path(store.path).absolute()), "uuid": store.attrs.get("uuid"),
                      "calibration": store.attrs.get("calibration")}}


def jsonable(row: dict) -> dict:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def format_table(report: dict) -> str:
    """The per-layer report as a fixed-width table with a totals line."""
    width = max([len("module")] + [len(r["module"]) for r in report["layers"]])
    head = (f"{'module':<{width}}  {'shape':>11}  {'rank':>5}  {'params':>21}  {'rel.err':>8}  "
            f"{'cond(R)':>8}  {'mu':>8}")
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        params = f"{r['params_before']:,} -> {r['params_after']:,}"
        cond = r["cond_R"]
        cond = "-" if cond is None else (cond if isinstance(cond, str) else f"{cond:.2e}")
        rank = "dense" if r["kept_dense"] else str(r["rank"])
        lines.append(f"{r['module']:<{width}}  {shape:>11}  {rank:>5}  {params:>21}  "
                     f"{r['rel_error']:>8.4f}  {cond:>8}  {r['mu']:>8.2g}")
    t, a = report["totals"], report["allocation"]
    lines.append(f"total: {t['params_before']:,} -> {t['params_after']:,} parameters in "
                 f"{t['layers']} layers ({100 * t['removed_fraction']:.1f}% removed"
                 f"{', ' + str(t['kept_dense']) + ' kept dense' if t['kept_dense'] else ''}); "
                 f"allocation {a['allocate']}; summed squared relative error "
                 f"{t['total_normalised_error']:.4f}")
    if a.get("requested") == "global":
        lines.append(f"global allocation: normalised error {a['global_total_normalised_error']:.4f} "
                     f"vs uniform {a['uniform_total_normalised_error']:.4f} -> kept {a['allocate']}")
    if a.get("allocate") == "loss" and "selection" in a:  # not the applied factors' summary
        lines.append(f"loss allocation ({a['selection']}, terms: {a['loss_terms']}, "
                     f"{a['windows']} windows): predicted loss change {a['predicted_loss_change']:+.4f} "
                     f"vs uniform {a['uniform_predicted_loss_change']:+.4f}; scores in "
                     f"{a['scores_file']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def propagate_notes(store, config: SolveConfig) -> list[str]:
    """A store captured with --propagate was fitted to one compression; say when this differs."""
    applied = (store.attrs.get("capture_settings") or {}).get("propagate")
    if not applied:
        return []
    wanted = {"method": config.method, "ratio": config.ratio, "rank": config.rank,
              "mu": float(config.mu or 0)}
    if "objective" in applied:  # stores of older versions record only the four above
        wanted.update(objective=config.objective, alpha=config.alpha)
    differ = [f"{k} {applied.get(k)} -> {v}" for k, v in wanted.items() if applied.get(k) != v]
    if applied.get("rank_multiple", 1) != config.rank_multiple:  # recorded only when > 1
        differ.append(f"rank_multiple {applied.get('rank_multiple', 1)} -> {config.rank_multiple}")
    # ranks given to the capture (--ranks) come from a global or a loss allocation
    capture_allocation = "global" if applied.get("ranks") else "uniform"
    if (config.allocate != "uniform") != bool(applied.get("ranks")) or config.layers is not None:
        differ.append(f"allocation/--layers other than the capture's {capture_allocation}, "
                      f"all-layer compression")
    if not differ:
        return []
    shown = {k: v for k, v in applied.items() if k != "ranks"}
    return [f"the store was captured with --propagate for {shown}, so later blocks' activations "
            f"assume that compression; this solve differs ({'; '.join(differ)}), so its layers "
            f"are fitted to inputs they will not see exactly"
            + ("; the capture's block refinement is not reproduced" if applied.get("refine_steps")
               else "")]
