"""The floors of the package, checked by parsing every module's imports (no import is executed).

Bottom to top: config + options + autodiff + runtime; models, data, objectives, metrics; sampling;
evaluation; training; cli. A module may import from its own floor or below, never above; the
module import graph has no cycle; imports inside functions are only for optional heavy packages.
A short list of same-floor imports is forbidden too: packages of one floor that must stay independent.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

SRC = Path(importlib.util.find_spec("meanflow").origin).parent  # located, not imported
FLOORS = (
    ("config", "options", "autodiff", "runtime"),
    ("models", "data", "objectives", "metrics"),
    ("sampling",),
    ("evaluation",),
    ("training",),
    ("cli", "__main__"),
)
# third-party packages that are optional extras or slow to import: the only ones imported lazily
DEFERRED_OK = ("PIL", "matplotlib", "torchvision", "sklearn", "scipy", "diffusers", "torch_fidelity",
               "torch.utils.tensorboard", "jvp_flash_attention", "flax", "jax", "orbax", "huggingface_hub", "lpips", "transformers",
               "torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint")  # FSDP2: ~1 s
# (importer package, imported package) pairs of one floor that must not meet: the JVP machinery (per-sample
# dropout included) needs no process or file plumbing, models know no data source, metrics are pure
# functions of samples, objectives take any model and any data
FORBIDDEN = (("autodiff", "runtime"), ("models", "data"), ("metrics", "models"), ("objectives", "models"), ("objectives", "data"))


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package whose folder is ``root``."""
    def name(path: Path) -> str:
        parts = ["meanflow", *path.relative_to(root).with_suffix("").parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    return {name(p): p for p in sorted(root.rglob("*.py"))}


MODULES = find_modules(SRC)


def is_package(name: str, modules: dict[str, Path] = MODULES) -> bool:
    return modules[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import, modules: dict[str, Path] = MODULES) -> list[str]:
    """Absolute names of the meanflow modules an import statement loads (submodules where named)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "meanflow"]
    if node.level:
        base = importer.split(".") if is_package(importer, modules) else importer.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "meanflow":
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
    return subs if subs and len(subs) == len(node.names) else [target, *subs]


def floor(name: str) -> int:
    top = name.split(".")[1]
    for level, packages in enumerate(FLOORS):
        if top in packages:
            return level
    raise AssertionError(f"module {name} belongs to no floor; add its package to FLOORS and docs/ARCHITECTURE.md")


def imports(name: str, modules: dict[str, Path] = MODULES) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(module-level meanflow imports, function-level imports of any package) as (line, module name)."""
    tree = ast.parse(modules[name].read_text())
    top, nested = [], []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        at_top = node in tree.body
        if at_top:
            top += [(node.lineno, t) for t in resolve(name, node, modules)]
        else:
            third_party = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            nested += [(node.lineno, t) for t in resolve(name, node, modules) or third_party]
    return top, nested


LIBRARY = [m for m in MODULES if m != "meanflow"]  # the top-level package is the public facade


@pytest.mark.parametrize("name", LIBRARY)
def test_no_import_from_a_higher_floor(name):
    top, _ = imports(name)
    upward = [f"line {line}: {target} (floor {floor(target)})" for line, target in top
              if target != "meanflow" and floor(target) > floor(name)]
    assert not upward, f"{name} (floor {floor(name)}) imports from above: {upward}"
    assert "meanflow" not in [t for _, t in top], f"{name} imports the top-level facade `meanflow`; import the module itself"


def forbidden_imports(modules: dict[str, Path]) -> list[str]:
    """Every module-level import of ``modules`` that crosses a :data:`FORBIDDEN` pair, as 'importer line N: target'."""
    found = []
    for name in modules:
        for line, target in imports(name, modules)[0]:
            pair = tuple(n.split(".")[1] if "." in n else "" for n in (name, target))
            if pair in FORBIDDEN:
                found.append(f"{name} line {line}: {target}")
    return found


def test_no_forbidden_same_floor_import():
    leaks = forbidden_imports(MODULES)
    assert not leaks, f"same-floor imports between packages that must stay independent ({FORBIDDEN}): {leaks}"


def test_a_planted_same_floor_import_is_caught(tmp_path):
    """A copy of the package with ``models/mlp.py`` importing from ``data/`` fails the check, naming the line."""
    root = tmp_path / "meanflow"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    planted = root / "models" / "mlp.py"
    lines = planted.read_text().splitlines()
    at = next(i for i, text in enumerate(lines) if text.startswith("from ."))
    planted.write_text("\n".join([*lines[:at], "from ..data.toy import sample_toy", *lines[at:]]) + "\n")
    assert forbidden_imports(find_modules(root)) == [f"meanflow.models.mlp line {at + 1}: meanflow.data.toy"]


@pytest.mark.parametrize("name", LIBRARY)
def test_function_level_imports_only_defer_optional_heavy_packages(name):
    _, nested = imports(name)
    bad = [f"line {line}: {target}" for line, target in nested
           if not any(target == ok or target.startswith(ok + ".") for ok in DEFERRED_OK)]
    assert not bad, f"{name} imports inside a function what belongs at the top of the module: {bad}"


def test_module_import_graph_has_no_cycle():
    graph = {name: sorted({t for _, t in imports(name)[0]} - {name}) for name in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_checker_sees_relative_imports_and_flags_an_upward_one(tmp_path):
    """The parser must resolve ``from ..x import y`` to meanflow.x.y, or the checks above prove nothing."""
    node = ast.parse("from ..training.trainer import train\nfrom . import checkpoint\n").body
    assert resolve("meanflow.runtime.seeding", node[0]) == ["meanflow.training.trainer"]
    assert resolve("meanflow.runtime", node[1]) == ["meanflow.runtime.checkpoint"]
    assert floor("meanflow.training.trainer") > floor("meanflow.runtime.seeding")


def test_every_package_says_what_its_floor_is_for():
    for name, path in MODULES.items():
        if is_package(name) and name != "meanflow":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert doc.strip(), f"{path} has no docstring saying what the floor {name} is for"
            assert len(doc.strip().splitlines()) <= 2, f"{path}: say what the floor is for in two lines"


def test_architecture_doc_lists_every_module():
    """docs/ARCHITECTURE.md has one line for every module (packages and ``__main__`` speak for themselves)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", doc, flags=re.M))
    modules = {str(path.relative_to(SRC)) for name, path in MODULES.items()
               if not is_package(name) and path.name != "__main__.py"}
    assert not modules - listed, f"modules missing from docs/ARCHITECTURE.md's list: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/ARCHITECTURE.md lists modules that do not exist: {sorted(listed - modules)}"
