"""The import rules of the layout (README, "Architecture"), checked on the source: every import
statement of src/capas, at module level or inside a function, followed transitively."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src"

# Imports allowed against a rule, each with its reason. Keep this short.
EXCEPTIONS = {
    # A backbone spec is described (rows, shapes, counts) by building its backbone on the meta device;
    # specs without a backbone never reach this import.
    ("capas.spec.model", "capas.models.backbones"),
}

# (who, what it must never reach, why)
RULES = [
    *[
        (part, forbidden, "the data path runs spec → models → data → train → runs → study / deploy")
        for part in (
            "capas.layers",
            "capas.models",
            "capas.data",
            "capas.train",
            "capas.inference",
            "capas.runs",
        )
        for forbidden in ("capas.study", "capas.deploy", "capas.cli")
    ],
    ("capas.data", "capas.models", "data knows images and splits, not networks"),
    ("capas.deploy.serve", "capas.train", "serving runs inference, it never trains"),
    ("capas.spec", "torch", "specs, layers and the summary are torch-free (`capas summary` is instant)"),
    ("capas.spec", "torchvision", "specs, layers and the summary are torch-free"),
    ("capas.layers", "torch", "layer definitions are torch-free; modules are built in capas.models"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the modules its import statements load (capas modules and external top-level names)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from capas.x import y`: capas.x, and capas.x.y when y is a submodule
                imported = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in imported:
                if not target.startswith("capas"):
                    targets.add(target.split(".")[0])
                    continue
                parts = target.split(".")
                # importing capas.a.b runs capas/__init__ and capas/a/__init__ first
                targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {t for t in targets if t in modules or not t.startswith("capas")} - {name}
    return graph


GRAPH = _graph()


def _within(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


def _excepted(source: str, target: str) -> bool:
    """An excepted import statement also loads the packages above its module."""
    return any(source == a and (b == target or b.startswith(target + ".")) for a, b in EXCEPTIONS)


def _path_to(start: str, forbidden: str) -> list[str] | None:
    """The chain of imports from `start` to a module within `forbidden`, or None."""
    seen, queue = {start}, [[start]]
    while queue:
        chain = queue.pop(0)
        for target in sorted(GRAPH.get(chain[-1], ())):
            if _excepted(chain[-1], target) or target in seen:
                continue
            if _within(target, forbidden):
                return [*chain, target]
            seen.add(target)
            if target.startswith("capas"):
                queue.append([*chain, target])
    return None


def test_the_graph_sees_the_package():
    assert {"capas.spec.model", "capas.models.build", "capas.runs.directory", "capas.inference"} <= set(GRAPH)
    assert "torch" in GRAPH["capas.models.modules"]
    assert _path_to("capas.cli", "capas.deploy") is not None  # the checker finds chains that exist


@pytest.mark.parametrize(("part", "forbidden", "why"), RULES)
def test_import_rule(part, forbidden, why):
    broken = []
    for module in sorted(m for m in GRAPH if _within(m, part)):
        chain = _path_to(module, forbidden)
        if chain is not None:
            broken.append(" -> ".join(chain))
    assert not broken, f"{part} must not import {forbidden} ({why}):\n" + "\n".join(broken[:5])
