"""The package's layering, read from its source (ast, nothing imported).

The implementation lives in ``jax_megamoe/_src`` in four layers, bottom to top: ``numerics`` ->
``kernels`` -> ``io`` -> ``models`` (docs/architecture.md). A module may import its own layer and the
layers below it, never one above; the package imports form no circle; a package module is imported
at module level, never inside a function (optional third-party dependencies such as tqdm may be
imported where they are used). The public modules (``jax_megamoe/*.py``,
``jax_megamoe/models/...``) are facades above every layer: imports and ``__all__`` only, and no
``_src`` module imports them. ``jax_megamoe._version`` sits below all of them. Each module has one
public name: no import hook, no second path.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jax_megamoe"
ROOT = "jax_megamoe"
SRC = "_src"
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
    if len(parts) >= 3 and parts[1] == SRC and parts[2] in LAYERS:
        return LAYERS.index(parts[2])
    if len(parts) == 2 and parts[1] in ("_version", SRC):
        return -1
    return len(LAYERS)  # the root package and the public modules (facades)


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
                bad.append(f"{where}: imports the public module {target}; use its _src home")
                continue
            if target not in known:
                continue
            if in_func:
                bad.append(f"{where}: imports {target} inside a function")
            if rank(target, root, base) > rank(mod, root, base):
                bad.append(
                    f"{where}: {mod} (layer {rank(mod, root, base)}) imports {target} from a layer above "
                    f"(layer {rank(target, root, base)})"
                )
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


def _public_modules() -> frozenset[str]:
    """The facades: every package module outside ``_src`` (and not the root or ``_version``)."""
    return frozenset(m for m in module_names(PKG) if rank(m) == len(LAYERS) and m != ROOT)


def test_the_package_imports_only_run_downward_with_no_circle():
    assert violations(PKG, aliases=_public_modules()) == []


def test_every_implementation_module_sits_in_a_layer():
    known = module_names(PKG)
    stray = [m for m in known if f".{SRC}." in m and rank(m) == len(LAYERS)]
    assert stray == [], f"modules under _src outside numerics/kernels/io/models: {stray}"
    for layer in LAYERS:
        assert (PKG / SRC / layer / "__init__.py").is_file()


def test_public_modules_are_thin():
    """A public module holds a docstring, imports, ``__all__`` and at most a ``__main__`` guard."""
    fat = []
    for mod in sorted(_public_modules()):
        tree = ast.parse(module_names(PKG)[mod].read_text())
        for node in tree.body:
            ok = (
                isinstance(node, (ast.Import, ast.ImportFrom))
                or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
                or (isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__all__"])
                or (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
            )
            if not ok:
                fat.append(f"{mod}:{node.lineno}: {ast.unparse(node)[:60]}")
    assert fat == []


def test_allowlist_is_empty():
    assert ALLOWED == {}


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fake"
    for rel, text in files.items():
        p = pkg / SRC / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (pkg / "__init__.py").parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").touch()
    for d in [SRC, *(f"{SRC}/{layer}" for layer in LAYERS)]:
        (pkg / d / "__init__.py").parent.mkdir(parents=True, exist_ok=True)
        (pkg / d / "__init__.py").touch()
    return pkg


def test_the_checker_catches_an_upward_import(tmp_path):
    pkg = _write(tmp_path, {"numerics/a.py": "from fake._src.io import b\n", "io/b.py": "x = 1\n"})
    bad = violations(pkg, root="fake")
    assert (
        len(bad) == 1 and "fake._src.numerics.a (layer 0) imports fake._src.io.b from a layer above (layer 2)" in bad[0]
    )


def test_the_checker_catches_a_circle_inside_a_layer(tmp_path):
    pkg = _write(tmp_path, {"io/a.py": "from fake._src.io import b\n", "io/b.py": "import fake._src.io.a\n"})
    bad = violations(pkg, root="fake")
    assert bad == ["import circle: fake._src.io.a -> fake._src.io.b -> fake._src.io.a"]


def test_the_checker_catches_function_level_and_relative_imports(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "kernels/a.py": "def f():\n    from fake._src.numerics import c\n    import json\n    import tqdm\n",
            "kernels/b.py": "from ..models import m\n",
            "numerics/c.py": "",
            "models/m.py": "",
        },
    )
    bad = violations(pkg, root="fake")
    assert any("imports fake._src.numerics.c inside a function" in b for b in bad)
    assert any("imports json inside a function" in b for b in bad)
    assert not any("tqdm" in b for b in bad)  # an optional dependency
    assert any("fake._src.kernels.b (layer 1) imports fake._src.models.m from a layer above" in b for b in bad)
    assert len(bad) == 3


def test_the_checker_catches_an_import_of_a_facade(tmp_path):
    pkg = _write(tmp_path, {"models/a.py": "from fake import ops\n"})
    assert violations(pkg, root="fake", aliases=frozenset({"fake.ops"})) == [
        "fake/_src/models/a.py:1: imports the public module fake.ops; use its _src home"
    ]


PUBLIC = ("ops", "reference", "quant", "layout", "policy", "parallel", "checkpoint", "convert", "models.deepseek_v4")
GONE = (
    "kernels.ops", "numerics.layout", "numerics.reference", "io.checkpoint", "kernels.parallel", "parallel_hier",
    "config", "_ffi", "_toolchain", "io", "kernels", "numerics",
)  # fmt: skip


def test_each_module_has_one_public_name():
    """The public names import; the old layered and flat paths do not; no import hook is installed."""
    code = (
        "import importlib, sys\n"
        "import jax_megamoe\n"
        "ours = [f for f in sys.meta_path if getattr(type(f), '__module__', '').startswith('jax_megamoe')]\n"
        "assert ours == [], ours\n"
        f"for m in {PUBLIC!r}:\n"
        "    mod = importlib.import_module('jax_megamoe.' + m)\n"
        "    assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__), m\n"
        f"for m in {GONE!r}:\n"
        "    try:\n"
        "        importlib.import_module('jax_megamoe.' + m)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise AssertionError('still importable: jax_megamoe.' + m)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
