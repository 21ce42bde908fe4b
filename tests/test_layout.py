"""The architecture as a test: dependencies run one way, no import cycles, no private names.

Every import in the package is read from the source (function-level ones too) and checked
against the layers docs/design.md draws. A change that makes an earlier stage import a later
one, or one module reach into another's private names, fails here with the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "coala_stream"

# top-level unit -> layer; a unit may import only units of a lower layer (or itself)
LAYERS = {
    "_version": 0, "errors": 0, "files": 0, "signals": 0, "progress": 0, "devices": 0,
    "linalg": 1, "baselines": 1, "objective": 1, "scores": 1,
    "store": 2, "checkpoint": 2, "calib": 2, "calib_formats": 2, "models": 2,
    "weights": 3, "applied": 3,
    "reduce": 4, "capture": 4, "export": 4, "blocks": 4,
    "solve": 5,
    "sequential": 6, "status": 6, "evaluate": 6, "merge": 6,
    "compress": 7, "tasks": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield path, ".".join(rel.parts)


def _imports(path: Path, dotted: str):
    """(line, imported module dotted name inside the package, names) for each import."""
    package = dotted.split(".")[:-1] if not dotted.endswith("__init__") else dotted.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                yield node.lineno, ".".join(base + [node.module]), [a.name for a in node.names]
            else:  # from .. import models, checkpoint: each name is a module
                for a in node.names:
                    yield node.lineno, ".".join(base + [a.name]), []
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("coala_stream."):
            yield node.lineno, node.module.removeprefix("coala_stream."), [a.name for a in node.names]


def _unit(dotted: str) -> str:
    return dotted.split(".")[0] if dotted else "__init__"


def test_every_unit_has_a_layer():
    missing = {_unit(d) for _, d in _modules()} - set(LAYERS)
    assert not missing, f"add {sorted(missing)} to LAYERS (and to docs/design.md)"


def test_dependencies_run_one_way():
    bad = []
    for path, dotted in _modules():
        here = _unit(dotted)
        for line, target, _ in _imports(path, dotted):
            there = _unit(target)
            if there != here and LAYERS[there] > LAYERS[here] and here not in ("__init__", "__main__"):
                bad.append(f"{path.relative_to(PKG)}:{line} ({here}, layer {LAYERS[here]}) imports "
                           f"{target} (layer {LAYERS[there]})")
    assert not bad, "\n".join(bad)


# capture depends on the store and on models only (plus the utilities of layer 0)
CAPTURE_MAY_USE = {"store", "models", "calib", "checkpoint"}


def test_capture_depends_on_store_and_models_only():
    bad = []
    for path, dotted in _modules():
        if _unit(dotted) != "capture":
            continue
        for line, target, _ in _imports(path, dotted):
            there = _unit(target)
            if there != "capture" and LAYERS[there] > 0 and there not in CAPTURE_MAY_USE:
                bad.append(f"{path.relative_to(PKG)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for path, dotted in _modules():
        for line, target, names in _imports(path, dotted):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                bad.append(f"{path.relative_to(PKG)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    names = {d for _, d in _modules()}
    for path, dotted in _modules():
        deps = set()
        for _, target, imported in _imports(path, dotted):
            for cand in [f"{target}.{n}" for n in imported] + [target, f"{target}.__init__"]:
                if cand in names and cand != dotted:
                    deps.add(cand)
                    break
        graph[dotted] = {d for d in deps if not d.endswith("__init__")}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state and not node.endswith("__init__"):
            visit(node, [])
