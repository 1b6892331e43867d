"""The policy is the single reader of settings: no module of the package but
``jax_megamoe/_src/numerics/policy.py`` touches the environment, and the C++ library reads no
environment variable (the Python side passes every knob in through its C API)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_megamoe"
POLICY = PACKAGE / "_src" / "numerics" / "policy.py"
FFI = ROOT / "ffi"

_OS_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def env_reads(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every access to the process environment in Python ``source``:
    ``os.environ`` / ``os.getenv`` / ... and those names imported from ``os`` (or ``posix``)."""
    tree = ast.parse(source)
    modules = {"os", "posix"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name in ("os", "posix") and a.asname}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _OS_NAMES:
            if isinstance(node.value, ast.Name) and node.value.id in modules:
                hits.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix"):
            for a in node.names:
                if a.name in _OS_NAMES:
                    hits.append((node.lineno, f"from {node.module} import {a.name}"))
    return hits


_GETENV = re.compile(r"\b(?:secure_)?getenv\s*\(")


def cxx_getenv_calls(source: str) -> list[int]:
    """Lines of ``source`` (C/C++) that call ``getenv`` outside comments."""
    no_block = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), source, flags=re.S)
    out = []
    for i, line in enumerate(no_block.splitlines(), 1):
        code = line.split("//", 1)[0]
        if _GETENV.search(code):
            out.append(i)
    return out


def test_the_checkers_find_what_they_look_for():
    bad = (
        "import os\nimport os as o\nfrom os import getenv\n"
        "a = os.environ.get('X')\nb = o.getenv('Y')\nc = os.path.join('a')\n# os.environ in a comment\n"
    )
    assert sorted(w for _, w in env_reads(bad)) == ["from os import getenv", "o.getenv", "os.environ"]
    assert env_reads("import os\nx = os.path.exists('a')  # os.environ\n'''os.getenv'''\n") == []
    assert cxx_getenv_calls('int a = 1; // getenv("X")\n/* std::getenv("Y") */\nauto v = std::getenv("Z");\n') == [3]


def test_only_the_policy_reads_the_environment():
    assert POLICY.is_file()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == POLICY:
            continue
        for line, what in env_reads(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, "environment reads outside policy.py:\n" + "\n".join(offenders)
    assert env_reads(POLICY.read_text()), "policy.py should be the one reader (did it move?)"


def test_the_ffi_library_reads_no_environment_variable():
    offenders = []
    for path in sorted([*FFI.rglob("*.cc"), *FFI.rglob("*.h"), *FFI.rglob("*.cuh")]):
        for line in cxx_getenv_calls(path.read_text(errors="replace")):
            offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, "getenv in the C++ library (pass the value in from the policy):\n" + "\n".join(offenders)
