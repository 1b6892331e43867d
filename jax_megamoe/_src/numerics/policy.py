"""The process policy: every runtime setting of the package, read once, frozen, passed explicitly.

:func:`current` reads the environment the first time it is called (``jax_megamoe.register()``
calls it, and so does the first op that needs a setting) and never again: the result is a frozen,
hashable :class:`Policy`. The ops (:mod:`jax_megamoe._src.kernels.ops`), expert parallelism
(:mod:`jax_megamoe._src.kernels.parallel`) and the model (:class:`~jax_megamoe.models.deepseek_v4.DeepseekV4MoE`)
take it as ``policy=`` and default to :func:`current`. Because the process policy never changes
after it is read, a function traced before and one traced after any change of ``os.environ``
see the same values: there is no stale trace. To run with other values, pass an explicit policy
(``policy=jax_megamoe.policy.current().replace(graph_targets=True)``, or
``Policy.from_environ({...})``) or explicit arguments (``num_max_tokens=``, ``reserved_sms=``):
they are part of the call, hence of what is traced.

Precedence, per setting: **explicit argument** (a ``policy=`` or a keyword such as
``num_max_tokens=``) > ``JAX_MEGAMOE_*`` > the ``SGLANG_OPT_DEEPGEMM_MEGA_MOE_*`` alias > the
default. The two sm_100 mode flags are forwarded once to DeepGEMM's ``DG_USE_FP4_ACTS`` /
``DG_USE_MXF4_KIND`` (set only where absent; a ``DG_*`` already set wins, see
:func:`jax_megamoe._src.numerics.config.forward_env`).

========================  ===========================================================  ==========
field                     variables (first set wins)                                   default
========================  ===========================================================  ==========
``sm100_mode``            JAX_MEGAMOE_USE_FP4_ACTS + JAX_MEGAMOE_USE_MXF4_KIND          fp8xfp4
                          (SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_{FP4_ACTS,MXF4_KIND}; DG_*)
``num_max_tokens``        JAX_MEGAMOE_NUM_MAX_TOKENS,                                   1024
                          SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK
``reserved_sms``          JAX_MEGAMOE_RESERVED_SMS, SGLANG_OPT_DEEPGEMM_MEGA_MOE_RESERVED_SMS  2
``graph_targets``         JAX_MEGAMOE_GRAPH_TARGETS                                     off
``sm100_mega``            JAX_MEGAMOE_SM100_MEGA                                        off
``fused_ep``              JAX_MEGAMOE_FUSED_EP                                          on
``sm90_wide_tile``        JAX_MEGAMOE_SM90_WIDE_TILE                                    off
``jit_cache_dirs``        DG_JIT_CACHE_DIR, DJ_JIT_CACHE_DIR                            ~/.cache/jax_megamoe/jit
``jit_lineinfo``          DG_JIT_WITH_LINEINFO                                          off
``jit_print_commands``    DG_JIT_PRINT_COMPILER_COMMAND or DG_JIT_DEBUG                 off
========================  ===========================================================  ==========

Where the library and the CUDA headers are found (``JAX_MEGAMOE_FFI_LIB``, ``CUDA_HOME``,
``JAX_MEGAMOE_DEEPGEMM_INCLUDE``, ...) is not a runtime policy: the loader reads those once when
it loads the library (:mod:`jax_megamoe._src.kernels._ffi`, :mod:`jax_megamoe._src.kernels._toolchain`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from typing import Any

from jax_megamoe._src.numerics import config

__all__ = ["Policy", "current", "describe", "ENV"]

#: Every variable the policy reads, per field, in precedence order.
ENV: dict[str, tuple[str, ...]] = {
    "num_max_tokens": ("JAX_MEGAMOE_NUM_MAX_TOKENS", "SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK"),
    "reserved_sms": ("JAX_MEGAMOE_RESERVED_SMS", "SGLANG_OPT_DEEPGEMM_MEGA_MOE_RESERVED_SMS"),
    "graph_targets": ("JAX_MEGAMOE_GRAPH_TARGETS",),
    "sm100_mega": ("JAX_MEGAMOE_SM100_MEGA",),
    "fused_ep": ("JAX_MEGAMOE_FUSED_EP",),
    "sm90_wide_tile": ("JAX_MEGAMOE_SM90_WIDE_TILE",),
    "jit_cache_dirs": ("DG_JIT_CACHE_DIR", "DJ_JIT_CACHE_DIR"),
    "jit_lineinfo": ("DG_JIT_WITH_LINEINFO",),
    "jit_print_commands": ("DG_JIT_PRINT_COMPILER_COMMAND", "DG_JIT_DEBUG"),
}
_DG_FLAGS = ("jit_lineinfo", "jit_print_commands")  # read as DeepGEMM does: set and not 0/false/off

DEFAULT_NUM_MAX_TOKENS = 1024
DEFAULT_RESERVED_SMS = 2


@dataclasses.dataclass(frozen=True)
class Policy:
    """Every runtime choice of the package (frozen, hashable: usable as a static jit argument).

    ``sm100_mode``: the kernel mode used on sm_100 when a call names none (``fp8xfp4`` W4A8 or
    ``mxf4xmxf4`` W4A4; sm_90 always runs ``fp8``). ``num_max_tokens``: the token cap of the
    kernel's buffer when a call gives none. ``reserved_sms``: SMs the sm_100 kernel leaves free.
    ``graph_targets``: call the custom-call twins that declare CUDA-graph compatibility.
    ``sm100_mega``: let ``backend="auto"`` use the (never run here) sm_100 fused kernel.
    ``fused_ep``: let expert parallelism take the fused intranode kernel where it can run.
    ``sm90_wide_tile``: let the sm_90 kernel take DeepGEMM's 128-row tile from 64 expected tokens
    per expert on (faster prefill; the K sum stays in the FP8 accumulator, rel. L2 ~1.3e-2 against
    the reference at H=4096, above the 1e-2 contract); off: always the 64-row tile. It reaches the
    C++ only as the sm_90 custom call's ``sm90_wide_tile`` attribute (the library reads no
    environment variable for it).
    ``jit_cache_dirs`` (colon-separated, the first written), ``jit_lineinfo`` (nvcc -lineinfo),
    ``jit_print_commands``: how the C++ JIT runs nvcc, handed to it by ``configure_jit`` (not part
    of equality or the hash: they change no result).
    ``sources``: where each field came from (``"default"``, ``"explicit"`` or a variable name);
    not part of equality or the hash.
    """

    sm100_mode: str = "fp8xfp4"
    num_max_tokens: int = DEFAULT_NUM_MAX_TOKENS
    reserved_sms: int = DEFAULT_RESERVED_SMS
    graph_targets: bool = False
    sm100_mega: bool = False
    fused_ep: bool = True
    sm90_wide_tile: bool = False
    jit_cache_dirs: str = dataclasses.field(default="", compare=False)
    jit_lineinfo: bool = dataclasses.field(default=False, compare=False)
    jit_print_commands: bool = dataclasses.field(default=False, compare=False)
    sources: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.sm100_mode not in config.SM100_MODES:
            raise ValueError(
                f"sm100_mode: {self.sm100_mode!r} is not an sm_100 mode; expected one of {', '.join(config.SM100_MODES)}"
            )
        for name in ("num_max_tokens", "reserved_sms"):
            v = getattr(self, name)
            lo = 1 if name == "num_max_tokens" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: {v!r} must be an integer >= {lo}")
        if not isinstance(self.jit_cache_dirs, str):
            raise TypeError(f"jit_cache_dirs: {self.jit_cache_dirs!r} must be a str")
        for name in ("graph_targets", "sm100_mega", "fused_ep", "sm90_wide_tile", *_DG_FLAGS):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: {getattr(self, name)!r} must be a bool")

    def source(self, name: str) -> str:
        """Where field ``name`` came from."""
        return dict(self.sources).get(name, "default")

    def replace(self, **changes: Any) -> Policy:
        """A copy with ``changes`` (their source recorded as ``"explicit"``)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)} - {"sources"}
        if unknown:
            raise TypeError(f"Policy.replace: unknown fields {sorted(unknown)}")
        src = dict(self.sources)
        src.update(dict.fromkeys(changes, "explicit"))
        return dataclasses.replace(self, **changes, sources=tuple(sorted(src.items())))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, sm100_mode: str | None = None) -> Policy:
        """The policy ``environ`` (default ``os.environ``) describes; reads, changes nothing.

        ``sm100_mode``: the mode of the DG_* forwarding (see :func:`current`); None derives it
        from ``environ``'s JAX_MEGAMOE_* / SGLANG_* / DG_* flags without forwarding them.
        """
        env = os.environ if environ is None else environ
        sources: dict[str, str] = {}
        values: dict[str, Any] = {}
        for name, names in ENV.items():
            hit = next(((n, env[n]) for n in names if n in env and (env[n] or name != "jit_cache_dirs")), None)
            if hit is None:
                continue
            var, raw = hit
            if name in ("num_max_tokens", "reserved_sms"):
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None
            elif name == "jit_cache_dirs":
                values[name] = raw
            elif name in _DG_FLAGS:
                values[name] = any(env.get(n, "") not in ("", "0", "false", "False", "off") for n in names)
            else:
                values[name] = config.parse_bool(var, raw)
            sources[name] = var
        if "jit_cache_dirs" not in values:  # the default folder: $XDG_CACHE_HOME, else ~/.cache
            cache = env.get("XDG_CACHE_HOME") or (env["HOME"] + "/.cache" if env.get("HOME") else "")
            values["jit_cache_dirs"] = f"{cache}/jax_megamoe/jit" if cache else f"/tmp/jax_megamoe-jit-{os.getuid()}"
        if sm100_mode is None:
            sm100_mode, src = _sm100_mode_of(env)
        else:
            src = "DG_USE_FP4_ACTS / DG_USE_MXF4_KIND"
        values["sm100_mode"] = sm100_mode
        if src != "default":
            sources["sm100_mode"] = src
        try:
            return cls(**values, sources=tuple(sorted(sources.items())))
        except (TypeError, ValueError) as e:
            name = str(e).split(":")[0]
            raise ValueError(f"environment variable {sources.get(name, name)}: {e}") from None

    def describe(self) -> str:
        """One line per field: value and where it came from."""
        out = []
        for f in dataclasses.fields(self):
            if f.name != "sources":
                out.append(f"  {f.name} = {getattr(self, f.name)!r}  ({self.source(f.name)})")
        return "\n".join(out)


