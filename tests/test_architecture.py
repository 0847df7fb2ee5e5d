"""The package's shape (README "Architecture"): no import cycles, imports only "downwards" as the table
below (and the README) says, and the runtime never imports the training code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "medfocus"

#: package -> the medfocus packages it may import (function-level lazy imports included). The same
#: table is drawn in the README's Architecture section.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "types": {"errors"},
    "registry": {"errors"},
    "medfocus": {"errors", "types"},  # the top-level __init__
    "io": {"errors", "types"},
    "datasets": {"errors", "types", "registry", "io"},
    "evaluation": {"errors", "types", "io", "datasets"},
    "lvlm": {"errors", "types", "registry", "io"},
    # MedFocus is an attribution Method and prompting_medsam uses its refiner/grounding: the one pair
    # that meets both ways, never at import time (checked by the cycle tests below).
    "attribution": {"errors", "types", "registry", "io", "lvlm", "concepts"},
    "concepts": {"errors", "types", "registry", "io", "datasets", "lvlm", "attribution"},
    "editing": {"errors", "types", "registry", "io", "datasets", "lvlm", "concepts"},
    "bench": {"errors", "types", "registry", "io", "datasets", "lvlm", "editing"},
    "report": {"errors", "types", "io", "attribution", "evaluation"},
    # (+ cli: the launcher runs the `medfocus` command itself in every shard job)
    "runner": {"errors", "types", "registry", "io", "datasets", "evaluation", "lvlm", "attribution", "concepts",
               "editing", "bench", "report", "cli"},
    "commands": {"errors", "types", "registry", "io", "datasets", "evaluation", "lvlm", "attribution", "concepts",
                 "editing", "bench", "report", "runner"},
    "cli": {"errors", "registry"},  # commands are named as "module:attr" strings, imported on use
    # the trainers and their two commands (which reuse the CLI's progress helper); nothing imports training
    "training": {"errors", "types", "registry", "io", "datasets", "evaluation", "lvlm", "attribution", "concepts",
                 "commands"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path, *, lazy: bool) -> set[str]:
    """medfocus modules imported by ``name`` (module level; with ``lazy`` also inside functions).
    Imports under ``if TYPE_CHECKING:`` never run and are skipped. Importing ``a.b.c`` also runs
    ``a`` and ``a.b``, so parent packages count too."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if lazy:
                    visit(ch)
                continue
            if isinstance(ch, ast.Import):
                found.update(a.name for a in ch.names)
            elif isinstance(ch, ast.ImportFrom):
                base = ch.module or ""
                if ch.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (ch.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in ch.names if f"{base}.{a.name}" in MODULES)
            else:
                visit(ch)

    visit(ast.parse(path.read_text()))
    out = set()
    for mod in found:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            p = ".".join(parts[:i])
            if p in MODULES and p != name and not name.startswith(p + "."):
                out.add(p)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medfocus"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_not_even_through_lazy_imports():
    for lazy in (False, True):
        graph = {n: _imports(n, f, lazy=lazy) for n, f in MODULES.items()}
        assert _cycles(graph) == [], f"import cycle ({'lazy imports included' if lazy else 'module level'})"


def test_packages_import_only_what_the_architecture_allows():
    seen: dict[str, set[str]] = {}
    for n, f in MODULES.items():
        for dep in _imports(n, f, lazy=True):
            a, b = _package(n), _package(dep)
            if a != b:
                seen.setdefault(a, set()).add(b)
    assert set(seen) <= set(ALLOWED), f"packages missing from the architecture table: {set(seen) - set(ALLOWED)}"
    bad = {a: sorted(deps - ALLOWED[a]) for a, deps in seen.items() if deps - ALLOWED[a]}
    assert bad == {}
    assert "training" not in set().union(*(ALLOWED[p] for p in ALLOWED if p != "training"))


def test_no_runtime_module_imports_training():
    importers = sorted(n for n, f in MODULES.items() if not n.startswith("medfocus.training")
                       for dep in _imports(n, f, lazy=True) if dep.startswith("medfocus.training"))
    assert importers == []
    # and in a fresh interpreter, using the library end to end pulls in nothing of it
    code = ("import sys, medfocus.cli, medfocus.runner, medfocus.runner.demo, medfocus.report, medfocus.concepts.method, "
            "medfocus.concepts.refine, medfocus.lvlm.loading, medfocus.attribution.prompting, medfocus.bench, "
            "medfocus.commands.models, medfocus.commands.attribute, medfocus.commands.demo\n"
            "from medfocus.concepts.refine import resolve_checkpoint; resolve_checkpoint('demo')\n"
            "print(sorted(m for m in sys.modules if m.startswith('medfocus.training')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_errors_are_rooted_in_builtins_and_converted_to_cli_errors_in_one_place(tmp_path):
    from click.testing import CliRunner

    from medfocus.cli import main
    from medfocus.datasets import load_dataset
    from medfocus.errors import ConfigError, DataError, MedfocusError, ModelError
    from medfocus.lvlm import load_lvlm

    assert issubclass(DataError, ValueError) and issubclass(ConfigError, ValueError) and issubclass(ModelError, OSError)
    assert all(issubclass(c, MedfocusError) for c in (DataError, ConfigError, ModelError))
    # what a caller that knows nothing of medfocus would write
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no_such_dataset", tmp_path)
    with pytest.raises(OSError, match="no_model_here"):
        load_lvlm(str(tmp_path / "no_model_here"))
    # one place turns them into CLI errors: no command module catches MedfocusError itself ...
    for f in (ROOT / "commands").glob("*.py"):
        assert "except MedfocusError" not in f.read_text(), f.name
    # ... and every command still reports one line and exit status 1
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 1 and r.output.startswith("Error: result file") and "Traceback" not in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model": "m"}\n')
    r = CliRunner().invoke(main, ["evaluate", str(bad), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "bad.jsonl line 1 lacks key field 'dataset'" in r.output
