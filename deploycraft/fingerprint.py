"""A fingerprint of the code a stage runs: its module, every deploycraft module it imports (statically,
transitively), and the versions of the numerical libraries among their imports.

It joins the stage's cache key, so editing a stage's code (or what it calls) re-runs that stage and
the stages after it, while editing code no stage runs (the report renderer, the CLI) re-runs nothing.
Each module is hashed as its syntax tree without docstrings, so comments, formatting and docs do not
count, and without ``report_section`` functions: how a stage is reported is not how it computes.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import sys
from functools import cache
from pathlib import Path

PACKAGE = "deploycraft"
ROOT = Path(__file__).resolve().parent
# Third-party packages whose version can change a stage's numbers (import name -> distribution name).
NUMERICAL = {
    "torch": "torch",
    "numpy": "numpy",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "torch_pruning": "torch-pruning",
    "openvino": "openvino",
    "tensorrt": "tensorrt",
    "PIL": "pillow",
}
NOT_CODE = {"report_section"}  # functions that render, never compute


def _module_path(name: str) -> Path | None:
    if name == PACKAGE:
        return ROOT / "__init__.py"
    if not name.startswith(PACKAGE + "."):
        return None
    rel = Path(*name.split(".")[1:])
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not _module_path(importer) or _module_path(importer).name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _strip(tree: ast.Module) -> ast.Module:
    """Drop docstrings and report_section functions: what is left is what computes."""

    class Stripper(ast.NodeTransformer):
        def _body(self, node):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    body = body[1:] or [ast.Pass()]
            node.body = [n for n in body if not (isinstance(n, ast.FunctionDef) and n.name in NOT_CODE)]
            return node

        def visit_Module(self, node):
            self.generic_visit(node)
            return self._body(node)

        def visit_ClassDef(self, node):
            self.generic_visit(node)
            return self._body(node)

        def visit_FunctionDef(self, node):
            self.generic_visit(node)
            return self._body(node)

        visit_AsyncFunctionDef = visit_FunctionDef

    return Stripper().visit(tree)


def _walk_code(tree: ast.AST):
    """ast.walk, skipping ``if TYPE_CHECKING:`` blocks (imports for type hints run nothing)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


@cache
def _parse(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(hash of the stripped tree, deploycraft modules it imports, third-party top-level names)."""
    path = _module_path(name)
    tree = _strip(ast.parse(path.read_text(encoding="utf-8")))
    ours, theirs = set(), set()
    for node in _walk_code(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node)
            targets = [mod]
            # `from deploycraft.x import y` may name a module y
            targets += [f"{mod}.{a.name}" for a in node.names if _module_path(f"{mod}.{a.name}")]
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                if _module_path(t) is not None and t != PACKAGE:
                    ours.add(t)
            elif t:
                theirs.add(t.split(".")[0])
    if "pkgutil" in theirs:  # a discovery module (models/zoo.py): it imports every module of its package
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        ours.update(f"{package}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__")
        ours.discard(name)
    digest = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()
    return digest, tuple(sorted(ours)), tuple(sorted(theirs))


def closure(*modules: str) -> list[str]:
    """The deploycraft modules reachable from ``modules`` by imports (the modules included)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen or _module_path(m) is None:
            continue
        seen.add(m)
        todo.extend(_parse(m)[1])
    return sorted(seen)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def fingerprint(*modules: str) -> dict:
    """{"sha256": ..., "modules": n, "libraries": {name: version}} of the code reachable from ``modules``."""
    mods = closure(*modules)
    h = hashlib.sha256()
    libs: set[str] = set()
    for m in mods:
        digest, _, theirs = _parse(m)
        h.update(f"{m}:{digest}\n".encode())
        libs.update(t for t in theirs if t in NUMERICAL)
    versions = {lib: _version(NUMERICAL[lib]) for lib in sorted(libs)}
    versions = {k: v for k, v in versions.items() if v is not None}
    h.update(repr(sorted(versions.items())).encode())
    h.update(f"python{sys.version_info.major}.{sys.version_info.minor}".encode())
    return {"sha256": h.hexdigest(), "modules": len(mods), "libraries": versions}
