"""The package's layering, read from its source (ast, nothing imported).

Layers, bottom to top: ``numerics`` -> ``kernels`` -> ``io`` -> ``models`` (docs/architecture.md).
A module may import its own layer and the layers below it, never one above; the package imports
form no circle; a package module is imported at module level, never inside a function (optional
third-party dependencies such as tqdm may be imported where they are used). The root
``jax_megamoe/__init__.py`` is the facade above every layer; ``jax_megamoe._version`` sits below
all of them. Inside the package the flat alias names (``jax_megamoe.ops``, ...) are not used.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path


PKG = Path(__file__).resolve().parents[1] / "jax_megamoe"
ROOT = "jax_megamoe"
LAYERS = ("numerics", "kernels", "io", "models")
#: Modules outside the four layers: rank -1 (below all), the facade rank len(LAYERS) (above all).
BASE_MODULES = {f"{ROOT}._version"}
#: (module, imported module) pairs allowed to break a rule, with the reason. Keep it empty.
ALLOWED: dict[tuple[str, str], str] = {}
#: Third-party modules that may be imported inside a function (optional dependencies).
OPTIONAL_DEPENDENCIES = {"tqdm", "tokamax", "matplotlib", "safetensors"}


def module_names(pkg: Path, root: str = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg).with_suffix("")
        parts = [root, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def rank(mod: str, root: str = ROOT, base: frozenset[str] | set[str] = frozenset(BASE_MODULES)) -> int:
    if mod in base:
        return -1
    parts = mod.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if len(parts) >= 2 and parts[1] == "_version":
        return -1
    return len(LAYERS)  # the root package (facade)


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The package module an import of ``name`` loads (the longest known prefix)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return name


def imports_of(
    mod: str, path: Path, known: dict[str, Path], root: str = ROOT, aliases: frozenset[str] = frozenset()
) -> list[tuple[str, int, bool, str]]:
    """``(imported module, line, inside a function, top-level name)`` for every import in ``path``.

    The imported module is a package module where the import names one, else the third-party name.
    """
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = mod if is_pkg else mod.rsplit(".", 1)[0]
    out: list[tuple[str, int, bool, str]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    target = a.name if a.name in aliases else _resolve(a.name, known)
                    out.append((target, child.lineno, f, a.name.split(".")[0]))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    src = ".".join(base + ([child.module] if child.module else []))
                else:
                    src = child.module or ""
                if src.split(".")[0] != root:
                    out.append((src, child.lineno, f, src.split(".")[0]))
                    continue
                for a in child.names:
                    sub = f"{src}.{a.name}"
                    target = sub if sub in known or sub in aliases else _resolve(src, known)
                    out.append((target, child.lineno, f, root))
            elif isinstance(child, ast.Call) and _is_import_module_call(child):
                arg = child.args[0] if child.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    out.append((_resolve(arg.value, known), child.lineno, f, arg.value.split(".")[0]))
            visit(child, f)

    visit(tree, False)
    return out


def _is_import_module_call(node: ast.Call) -> bool:
    fn = node.func
    return (isinstance(fn, ast.Attribute) and fn.attr == "import_module") or (
        isinstance(fn, ast.Name) and fn.id in ("import_module", "__import__")
    )


def violations(pkg: Path, root: str = ROOT, aliases: frozenset[str] = frozenset()) -> list[str]:
    """Every broken rule in the package at ``pkg`` (one line each; empty when the layering holds)."""
    known = module_names(pkg, root)
    base = {f"{root}._version"}
    bad: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for target, line, in_func, top in imports_of(mod, path, known, root, aliases):
            where = f"{path.relative_to(pkg.parent)}:{line}"
            if top != root:
                if in_func and top not in OPTIONAL_DEPENDENCIES:
                    bad.append(f"{where}: imports {target} inside a function (only optional dependencies may be)")
                continue
            if (mod, target) in ALLOWED:
                continue
            if target in aliases:
                bad.append(f"{where}: imports the flat alias {target}; use its layered name")
                continue
            if target not in known:
                continue
            if in_func:
                bad.append(f"{where}: imports {target} inside a function")
            if rank(target, root, base) > rank(mod, root, base):
                bad.append(f"{where}: {mod} (layer {rank(mod, root, base)}) imports {target} from a layer above "
                           f"(layer {rank(target, root, base)})")
            if target != mod and not in_func:
                graph[mod].add(target)
    # Every package also runs its parents' __init__ first: edges child -> parent package are implicit
    # and harmless unless a parent imports the child back, which the cycle search below sees.
    bad.extend(f"import circle: {' -> '.join(c)}" for c in _cycles(graph))
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative circle per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _aliases() -> frozenset[str]:
    return frozenset(_alias_table())


def test_the_package_imports_only_run_downward_with_no_circle():
    assert violations(PKG, aliases=_aliases()) == []


def test_every_module_sits_in_a_layer():
    stray = [m for m in module_names(PKG) if rank(m) == len(LAYERS) and m != ROOT]
    assert stray == [], f"modules outside numerics/kernels/io/models: {stray}"
    for layer in LAYERS:
        assert (PKG / layer / "__init__.py").is_file()


def test_allowlist_is_empty():
    assert ALLOWED == {}


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fake"
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in ["", *LAYERS]:
        (pkg / d / "__init__.py").parent.mkdir(parents=True, exist_ok=True)
        (pkg / d / "__init__.py").touch()
    return pkg


def test_the_checker_catches_an_upward_import(tmp_path):
    pkg = _write(tmp_path, {"numerics/a.py": "from fake.io import b\n", "io/b.py": "x = 1\n"})
    bad = violations(pkg, root="fake")
    assert len(bad) == 1 and "fake.numerics.a (layer 0) imports fake.io.b from a layer above (layer 2)" in bad[0]


def test_the_checker_catches_a_circle_inside_a_layer(tmp_path):
    pkg = _write(tmp_path, {"io/a.py": "from fake.io import b\n", "io/b.py": "import fake.io.a\n"})
    bad = violations(pkg, root="fake")
    assert bad == ["import circle: fake.io.a -> fake.io.b -> fake.io.a"]


def test_the_checker_catches_function_level_and_relative_imports(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "kernels/a.py": "def f():\n    from fake.numerics import c\n    import json\n    import tqdm\n",
            "kernels/b.py": "from ..models import m\n",
            "numerics/c.py": "",
            "models/m.py": "",
        },
    )
    bad = violations(pkg, root="fake")
    assert any("imports fake.numerics.c inside a function" in b for b in bad)
    assert any("imports json inside a function" in b for b in bad)
    assert not any("tqdm" in b for b in bad)  # an optional dependency
    assert any("fake.kernels.b (layer 1) imports fake.models.m from a layer above" in b for b in bad)
    assert len(bad) == 3


def test_the_checker_catches_a_flat_alias(tmp_path):
    pkg = _write(tmp_path, {"models/a.py": "from fake import ops\n"})
    assert violations(pkg, root="fake", aliases=frozenset({"fake.ops"})) == [
        "fake/models/a.py:1: imports the flat alias fake.ops; use its layered name"
    ]


FLAT = {
    "ops": "kernels.ops", "parallel": "kernels.parallel", "_ffi": "kernels._ffi", "_toolchain": "kernels._toolchain",
    "config": "numerics.config", "policy": "numerics.policy", "quant": "numerics.quant", "layout": "numerics.layout",
    "reference": "numerics.reference", "_validate": "numerics._validate", "checkpoint": "io.checkpoint",
    "convert": "io.convert", "parallel_hier": "kernels.parallel_hier",
}  # fmt: skip


def test_flat_names_are_the_layered_modules():
    """Old import paths give the very module object, named by its layered home (in a fresh
    interpreter, the flat name imported before its home)."""
    assert {f"{ROOT}.{k}": f"{ROOT}.{v}" for k, v in FLAT.items()} == _alias_table()
    code = (
        "import importlib\n"
        f"for old, new in {FLAT!r}.items():\n"
        "    a = importlib.import_module(f'jax_megamoe.{old}')\n"
        "    b = importlib.import_module(f'jax_megamoe.{new}')\n"
        "    c = getattr(importlib.import_module('jax_megamoe'), old)\n"
        "    assert a is b is c, (old, a, b, c)\n"
        "    assert a.__name__ == a.__spec__.name == f'jax_megamoe.{new}', (a.__name__, a.__spec__.name)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _alias_table() -> dict[str, str]:
    tree = ast.parse((PKG / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_ALIASES":
            return ast.literal_eval(node.value)
    raise AssertionError("jax_megamoe/__init__.py has no _ALIASES table")
