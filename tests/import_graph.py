"""The project's own import graph, read from the source with ast (nothing is imported).

Nodes are the top-level modules (``features``) and the modules of the ``tools`` package (``tools.synth``,
``tools.bench.common``); an edge is an import statement anywhere in the file, lazy ones inside functions
included. Imports built at run time (``importlib``, ``__import__``) are not seen: the member registry's
pipelines are named by ``members.py`` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Our module name -> its file: every top-level ``*.py`` and every module under ``tools/``."""
    files = {p.stem: p for p in root.glob("*.py")}
    for path in sorted((root / "tools").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(node: ast.AST, known: set[str]) -> set[str]:
    """The modules of ``known`` that one import statement names (``from tools import synth`` -> tools.synth)."""
    if isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
        return set()
    found = set()
    for name in candidates:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts:
            found.add(".".join(parts))
    return found


def imports_in(tree: ast.AST, known: set[str]) -> set[str]:
    return {name for node in ast.walk(tree) for name in imported(node, known)}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file, lazily or not), itself left out."""
    files = module_files(root)
    known = set(files)
    return {name: imports_in(ast.parse(path.read_text()), known) - {name} for name, path in files.items()}


def reachable_definitions(tree: ast.Module, entry: set[str]) -> set[str]:
    """The top-level functions and classes of a module that ``entry`` (names of some of them) reach by naming them.

    A name counts wherever it is read (a call, a callback, a type in an annotation is not a read); a class
    counts with its whole body. Method calls on objects are not followed: their classes come in when named.
    """
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    missing = entry - set(defs)
    if missing:
        raise KeyError(f"not defined at the top of the module: {sorted(missing)}")
    seen: set[str] = set()
    todo = list(entry)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(defs[name]):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in defs:
                todo.append(node.id)
    return seen


def path_imports(path: Path, entry: set[str], known: set[str]) -> set[str]:
    """What running ``entry`` of the module at ``path`` can import: its module-level imports and the imports
    inside the top-level functions and classes that ``entry`` reaches (``reachable_definitions``)."""
    tree = ast.parse(path.read_text())
    defs = reachable_definitions(tree, entry)
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name in defs:
                found |= imports_in(node, known)
        else:
            found |= imports_in(node, known)
    return found


def closure(roots: set[str], edges: dict[str, set[str]]) -> set[str]:
    """``roots`` and everything they import, transitively."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen
