"""The house rules that keep msprior easy to change, checked on the source itself.

* no function in `msprior/` longer than MAX_LINES, no module longer than MAX_MODULE_LINES (read at once;
  orchestration split by step, modules split by job);
* the import graph between the package's parts follows docs/ARCHITECTURE.md's module map, parsed from
  the table itself (`module_map()`), and has no cycle;
* no module imports another module's private names (`from x import _y`, `x._y`): what a module shares
  is public, what it keeps private can change without a look at its importers;
* the publish walk climbs back up the pipeline at most MAX_CLIMBS times, and the export never imports
  training (`test_publish_walk_climbs_back_up_at_most_5_times` says how it is counted).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent / "msprior"
ARCHITECTURE = ROOT.parent / "docs" / "ARCHITECTURE.md"
MAX_LINES = 60
MAX_MODULE_LINES = 400
MODULE_LINES_EXEMPT: Dict[str, str] = {}  # "msprior/x.py": why it cannot be split (none today)
MAX_CLIMBS = 5


# --- the module map, read from docs/ARCHITECTURE.md ------------------------------------------


def module_map() -> Tuple[Dict[str, str], Dict[str, Set[str]], List[str]]:
    """(paths, allowed, stages) read from docs/ARCHITECTURE.md.

    paths: `msprior/...` file or folder -> its part; allowed: part -> the parts it may import;
    stages: the pipeline's parts in order, from the diagram above the table (`--msprior/data-->`).
    The table's rules: column 1 lists backticked paths (a bare name is in the folder of the path
    before it); a row is its own part, named after its first path (`msprior/export/publish.py` ->
    `publish`), unless its last column reads "as `msprior/X/`" (then its paths belong to part X);
    the last column lists part names separated by commas, "–" for none, "everything above" for every
    part of the rows above; text in parentheses is a note. Rows outside `msprior/` are not parts.
    """
    text = ARCHITECTURE.read_text()
    stages = re.findall(r"--msprior/(\w+)-", text.split("Module map", 1)[0])
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| module | job | may import"))
    paths: Dict[str, str] = {}
    allowed: Dict[str, Set[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"docs/ARCHITECTURE.md module map: not 3 cells: {line}"
        row = _row_paths(cells[0])
        if not row:
            continue
        alias = re.match(r"as `msprior/(\w+)/`", cells[2])
        part = alias.group(1) if alias else _part_name(row[0])
        paths.update({p: part for p in row})
        if alias:
            continue
        may = re.sub(r"\([^)]*\)", "", cells[2]).strip()
        if may == "everything above":
            allowed[part] = set(allowed)
        else:
            names = {n.strip() for n in may.split(",")} - {"–", "-", ""}
            bad = [n for n in names if not re.fullmatch(r"[a-z_]+", n)]
            assert not bad, f"docs/ARCHITECTURE.md module map, row {row[0]}: not part names: {bad}"
            allowed[part] = names
    unknown = sorted({n for names in allowed.values() for n in names} - set(allowed))
    assert not unknown, f"docs/ARCHITECTURE.md module map: arrows to parts without a row: {unknown}"
    return paths, allowed, stages


def _row_paths(cell: str) -> List[str]:
    out: List[str] = []
    folder = ""
    for p in re.findall(r"`([^`]+)`", cell):
        if "/" in p:
            if not p.startswith("msprior/"):
                return []  # jobs/, cluster/: not part of the package
            folder = p if p.endswith("/") else p.rsplit("/", 1)[0] + "/"
        else:
            p = folder + p
        out.append(p)
    return out


def _part_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py")


# --- the package's modules and imports --------------------------------------------------------


def _modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out[".".join(p for p in rel.parts if p != "__init__")] = path
    return out


MODULES = _modules()
PATHS, ALLOWED, STAGES = module_map()


def _resolve(dotted: str) -> Optional[str]:
    """The package module `dotted` names or lives in (`msprior.data.reader.open_table` -> reader)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _part(module: str) -> Optional[str]:
    """The module map's part of a package module (None for the package root)."""
    rel = MODULES[module].relative_to(ROOT.parent).as_posix()
    if rel in ("msprior/__init__.py", "msprior/__main__.py"):
        return None
    if rel in PATHS:
        return PATHS[rel]
    if rel.removesuffix(".py") + "/" in PATHS:  # a module whose row names the package it becomes
        return PATHS[rel.removesuffix(".py") + "/"]
    folders = [p for p in PATHS if p.endswith("/") and rel.startswith(p)]
    return PATHS[max(folders, key=len)] if folders else "?" + rel


def _stage(module: str) -> Optional[int]:
    """The pipeline stage a module belongs to (its folder under msprior/), or None."""
    top = module.split(".")[1] if "." in module else ""
    return STAGES.index(top) if top in STAGES else None


