"""Every public entry of the package has complete type hints (issue 16).

Walks the public modules (the top-level ``jax_megamoe`` namespace and every module outside
``jax_megamoe/_src``: ``jax_megamoe.ops``, ``.reference``, ..., ``.models.deepseek_v4``), takes
each module's public names (its ``__all__``; without one, the top-level names not starting with
``_`` that the module itself defines) and, for every public function, every public class's
``__init__``/``__call__`` and every public method or property defined in a public class, asserts
that each parameter (``self``/``cls`` aside; ``*args``/``**kwargs`` included) and the return
type are annotated. The hints are resolved with :func:`typing.get_type_hints`, so a string
annotation (``from __future__ import annotations``) that names nothing fails too. One failure
lists every offender.

The public modules re-export the implementation in ``jax_megamoe._src``; the walk inspects every
object once (by identity), named by its home in ``_src``, wherever it is re-exported.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import jax_megamoe

ROOT = "jax_megamoe"
#: Dunder methods that are public API of a class (the constructor and a module's call).
PUBLIC_DUNDERS = ("__init__", "__call__")


def public_modules() -> list[types.ModuleType]:
    """The top-level package, the layer packages and every public module under them."""
    names = [ROOT]
    pkg_dir = Path(jax_megamoe.__file__).parent
    for info in pkgutil.walk_packages([str(pkg_dir)], prefix=f"{ROOT}."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        rel = Path(*info.name.split(".")[1:])
        if info.ispkg or (pkg_dir / rel).with_suffix(".py").is_file():  # Python modules, not the FFI .so
            names.append(info.name)
    return [importlib.import_module(n) for n in names]


def public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or the names the module defines itself that do not start with ``_``."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    out = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if getattr(obj, "__module__", None) == module.__name__ and (inspect.isclass(obj) or callable(obj)):
            out.append(name)
    return out


def _function_of(obj: object) -> Callable[..., object] | None:
    """The plain Python function behind ``obj`` (jit wrappers, functools.wraps and partials unwrapped)."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        return obj
    return None


def check_function(func: Callable[..., object], where: str, *, bound: bool = False) -> list[str]:
    """Offences of one function: unresolvable hints, unannotated parameters, no return annotation.

    ``bound``: the first parameter is ``self``/``cls`` and needs no annotation.
    """
    try:
        hints = typing.get_type_hints(func)
    except Exception as e:  # a string annotation naming nothing, a bad forward reference
        return [f"{where}: typing.get_type_hints fails: {type(e).__name__}: {e}"]
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return []  # a builtin without a signature: nothing to annotate
    params = list(sig.parameters.values())
    if bound and params:
        params = params[1:]
    missing = [
        ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
        for p in params
        if p.name not in hints
    ]
    out = []
    if missing:
        out.append(f"{where}: parameter(s) without a type hint: {', '.join(missing)}")
    if "return" not in hints:
        out.append(f"{where}: no return type hint")
    return out


def _class_members(cls: type) -> Iterator[tuple[str, Callable[..., object], bool]]:
    """``(name, function, bound)`` of the public functions defined in ``cls`` itself."""
    for name, attr in vars(cls).items():
        if name.startswith("_") and name not in PUBLIC_DUNDERS:
            continue
        if isinstance(attr, property):
            for part, f in (("fget", attr.fget), ("fset", attr.fset)):
                if f is not None:
                    yield f"{name}.{part}" if part == "fset" else name, f, True
            continue
        func = _function_of(attr)
        if func is None or getattr(func, "__module__", None) != cls.__module__:
            continue  # not a function, or one the class got from elsewhere (typing.Protocol's __init__)
        yield name, func, not isinstance(attr, staticmethod)


def check_modules(modules: list[types.ModuleType]) -> tuple[int, list[str], list[str]]:
    """``(functions inspected, offences, inspected names)`` over the public names of ``modules``."""
    seen: set[int] = set()
    offences: list[str] = []
    inspected: list[str] = []

    def check(func: Callable[..., object], where: str, bound: bool) -> None:
        if id(func) in seen:
            return
        seen.add(id(func))
        inspected.append(where)
        offences.extend(check_function(func, where, bound=bound))

    for module in modules:
        for name in public_names(module):
            if not hasattr(module, name):
                offences.append(f"{module.__name__}.__all__ names {name!r}, which the module does not define")
                continue
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue  # a submodule: walked as a module of its own
            home = f"{getattr(obj, '__module__', module.__name__)}.{getattr(obj, '__qualname__', name)}"
            if inspect.isclass(obj):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                try:  # the class's own annotations (dataclass and NamedTuple fields) must resolve too
                    typing.get_type_hints(obj)
                except Exception as e:
                    offences.append(f"{home}: typing.get_type_hints fails on its fields: {type(e).__name__}: {e}")
                for member, func, bound in _class_members(obj):
                    check(func, f"{home}.{member}", bound)
                continue
            func = _function_of(obj)
            if func is not None:
                check(func, home, False)
            elif callable(obj) and getattr(obj, "__module__", None) != "typing":  # type aliases (Mode) pass
                offences.append(f"{home}: a public callable that is not a function, cannot be inspected")
    return len(inspected), offences, inspected


