"""The package's shape: no import circles between its modules (at any level: a function-level
import closes a circle as surely as a top-level one, it only hides it until run time)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import latentaudit

PKG = Path(latentaudit.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: never executed, no circle."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for b in node.body for n in ast.walk(b)}
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` resolved to the module x
    when x is one, else to the package); imports made only for type checkers are left out."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("latentaudit"):
                    graph[mod].add(t)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_a_circle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycles = import_cycles(import_graph())
    assert cycles == [], f"{len(cycles)} import circle(s): {cycles}"


def test_asking_for_a_judge_loads_no_trainer_and_no_torch_family():
    import subprocess
    import sys

    code = ("import sys; from latentaudit import registry; registry.get('judge', 'substring'); "
            "print(','.join(m for m in ('latentaudit.construct.recipes', "
            "'latentaudit.construct.train', 'latentaudit.interventions.families') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_third_party_family_comes_in_through_an_entry_point(monkeypatch, tmp_path):
    """A family installed by another package (entry point group latentaudit.families) is listed,
    created with its own parameters and validated like a built-in one."""
    import importlib.metadata as md

    from latentaudit import registry
    from latentaudit.errors import UserError

    mod = tmp_path / "thirdparty_push.py"
    mod.write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "from latentaudit.interventions.families import Family\n"
        "class Push(Family):\n"
        "    name = 'push3'\n"
        "    doc = 'a third-party push'\n"
        "    class Params(BaseModel):\n"
        "        model_config = ConfigDict(extra='forbid')\n"
        "        k: int = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = md.EntryPoint("push3", "thirdparty_push:Push", "latentaudit.families")
    real = md.entry_points
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [ep] if group == "latentaudit.families" else real(group=group))
    assert "push3" in registry.names("family")
    fam = registry.create("family", "push3", k=5)
    assert fam.describe() == {"name": "push3", "params": {"k": 5}}
    with pytest.raises(UserError, match="family 'push3': j: unknown parameter"):
        registry.create("family", "push3", j=1)
    from latentaudit.stages.latent import LatentConfig

    cfg = LatentConfig(families=["push3", "noise"], family_params={"push3": {"k": 7}})
    assert cfg.family_params == {"push3": {"k": 7}, "noise": {"draws": 4}}
