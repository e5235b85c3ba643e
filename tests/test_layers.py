"""The house rules, checked on the source: layers that only point down, no imports hidden in
functions (but of optional dependencies), files and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "diffaccel"

# bottom to top: a module may import its own layer and the ones below, never one above
LAYERS: list[tuple[str, ...]] = [
    ("errors", "fingerprint", "seeds", "resample", "quant.spec", "solvers.spec", "plan_files"),
    ("plan", "adapters", "eval", "steps", "solvers"),
    ("runtime", "quant"),
    ("calibration",),
    ("methods",),
    ("search",),
    ("zoo", "lm", "targets", "generate", "parallel"),
    ("bench", "report"),
    ("cli", "__main__", ""),  # "" is the package root (diffaccel/__init__.py)
]
OPTIONAL = ("DeepCache", "tgate", "tomesd", "torchao", "optimum", "cache_dit", "psycopg2")
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def modules() -> list[tuple[str, Path, ast.Module]]:
    return [(module_name(p), p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def imported(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffaccel"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.module, node)] + [(n, node) for n in names if (SRC / n.replace(".", "/")).exists()
                                            or (SRC / (n.replace(".", "/") + ".py")).exists()]
        elif isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.startswith("diffaccel")]
    return [(name.removeprefix("diffaccel").lstrip("."), node) for name, node in out]


def test_no_module_imports_a_higher_layer():
    upward = []
    for name, path, tree in modules():
        own = layer_of(name)
        for target, node in imported(tree):
            if target and layer_of(target) > own:
                upward.append(f"{path.relative_to(SRC)}:{node.lineno} {name} (layer {own}) imports {target} "
                              f"(layer {layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_are_only_of_optional_dependencies():
    hidden = []
    for _name, path, tree in modules():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    roots = [node.module or ""]
                elif isinstance(node, ast.Import):
                    roots = [a.name for a in node.names]
                else:
                    continue
                hidden += [f"{path.relative_to(SRC)}:{node.lineno} imports {root} inside {func.name}"
                           for root in roots if root.split(".")[0] not in OPTIONAL]
    assert not hidden, "\n".join(hidden)


def test_files_and_functions_stay_readable():
    long = []
    for _, path, tree in modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long.append(f"{path.relative_to(SRC)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_public_functions_have_type_hints():
    missing = []
    for name, path, tree in modules():
        for node in tree.body:
            functions = [node] if isinstance(node, ast.FunctionDef) else \
                [n for n in node.body if isinstance(n, ast.FunctionDef)] if isinstance(node, ast.ClassDef) else []
            for func in functions:
                if func.name.startswith("_"):
                    continue
                args = [a for a in func.args.args + func.args.kwonlyargs if a.arg not in ("self", "cls")]
                if func.returns is None or any(a.annotation is None for a in args):
                    missing.append(f"{path.relative_to(SRC)}:{func.lineno} {name}.{func.name}")
    assert not missing, "\n".join(missing)
