"""Trace-time argument checks shared by every public entry point.

Every message names the argument, the value it got and what was expected, so a user
reading a traceback from deep inside a jitted model knows which call to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: An array argument of a public function: a JAX array (concrete or traced) or a NumPy array.
ArrayIn = jax.Array | np.ndarray


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def check_dtype(name: str, x: Any, allowed: Any) -> None:
    """Raise TypeError unless ``x.dtype`` is one of ``allowed`` (a dtype or a sequence of them)."""
    if not isinstance(allowed, (list, tuple)):
        allowed = (allowed,)
    dt = np.dtype(x.dtype)
    if not any(dt == np.dtype(a) for a in allowed):
        want = " or ".join(dtype_name(a) for a in allowed)
        raise TypeError(f"{name}: dtype {dt.name} is not supported; expected {want}")


def check_ndim(name: str, x: Any, ndim: int) -> None:
    if len(x.shape) != ndim:
        raise ValueError(f"{name}: expected a rank-{ndim} array, got shape {tuple(x.shape)}")


def check_shape(name: str, x: Any, shape: Sequence[int | None]) -> None:
    """Raise ValueError unless ``x.shape`` matches ``shape`` (``None`` matches any size)."""
    got = tuple(x.shape)
    if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(got)}")


def check_multiple(name: str, value: int, multiple: int, what: str = "") -> None:
    if value % multiple != 0:
        what = f" ({what})" if what else ""
        raise ValueError(f"{name}: {value}{what} must be a multiple of {multiple}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name}: {value} is outside the allowed range [{lo_s}, {hi_s}]")


def is_traced(value: Any) -> bool:
    """True for a JAX tracer (a value only known when the jitted program runs)."""
    return isinstance(value, jax.core.Tracer)


def _real_scalar(name: str, value: Any, expected: str) -> float:
    """``value`` as a Python float when it is a concrete real scalar; else a TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: got {value!r} ({type(value).__name__}); expected {expected}")
    arr = np.asarray(value) if hasattr(value, "dtype") or isinstance(value, (int, float, np.generic)) else None
    if arr is None or arr.shape != () or arr.dtype.kind not in "iuf":
        raise TypeError(f"{name}: got {value!r} ({type(value).__name__}); expected {expected}")
    return float(arr)


def static_float(
    name: str,
    value: Any,
    *,
    allow_none: bool = False,
    lo: float | None = None,
    finite: bool = False,
    why: str = "",
) -> float | None:
    """``value`` as a static Python float: rejects tracers, strings, arrays and NaN with a message
    naming ``name`` (TypeError for the wrong kind of value, ValueError for one out of range).

    ``why`` (e.g. "it is a kernel attribute") is added to the tracer message so a user inside
    ``jax.jit`` knows why the value must be static.
    """
    expected = "a static Python float" + (" or None" if allow_none else "")
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name}: got None; expected {expected}")
    if is_traced(value):
        because = f" ({why})" if why else ""
        raise TypeError(
            f"{name}: got a traced value inside jax.jit; expected {expected}{because}: pass a Python "
            "number, or mark the argument static (static_argnames)"
        )
    f = _real_scalar(name, value, expected)
    if math.isnan(f) or (finite and math.isinf(f)):
        raise ValueError(f"{name}: {value} must be a {'finite ' if finite else ''}number, not {f}")
    if lo is not None and f < lo:
        raise ValueError(f"{name}: {value} must be >= {lo}")
    return f


def static_int(name: str, value: Any, *, lo: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as a static Python int (Python/NumPy integers; not bool, float or a tracer)."""
    expected = "a static Python int" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return None
    if is_traced(value):
        raise TypeError(f"{name}: got a traced value inside jax.jit; expected {expected}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: got {value!r} ({type(value).__name__}); expected {expected}")
    n = int(value)
    if lo is not None and n < lo:
        raise ValueError(f"{name}: {n} must be >= {lo}")
    return n


def check_routing(x: Any, topk_idx: Any, topk_weights: Any) -> tuple[int, int, int]:
    """``(T, H, K)`` of a call's routing inputs: ``x`` bf16 ``[T, H]``, ``topk_idx`` int32/int64
    ``[T, K]`` (``K >= 1``), ``topk_weights`` f32 ``[T, K]``; errors name the argument."""
    check_ndim("x", x, 2)
    check_dtype("x", x, jnp.bfloat16)
    t, h = x.shape
    check_ndim("topk_idx", topk_idx, 2)
    check_dtype("topk_idx", topk_idx, (jnp.int32, jnp.int64))
    check_shape("topk_idx", topk_idx, (t, None))
    k = topk_idx.shape[1]
    if k < 1:
        raise ValueError(f"topk_idx: needs at least one top-k slot, got shape {list(topk_idx.shape)}")
    check_ndim("topk_weights", topk_weights, 2)
    check_dtype("topk_weights", topk_weights, jnp.float32)
    check_shape("topk_weights", topk_weights, (t, k))
    return t, h, k


def check_instance(name: str, value: Any, cls: type, expected: str) -> Any:
    """``value`` when it is a ``cls``; else a TypeError naming ``name`` and ``expected``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected {expected} or None, got {type(value).__name__}")
    return value
