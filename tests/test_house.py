"""The house rules that keep msprior easy to change, checked on the source itself.

* no function in `msprior/` longer than MAX_LINES (read at once; orchestration split by step);
* the import graph between the package's parts follows docs/ARCHITECTURE.md's module map
  (ALLOWED below is that table) and has no cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parent.parent / "msprior"
MAX_LINES = 80

# part -> the parts it may import (docs/ARCHITECTURE.md, "Module map")
ALLOWED: Dict[str, Set[str]] = {
    "errors": set(),
    "flags": set(),
    "console": {"errors", "redact"},
    "redact": set(),
    "runtime": {"redact"},
    "devices": {"errors", "console"},
    "config": {"errors"},
    "storage": {"errors"},
    "metadata": set(),
    "latent_bins": set(),
    "conditioning": {"errors"},  # ConditioningSpec, a leaf
    "model": {"config", "conditioning"},
    "rave": {"errors", "storage", "latent_bins"},
    "codec": {"storage"},
    "checkpoint": {"errors", "storage", "config", "tracking"},
    "data": {"errors", "flags", "console", "runtime", "storage", "rave", "codec", "config", "latent_bins",
             "devices", "model", "conditioning"},  # model: DatasetFacts, the one reader of the manifest's shapes
    "tracking": {"errors", "redact", "storage"},
    "train": {"errors", "flags", "console", "runtime", "storage", "config", "model", "data", "checkpoint",
              "tracking", "redact", "devices", "conditioning"},
    "export": {"errors", "storage", "config", "model", "checkpoint", "metadata", "redact", "latent_bins",
               "conditioning"},
    "registry": {"errors", "flags", "redact", "storage", "tracking", "metadata"},
    "combine": {"errors", "flags", "metadata", "rave"},  # msprior/export/combine.py: prior + RAVE in one .ts
    "publish": {"errors", "flags", "redact", "storage", "export", "registry", "checkpoint", "tracking", "metadata",
                "train", "config", "model", "data", "conditioning"},  # data: the table's one reader (validation windows)
    "pipeline": {"errors", "flags", "console", "redact", "storage", "config", "data", "train", "checkpoint",
                 "export", "publish", "registry", "tracking"},
    "demo": {"flags", "codec", "data", "pipeline"},
    "cli": {"errors", "flags", "console", "redact", "config", "codec", "data", "train", "export", "publish",
            "registry", "pipeline", "demo", "combine"},
    "devstack": {"redact"},  # not in the wheel: tests and cluster/local.sh
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "msprior" or len(parts) < 2 or parts[1] in ("__version__", "__main__"):
        return None
    if parts[1] == "export" and len(parts) > 2 and parts[2] in ("publish", "evaluate"):
        return "publish"  # after an export: int8 effect on validation windows, preview, registration
    if parts[1] == "export" and len(parts) > 2 and parts[2] == "combine":
        return "combine"  # reads a RAVE export (msprior.rave), which the export of a run never needs
    if parts[1] == "export" and len(parts) > 2 and parts[2] == "metadata":
        return "metadata"  # the export's metadata contract, a leaf that the registry reads
    return parts[1]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module
            if node.module == "msprior":
                yield from (f"msprior.{a.name}" for a in node.names)


def _graph() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        src = _part(".".join(p for p in rel.parts if p != "__init__"))
        for module in _imports(path):
            dst = _part(module)
            if src and dst and dst != src:
                edges[src].add(dst)
    return edges


def test_functions_are_short():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over %d lines:\n%s" % (MAX_LINES, "\n".join(long))


def test_imports_follow_the_module_map():
    graph = _graph()
    unknown = sorted(set(graph) - set(ALLOWED))
    assert not unknown, f"parts missing from the module map: {unknown}"
    wrong = [f"{src} -> {dst}" for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
             if dst not in ALLOWED[src]]
    assert not wrong, "imports across the module map's arrows:\n" + "\n".join(wrong)


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: Dict[str, int] = {}

    def visit(node: str, stack: list) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
