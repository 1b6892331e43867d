"""The one progress-bar helper of the package (checkpoint reading, FP4 -> FP8 conversion, the
random expert generator of the model).

A *progress sink* is ``bar(done)`` + ``bar.close()``; :func:`make_progress` builds one from what a
user passes as ``progress=`` (None/False, True, ``"text"`` or a callable ``progress(done, total)``).
:func:`text_progress_bar` is the plain text bar as a ``progress(done, total)`` callable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

__all__ = ["ProgressArg", "ProgressSink", "TextBar", "make_progress", "text_progress_bar"]

#: What a user passes as ``progress=``: None/False (none), True (tqdm or the text bar), ``"text"``
#: (the text bar) or a callable ``progress(done, total)``.
ProgressArg = bool | str | Callable[[int, int], None] | None


class ProgressSink(Protocol):
    """What :func:`make_progress` returns: ``bar(done)`` reports progress, ``bar.close()`` ends it."""

    def __call__(self, done: int) -> None: ...

    def close(self) -> None: ...


class TextBar:
    """A plain text progress bar (stderr by default), redrawn when the whole percent changes.

    ``unit="B"`` shows byte counts in MiB/GiB; any other unit shows ``done/total unit``. Call it as
    ``bar(done)`` or ``bar(done, total)`` (the second form updates the total).
    """

    def __init__(
        self, total: int, desc: str = "", unit: str = "it", stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.total, self.desc, self.unit, self.width = max(int(total), 1), desc, unit, width
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.last = -1

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
        pct = 100 * done // self.total
        if pct == self.last and done < self.total:
            return
        self.last = pct
        n = self.width * min(done, self.total) // self.total
        el = time.perf_counter() - self.t0
        if self.unit == "B":
            unit, div = ("GiB", 2**30) if self.total >= 2**30 else ("MiB", 2**20)
            count = f"{pct:3d}% {done / div:.2f}/{self.total / div:.2f} {unit}"
        else:
            count = f"{done}/{self.total} {self.unit}"
        self.stream.write(f"\r{self.desc} [{'#' * n}{'.' * (self.width - n)}] {count} {el:.1f}s")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, total: int, desc: str, unit: str) -> None:
        from tqdm import tqdm  # optional dependency: ImportError falls back to TextBar

        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
        self.n = 0

    def __call__(self, done: int) -> None:
        if done > self.n:
            self.bar.update(done - self.n)
            self.n = done

    def close(self) -> None:
        self.bar.close()


class _CallbackBar:
    def __init__(self, fn: Callable[[int, int], None], total: int) -> None:
        self.fn, self.total = fn, total

    def __call__(self, done: int) -> None:
        self.fn(done, self.total)

    def close(self) -> None:
        pass


def make_progress(progress: ProgressArg, total: int, desc: str, unit: str = "it") -> ProgressSink | None:
    """A progress sink ``bar(done)`` + ``bar.close()``, or None.

    ``progress``: None/False (none), True (tqdm on stderr if installed, else a text bar on
    stderr), ``"text"`` (the text bar), or a callable ``progress(done, total)``.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            return _TqdmBar(total, desc, unit)
        except ImportError:
            return TextBar(total, desc, unit)
    if progress == "text":
        return TextBar(total, desc, unit)
    if callable(progress):
        return _CallbackBar(progress, total)
    raise TypeError(
        f"progress: expected None, a bool, 'text' or a callable(done, total), got {type(progress).__name__}"
    )


def text_progress_bar(desc: str = "", stream: TextIO | None = None, width: int = 30) -> Callable[[int, int], None]:
    """A plain text progress bar on stderr as a ``progress(done, total)`` callable (bytes)."""
    return TextBar(1, desc, "B", stream=stream, width=width)
