"""The package's layering: no import cycles and no upward imports, lazy imports inside functions included.

The allowed arrows are :data:`LAYERS` (docs/design.md, "Layers"): a module may import modules of its own
layer or of a layer below it, and no two modules may reach each other through imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "aglcl"

# Bottom to top. Each entry is a top-level module or package of aglcl.
LAYERS = [
    {"errors", "paths", "rundir", "dist", "zero", "__init__"},  # the bottom layer: everyone may import it
    {"metrics"},        # pure functions of R; per-example scorers
    {"models"},         # model and tokenizer builders; answer-token forward passes
    {"data"},           # task specs, sources, prompts, collate, scoring strategies
    {"attribution"},    # importance estimators, normalisation, the map store
    {"methods"},        # continual-learning methods over the hook contract
    {"engine"},         # the training loop, steppers, engines, the sequence runner, checkpoints
    {"report"},         # tables, plots, sweeps, aglcl eval, writing a run's report files
    {"commands"},       # one Hydra app per subcommand
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py; add it to LAYERS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every aglcl module ``path`` imports, at any depth of the file (functions too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in modules and name != own:
                found.add(name)
            elif name.startswith("aglcl") and name.rpartition(".")[0] in modules and name.rpartition(".")[0] != own:
                found.add(name.rpartition(".")[0])  # ``from aglcl.x import function``
    return found


def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py") if "_conf" not in p.parts}
    modules = set(files)
    edges = {m: _imports(p, modules) for m, p in files.items()}
    for m in edges:  # importing a package's __init__ is not an arrow into each of its modules
        edges[m] = {d for d in edges[m] if not (d != "aglcl" and files[d].name == "__init__.py" and
                                                 not files[d].read_text().strip().count("import"))}
    return edges


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} -> {d}" for m, deps in graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "upward imports (see LAYERS):\n" + "\n".join(sorted(upward))


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    """Each import cycle found by a depth-first walk, as ``a -> b -> a``."""
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_can_fail():
    """The parser counts imports inside functions, and the walk finds a cycle (else the tests above pass
    vacuously)."""
    edges = graph()
    assert "aglcl.engine.runner" in edges["aglcl.commands.train"]  # imported inside train()
    assert "aglcl.engine.checkpoint" in edges["aglcl.engine.loop"]  # imported inside train_task()
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _layer("aglcl.engine.runner") > _layer("aglcl.methods.agft") > _layer("aglcl.dist")
