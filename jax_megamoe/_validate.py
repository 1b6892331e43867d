"""Trace-time argument checks shared by every public entry point.

Every message names the argument, the value it got and what was expected, so a user
reading a traceback from deep inside a jitted model knows which call to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


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
