"""The package's layering: no import cycle among facepipe's modules, and no upward import.

Every ``import`` / ``from ... import`` statement of every module under ``facepipe/`` is read with
:mod:`ast` (module-level and function-local ones, ``TYPE_CHECKING`` blocks included; relative
imports resolved), without importing anything.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "facepipe"

# The layer order, lowest first. A module may import its own layer and the layers before it,
# never a later one (imports inside functions count too). A layer is a top-level module or
# package of facepipe:
#   errors   the user-error classes (imports nothing of facepipe)
#   utils    small helpers: identity names, folder walks, lazy package attributes
#   config   the YAML config schema
#   runtime  checkpoints, distributed, device/AMP, seeding, atomic I/O, FAISS CPU/GPU policy
#   data     datasets, transforms, samplers, LFW pairs files, the per-identity clusters
#   models   backbones and LoadedModel (a checkpoint's backbone with its preprocessing)
#   losses   heads and losses, CLMLE and its margin advice
#   align    face detection and alignment
#   embed    embeddings of image files and the embeddings folder
#   index    the k-nearest-cluster rule, the identity index, its jobs, flat search
#   eval     verification and identification protocols, reports
#   train    the trainer and its plugins
#   study    studies of methods x seeds
#   demo     the end-to-end demo
#   cli      the `facepipe` command
LAYERS = (
    "errors", "utils", "config", "runtime", "data", "models", "losses", "align", "embed", "index", "eval",
    "train", "study", "demo", "cli",
)
# Exempt from the layer order (still part of the cycle check): the package root, a lazy table
# of the public API over every layer, and `python -m facepipe`.
EXEMPT = ("facepipe", "facepipe.__main__")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name of what is imported (a facepipe module or package)
    path: str  # file of the importer, relative to the repository
    line: int
    statement: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{self.statement}`"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[str, str]]:
    """Module name -> (path relative to the repository, source) of every .py file of the package."""
    return {module_name(path, package_dir): (str(path.relative_to(package_dir.parent)), path.read_text())
            for path in sorted(package_dir.rglob("*.py"))}


def facepipe_imports(sources: dict[str, tuple[str, str]]) -> list[Import]:
    """Every import of a facepipe module in ``sources`` (as :func:`read_sources` gives them).

    ``from package import name`` names the submodule ``package.name`` when there is one, else
    ``package``; a relative import is resolved against the importer's package."""
    found = []
    for module, (path, source) in sources.items():
        tree = ast.parse(source, filename=path)
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                submodules = [f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in sources]
                names_only = len(submodules) < len(node.names)
                targets = submodules + ([origin] if names_only else [])
            else:
                continue
            statement = " ".join((ast.get_source_segment(source, node) or "").split())
            found += [Import(module, target, path, node.lineno, statement) for target in targets
                      if target == "facepipe" or target.startswith("facepipe.")]
    return found


def layer_of(module: str) -> str | None:
    """Top-level module or package of facepipe that ``module`` belongs to (None: the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(imports: list[Import]) -> list[str]:
    """One message per import that does not go down (or stay within its layer) in LAYERS."""
    problems = []
    for imp in imports:
        if imp.importer in EXEMPT:
            continue
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if source not in LAYERS:
            problems.append(f"{imp.importer} is in no layer: add '{source}' to LAYERS in tests/test_layering.py "
                            f"(import {imp.where()})")
        elif target is None:
            if imp.statement != "from facepipe import __version__":
                problems.append(f"{imp.importer} imports the package root, whose lazy exports reach every layer: "
                                f"{imp.where()}; import the defining module instead")
        elif target not in LAYERS:
            problems.append(f"{imp.importer} imports {imp.target}, which is in no layer: add '{target}' to LAYERS "
                            f"({imp.where()})")
        elif LAYERS.index(target) > LAYERS.index(source):
            problems.append(f"{imp.importer} (layer {source}) imports {imp.target} (layer {target}, above it): "
                            f"{imp.where()}")
    return problems


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module in the import graph (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def describe_cycle(component: list[str], imports: list[Import]) -> str:
    inside = set(component)
    edges = [imp.where() for imp in imports if imp.importer in inside and imp.target in inside]
    return f"import cycle among {', '.join(component)}:\n    " + "\n    ".join(edges)


@pytest.fixture(scope="module")
def package_imports():
    return facepipe_imports(read_sources())


def test_the_scan_sees_the_package(package_imports):
    importers = {imp.importer for imp in package_imports}
    assert {"facepipe.cli", "facepipe.train.trainer", "facepipe.models.loaded"} <= importers
    top_level = {path.stem if path.suffix == ".py" else path.name for path in PACKAGE_DIR.iterdir()
                 if path.suffix == ".py" or (path / "__init__.py").is_file()}
    unplaced = sorted(top_level - set(LAYERS) - {"__init__", "__main__"})
    assert unplaced == [], f"top-level modules/packages in no layer: {unplaced}; place them in LAYERS"


def test_no_import_cycle(package_imports):
    cycles = import_cycles(package_imports)
    assert not cycles, "\n".join(describe_cycle(component, package_imports) for component in cycles)


def test_every_import_goes_down_the_layers(package_imports):
    problems = upward_imports(package_imports)
    assert not problems, f"{len(problems)} upward import(s):\n" + "\n".join(problems)


# ------------------------------------------------------------------ the checks on known cases
def _sources(modules: dict[str, str]) -> dict[str, tuple[str, str]]:
    """read_sources' form of in-memory modules: a name that prefixes another is a package."""
    def path(name: str) -> str:
        is_package = any(other.startswith(name + ".") for other in modules)
        return name.replace(".", "/") + ("/__init__.py" if is_package else ".py")

    return {name: (path(name), text) for name, text in modules.items()}


def test_an_upward_import_inside_a_function_is_named():
    sources = _sources({
        "facepipe.data": "",
        "facepipe.data.merge": "def merge():\n    from facepipe.eval.plots import plot_roc\n",
        "facepipe.eval": "",
        "facepipe.eval.plots": "from facepipe.runtime.io import atomic_write\n",
    })
    problems = upward_imports(facepipe_imports(sources))
    assert len(problems) == 1
    assert "facepipe.data.merge (layer data) imports facepipe.eval.plots (layer eval" in problems[0]
    assert "facepipe/data/merge.py:2: `from facepipe.eval.plots import plot_roc`" in problems[0]


def test_relative_imports_are_resolved_and_cycles_found():
    sources = _sources({
        "facepipe.losses": "from .arconvl import ARConvLHead\n",
        "facepipe.losses.arconvl": "from . import imbalance\nfrom facepipe.losses import build_head\n",
        "facepipe.losses.imbalance": "from ..runtime.device import float32_region\n",
        "facepipe.runtime": "",
        "facepipe.runtime.device": "",
    })
    imports = facepipe_imports(sources)
    assert {(imp.importer, imp.target) for imp in imports} == {
        ("facepipe.losses", "facepipe.losses.arconvl"),
        ("facepipe.losses.arconvl", "facepipe.losses.imbalance"),
        ("facepipe.losses.arconvl", "facepipe.losses"),
        ("facepipe.losses.imbalance", "facepipe.runtime.device"),
    }
    assert import_cycles(imports) == [["facepipe.losses", "facepipe.losses.arconvl"]]
    assert upward_imports(imports) == []