def _imports(module: str) -> Iterator[Tuple[str, str]]:
    """(imported module, name taken from it or "") for every import of a package module, at any depth."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "msprior":
                    yield _resolve(a.name), ""
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] != "msprior":
                continue
            for a in node.names:
                full = f"{node.module}.{a.name}"
                yield (full, "") if full in MODULES else (_resolve(node.module), a.name)


def _uses(module: str) -> Set[Tuple[str, str]]:
    """(module, name) for every name this module takes from another package module: names imported
    from it and attributes read off it (`tbl._fs_path`, `registry._client`)."""
    tree = ast.parse(MODULES[module].read_text())
    alias: Dict[str, str] = {}
    out: Set[Tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "msprior":
                    alias[a.asname or "msprior"] = a.name if a.asname else "msprior"
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and node.module.split(".")[0] == "msprior":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    alias[a.asname or a.name] = full
                else:
                    out.add((_resolve(node.module), a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in alias:
                dotted = ".".join([alias[base.id]] + chain[:0:-1])
                if dotted in MODULES:
                    out.add((dotted, node.attr))
    return {(m, name) for m, name in out if m != module}


def _graph() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = defaultdict(set)
    for module in MODULES:
        src = _part(module)
        for target, _ in _imports(module):
            dst = _part(target)
            if src and dst and dst != src:
                edges[src].add(dst)
    return edges


# --- the rules ---------------------------------------------------------------------------------


def test_functions_are_short():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over %d lines:\n%s" % (MAX_LINES, "\n".join(long))


def test_modules_are_short():
    stale = sorted(set(MODULE_LINES_EXEMPT) - {p.relative_to(ROOT.parent).as_posix() for p in ROOT.rglob("*.py")})
    assert not stale, f"exemptions for modules that are gone: {stale}"
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and rel not in MODULE_LINES_EXEMPT:
            long.append(f"{rel} ({n} lines)")
    assert not long, "modules over %d lines (split by job):\n%s" % (MAX_MODULE_LINES, "\n".join(long))


def test_the_module_map_is_read_from_the_architecture_doc():
    # a few arrows the doc states in words, so a parser that reads nothing cannot pass
    assert ALLOWED["errors"] == set() and ALLOWED["model"] >= {"config"}
    assert "storage" in ALLOWED["data"] and "data" in ALLOWED["train"]
    assert PATHS["msprior/export/publish.py"] == PATHS["msprior/export/evaluate.py"] == "publish"
    assert PATHS["msprior/data/reader.py"] == "data"
    assert STAGES == ["data", "train", "export", "registry"]


def test_imports_follow_the_module_map():
    graph = _graph()
    unknown = sorted({p for p in map(_part, MODULES) if p and p.startswith("?")})
    assert not unknown, f"modules without a row in docs/ARCHITECTURE.md's module map: {unknown}"
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


def test_no_module_takes_another_modules_private_names():
    taken = [f"{MODULES[module].relative_to(ROOT.parent)} takes {target}.{name}"
             for module in sorted(MODULES) for target, name in sorted(_uses(module))
             if name.startswith("_") and not name.startswith("__")]
    assert not taken, "private names used across modules (make them public or keep them home):\n" + \
        "\n".join(taken)


def publish_walk() -> Tuple[List[str], List[str]]:
    """(modules, climbs) of the walk from msprior.export.publish; see the test below."""
    seen: List[str] = []

    def walk(module: str) -> None:
        seen.append(module)
        for target, _ in _imports(module):
            if target and target not in seen:
                walk(target)

    walk("msprior.export.publish")
    climbs = [f"{m} takes {t}.{name}" for m in seen for t, name in sorted(_uses(m))
              if None not in (_stage(m), _stage(t)) and _stage(t) < _stage(m)]
    return seen, climbs


def test_publish_walk_climbs_back_up_at_most_5_times():
    """Following the exported file from `publish`: the walk is every package module reachable by
    imports (at any depth) from msprior.export.publish. The pipeline's stages are the diagram's at
    the top of docs/ARCHITECTURE.md, in order: data, train, export, registry; a module's stage is
    its folder (msprior/export/... is export; shared parts such as storage, config, model and
    checkpoint are no stage). A climb back up is one name a module of the walk takes from a module
    of an EARLIER stage (export reading the table's reader, the registry reading the export's
    metadata): each sends the reader back up the pipeline to learn what that name does. At most
    MAX_CLIMBS, and no module of the export imports training (its windows, its run)."""
    modules, climbs = publish_walk()
    assert len(climbs) <= MAX_CLIMBS, f"the publish walk climbs back up {len(climbs)} times:\n" + "\n".join(climbs)
    into_train = [f"{m} imports {t}" for m in MODULES if m.startswith("msprior.export")
                  for t, _ in _imports(m) if t and t.startswith("msprior.train")]
    assert not into_train, "the export imports training:\n" + "\n".join(into_train)
    assert "msprior.export.run" in modules and "msprior.registry" in modules  # the walk is walked