def test_public_api_has_complete_type_hints() -> None:
    modules = public_modules()
    count, offences, inspected = check_modules(modules)
    # A walk that finds nothing would pass vacuously: insist it saw the package's main entries.
    assert count >= 100, f"only {count} public functions inspected: {inspected}"
    for entry in (
        "jax_megamoe._src.kernels.ops.mega_moe",
        "jax_megamoe._src.kernels.parallel.ep_moe",
        "jax_megamoe._src.numerics.reference.mega_moe",
        "jax_megamoe._src.numerics.policy.Policy.from_environ",
        "jax_megamoe.register",
    ):
        assert entry in inspected, f"{entry} was not inspected"
    assert not offences, f"{len(offences)} public entries lack type hints:\n  " + "\n  ".join(offences)


def test_the_walk_sees_each_public_module_once_and_no_private_one() -> None:
    names = [m.__name__ for m in public_modules()]
    assert len(names) == len(set(names))
    assert {"jax_megamoe.ops", "jax_megamoe.parallel", "jax_megamoe.models.deepseek_v4"} <= set(names)
    assert not [n for n in names if "._" in n]


# ---- the checker itself catches what it must (so the test above can fail) ----


def _unannotated(a, b: int, *rest, **extra):  # noqa: ANN001, ANN202 (deliberately unannotated)
    return a


def _annotated(a: int, *rest: str, **extra: float) -> int:
    return a


def _bad_forward_ref(a: NoSuchType) -> int:  # noqa: F821 (deliberately names nothing)
    return 0


class _Sample:
    def __init__(self, x: int):  # no return hint
        self.x = x

    def good(self, y: int) -> int:
        return self.x + y

    def bad(self, y):  # noqa: ANN001, ANN201
        return y

    @staticmethod
    def static_bad(z) -> int:  # noqa: ANN001
        return z

    @property
    def prop(self):  # noqa: ANN201
        return self.x

    def _private(self, y):  # noqa: ANN001, ANN202 (private: not checked)
        return y


@dataclasses.dataclass(frozen=True)
class _Fields:
    a: int
    b: typing.Optional[str] = None  # noqa: UP045


class _BadFields(typing.NamedTuple):
    a: int
    b: NoSuchFieldType  # noqa: F821 (deliberately names nothing)


def test_checker_reports_unannotated_function() -> None:
    out = check_function(_unannotated, "f")
    assert out == ["f: parameter(s) without a type hint: a, *rest, **extra", "f: no return type hint"]
    assert check_function(_annotated, "g") == []


def test_checker_reports_unresolvable_hint() -> None:
    (out,) = check_function(_bad_forward_ref, "h")
    assert "get_type_hints fails" in out and "NoSuchType" in out


def test_checker_walks_classes_and_modules() -> None:
    mod = types.ModuleType("fake_public")
    mod.__all__ = ["Sample", "Fields", "BadFields", "unannotated", "annotated", "missing"]
    mod.Sample, mod.Fields, mod.unannotated, mod.annotated = _Sample, _Fields, _unannotated, _annotated
    mod.BadFields = _BadFields
    count, offences, inspected = check_modules([mod, mod])  # the same module twice: counted once
    text = "\n".join(offences)
    prefix = f"{__name__}._Sample"
    assert f"{prefix}.__init__: no return type hint" in text
    assert f"{prefix}.bad: parameter(s) without a type hint: y" in text
    assert f"{prefix}.static_bad: parameter(s) without a type hint: z" in text
    assert f"{prefix}.prop: no return type hint" in text
    assert f"{__name__}._unannotated: parameter(s) without a type hint: a, *rest, **extra" in text
    assert "names 'missing', which the module does not define" in text
    assert f"{__name__}._BadFields: typing.get_type_hints fails on its fields" in text and "NoSuchFieldType" in text
    assert f"{prefix}.good" in inspected and f"{prefix}._private" not in inspected
    assert not any("good" in o or "_Fields" in o or "_annotated:" in o for o in offences), offences
    # _Sample: __init__, good, bad, static_bad, prop; _Fields: its generated __init__; 2 functions
    assert count == 8, inspected


def test_public_names_without_all() -> None:
    """Without ``__all__``: the module's own top-level callables, not its imports or private names."""
    from jax_megamoe._src.kernels import ops

    assert not hasattr(ops, "__all__")
    names = public_names(ops)
    assert "mega_moe" in names
    assert "jax" not in names and "partial" not in names
    assert not any(n.startswith("_") for n in names)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
