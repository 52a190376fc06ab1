"""The package's layering: imports run one way, no import cycle (function-local imports counted),
no function-local import of the package's own modules (they only ever dodged cycles), no machine
paths in library code."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fx_fastcache": "fx_fastcache", "passes": "fx_fastcache.passes", "export": "fx_fastcache.export"}
#: Layers, lowest first: a module may import its own layer or lower ones only.
LAYERS = [
    ("protocol", ["fx_fastcache.graph_protocol", "fx_fastcache.schedule_table", "fx_fastcache.quiet"]),
    ("runtime", ["fx_fastcache.runtime", "fx_fastcache.policies", "fx_fastcache.fallbacks",
                 "fx_fastcache.calibration", "fx_fastcache.config", "fx_fastcache.families", "fx_fastcache.markers",
                 "fx_fastcache.layerwise_casting", "fx_fastcache.hook_chain", "fx_fastcache.traceable_forwards",
                 "fx_fastcache.zoo"]),
    ("passes", ["fx_fastcache.passes"]),
    ("capture", ["fx_fastcache.module", "fx_fastcache.step_dispatch", "fx_fastcache.decision_split",
                 "fx_fastcache.auto_mode", "fx_fastcache.context_state",
                 "fx_fastcache.model_watch"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """(target module, is function-local) for every import of a package module in ``path``."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1]) + ("." + node.module if node.module else "")
            else:
                mod = node.module or ""
            targets = [mod + "." + a.name for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not (mods[t].name == "__init__.py" and name.startswith(t + ".")):
                yield t, id(node) in local


def _layer(mod: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    return None  # the public layer


def test_no_import_cycles_and_no_local_imports_of_the_package():
    mods = _modules()
    graph = {m: set() for m in mods}
    local = []
    for m, path in mods.items():
        for t, is_local in _imports(m, path, mods):
            graph[m].add(t)
            if is_local:
                local.append(f"{m} imports {t} inside a function")
    assert not local, local
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for t in graph[m]:
            assert seen.get(t) != 1, f"import cycle: {' -> '.join(stack[stack.index(t):] + [t])}"
            if t not in seen:
                visit(t, stack + [t])
        seen[m] = 2

    for m in mods:
        if m not in seen:
            visit(m, [m])


def test_imports_run_down_the_layers():
    mods = _modules()
    upward = []
    for m, path in mods.items():
        lm = _layer(m)
        if lm is None:
            continue
        for t, _ in _imports(m, path, mods):
            lt = _layer(t)
            if lt is None or lt > lm:
                upward.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({'public' if lt is None else LAYERS[lt][0]})")
    assert not upward, upward


def test_no_machine_paths_in_library_code():
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in _modules().values()
            for i, line in enumerate(p.read_text().splitlines()) if re.search(r"['\"]/(work|farm|tmp|root|home)/", line)]
    assert not hits, hits
