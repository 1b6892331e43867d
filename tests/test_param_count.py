"""No function in jax_megamoe/ takes more than 8 parameters: long lists of static options are
grouped into one frozen spec (``ops.MoEOptions``, ``parallel.EPOptions``, ``ops.MegaMoECall``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_megamoe"
LIMIT = 8


def param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional and keyword-only parameters, not counting self/cls, ``*args`` or ``**kwargs``."""
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


def offenders(source: str, where: str = "<src>", limit: int = LIMIT) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = param_count(node)
            if n > limit:
                out.append(f"{where}:{node.lineno} {node.name}: {n} parameters")
    return out


def test_the_count_on_synthetic_functions():
    src = (
        "def ok(a, b, c, d, e, f, g, h): pass\n"
        "def too_many(a, b, c, d, /, e, *, f, g, h, i): pass\n"
        "def star(a, *args, b, **kwargs): pass\n"
        "class K:\n"
        "    def m(self, a, b, c, d, e, f, g, h): pass\n"
        "    @classmethod\n"
        "    def c(cls, a, b, c, d, e, f, g, h, i): pass\n"
        "    def nested(self):\n"
        "        def inner(a, b, c, d, e, f, g, h, i, j): pass\n"
    )
    got = offenders(src)
    assert [o.split(" ")[1] for o in got] == ["too_many:", "c:", "inner:"], got
    assert "9 parameters" in got[0] and "10 parameters" in got[2]
    fn = ast.parse("def f(self, a, *args, b=1, **kw): pass").body[0]
    assert param_count(fn) == 2


def test_no_function_in_the_package_takes_more_than_8_parameters():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += offenders(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "functions with more than 8 parameters (group options into a frozen spec):\n" + "\n".join(found)