def _sm100_mode_of(env: Mapping[str, str]) -> tuple[str, str]:
    flags = []
    srcs = []
    for names, dg in ((config.ENV_FP4_ACTS, config.DG_FP4_ACTS), (config.ENV_MXF4_KIND, config.DG_MXF4_KIND)):
        var = dg if dg in env else next((n for n in names if n in env), None)
        flags.append(False if var is None else config.parse_bool(var, env[var]))
        if var is not None:
            srcs.append(var)
    mode = config.mode_from_flags(flags[0], flags[1], source=" / ".join(srcs) or "defaults")
    return mode, (" / ".join(srcs) or "default")


_lock = threading.Lock()
_current: Policy | None = None


def current() -> Policy:
    """The process policy: read from the environment on the first call (which also forwards the
    sm_100 flags to DG_*, once), the same object on every later call whatever ``os.environ``
    does meanwhile."""
    global _current
    with _lock:
        if _current is None:
            st = config.forward_env()
            mode = config.mode_from_flags(
                st.fp4_acts.value,
                st.mxf4_kind.value,
                source=f"{config.DG_FP4_ACTS} (from {st.fp4_acts.source}) / {config.DG_MXF4_KIND} (from {st.mxf4_kind.source})",
            )
            p = Policy.from_environ(sm100_mode=mode)
            src = dict(p.sources)
            if st.fp4_acts.source == "default" and st.mxf4_kind.source == "default":
                src.pop("sm100_mode", None)
            else:
                src["sm100_mode"] = f"{st.fp4_acts.source} / {st.mxf4_kind.source}"
            _current = dataclasses.replace(p, sources=tuple(sorted(src.items())))
        return _current


def resolve(policy: Policy | None) -> Policy:
    """``policy`` itself, or the process policy for None (a TypeError for anything else)."""
    if policy is None:
        return current()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a jax_megamoe.policy.Policy or None, got {type(policy).__name__}")
    return policy


def describe() -> str:
    """The process policy, one line per field."""
    return current().describe()


def _reset() -> None:
    """Forget the process policy and the DG_* forwarding snapshot (tests only)."""
    global _current
    with _lock:
        _current = None
    config._reset_env_forwarding()
