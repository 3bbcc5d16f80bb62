"""Give every module of ``src/meanflow`` that lacks one an ``__all__``: the names it defines at its top
level (functions, classes, assignments) that do not start with an underscore, sorted, at the end (before
an ``if __name__ == "__main__":`` block).

Run from the repository root after adding modules (``tests/test_architecture.py`` asks for it):
``python scripts/declare_all.py``. Prints the files it changed; a module's own ``__all__`` is never touched.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "meanflow"


def defined_names(tree: ast.Module) -> list[str]:
    """Public names bound by the module's top-level statements (imports excluded)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return sorted(n for n in names if not n.startswith("_"))


def declaration(names: list[str], width: int = 120) -> str:
    """``__all__ = [...]`` wrapped at ``width`` characters."""
    lines, line = [], "__all__ = ["
    for i, name in enumerate(names):
        item = f'"{name}"' + (", " if i < len(names) - 1 else "")
        if len(line) + len(item) > width:
            lines.append(line.rstrip())
            line = "           "
        line += item
    return "\n".join([*lines, line + "]"]) + "\n"


def main() -> None:
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        declared = any(isinstance(n, (ast.Assign, ast.AnnAssign)) and "__all__" in ast.dump(n.targets[0] if isinstance(n, ast.Assign) else n.target)
                       for n in tree.body)
        if declared or path.name == "__main__.py":
            continue
        main_block = next((n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.dump(n.test)), None)
        lines = text.splitlines(keepends=True)
        cut = main_block.lineno - 1 if main_block else len(lines)  # before an `if __name__ == "__main__":` block
        head, tail = "".join(lines[:cut]).rstrip("\n"), "".join(lines[cut:])
        path.write_text(head + "\n\n\n" + declaration(defined_names(tree)) + ("\n\n" + tail if tail else ""))
        print(path.relative_to(SRC.parents[1]))


if __name__ == "__main__":
    main()
