"""The process policy: every setting of the package, read once, frozen, passed explicitly.

This module is the only one in the package that reads ``os.environ`` (a test greps for it). It
reads the environment the first time :func:`current` (or :func:`forward_env`) is called --
``jax_megamoe.register()`` calls it, and so does the first op that needs a setting -- and never
again: the result is a frozen, hashable :class:`Policy`. The ops
(:mod:`jax_megamoe._src.kernels.ops`), expert parallelism (:mod:`jax_megamoe._src.kernels.parallel`)
and the model (:class:`~jax_megamoe.models.deepseek_v4.DeepseekV4MoE`, through its
``MoEBlockOptions``) take it as ``policy=`` and
default to :func:`current`. Because the process policy never changes after it is read, a function
traced before and one traced after any change of ``os.environ`` see the same values: there is no
stale trace. To run with other values, pass an explicit policy
(``policy=jax_megamoe.policy.current().replace(graph_targets=True)``, or
``Policy.from_environ({...})``) or explicit arguments (``num_max_tokens=``, ``reserved_sms=``):
they are part of the call, hence of what is traced.

Precedence, per setting: **explicit argument** (a ``policy=`` or a keyword such as
``num_max_tokens=``) > ``JAX_MEGAMOE_*`` > the ``SGLANG_OPT_DEEPGEMM_MEGA_MOE_*`` alias > the
default. The two sm_100 mode flags are forwarded once to DeepGEMM's ``DG_USE_FP4_ACTS`` /
``DG_USE_MXF4_KIND`` (set only where absent; a ``DG_*`` already set wins, see
:func:`forward_env`), and the sm_100 mode is derived once, from the forwarded ``DG_*`` values.

========================  ===========================================================  ==========
field                     variables (first set wins)                                   default
========================  ===========================================================  ==========
``sm100_mode``            DG_USE_FP4_ACTS + DG_USE_MXF4_KIND, forwarded from            fp8xfp4
                          JAX_MEGAMOE_USE_{FP4_ACTS,MXF4_KIND} or
                          SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_{FP4_ACTS,MXF4_KIND}
``num_max_tokens``        JAX_MEGAMOE_NUM_MAX_TOKENS,                                   1024
                          SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK
``prefill_token_cap``     JAX_MEGAMOE_PREFILL_TOKEN_CAP                                 4096
``reserved_sms``          JAX_MEGAMOE_RESERVED_SMS, SGLANG_OPT_DEEPGEMM_MEGA_MOE_RESERVED_SMS  2
``graph_targets``         JAX_MEGAMOE_GRAPH_TARGETS                                     off
``sm100_mega``            JAX_MEGAMOE_SM100_MEGA                                        off
``fused_ep``              JAX_MEGAMOE_FUSED_EP                                          on
``sm90_wide_tile``        JAX_MEGAMOE_SM90_WIDE_TILE                                    off
``jit_cache_dirs``        DG_JIT_CACHE_DIR, DJ_JIT_CACHE_DIR                            ~/.cache/jax_megamoe/jit
``jit_lineinfo``          DG_JIT_WITH_LINEINFO                                          off
``jit_print_commands``    DG_JIT_PRINT_COMPILER_COMMAND or DG_JIT_DEBUG                 off
``locations``             where the library, nvcc and the headers are: see              see there
                          :class:`Locations`
========================  ===========================================================  ==========

The ``jit_*`` fields and ``locations`` change no result: they are not part of equality or the hash.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from typing import Any

from jax_megamoe._src.numerics import _validate, config

__all__ = ["Policy", "Locations", "current", "describe", "resolve", "resolve_mode", "forward_env", "ENV"]

#: Every variable the policy reads for a runtime field, per field, in precedence order.
ENV: dict[str, tuple[str, ...]] = {
    "num_max_tokens": ("JAX_MEGAMOE_NUM_MAX_TOKENS", "SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK"),
    "prefill_token_cap": ("JAX_MEGAMOE_PREFILL_TOKEN_CAP",),
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
_INT_FIELDS = ("num_max_tokens", "prefill_token_cap", "reserved_sms")

# The sm_100 mode flags, in precedence order (the project's own name first), and their DG_* targets.
ENV_FP4_ACTS = ("JAX_MEGAMOE_USE_FP4_ACTS", "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS")
ENV_MXF4_KIND = ("JAX_MEGAMOE_USE_MXF4_KIND", "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND")
DG_FP4_ACTS = "DG_USE_FP4_ACTS"
DG_MXF4_KIND = "DG_USE_MXF4_KIND"
_FLAGS = ((ENV_FP4_ACTS, DG_FP4_ACTS), (ENV_MXF4_KIND, DG_MXF4_KIND))

# Where things are (Locations): the variables, each read once with the policy.
ENV_FFI_LIB = "JAX_MEGAMOE_FFI_LIB"
ENV_NVCC = ("JAX_MEGAMOE_NVCC", "DG_JIT_NVCC_COMPILER")
ENV_CUDA_ROOTS = ("CUDA_HOME", "CUDA_PATH")
ENV_DEEPGEMM_INCLUDE = "JAX_MEGAMOE_DEEPGEMM_INCLUDE"
ENV_ALLOW_DEEPGEMM_VERSION = "JAX_MEGAMOE_ALLOW_DEEPGEMM_VERSION"

DEFAULT_NUM_MAX_TOKENS = 1024
#: The largest buffer cap the kernel has run with on a GPU (V4-Flash and V4-Pro, T = 4096, H100,
#: 2026-12-07, benchmarks/RESULTS.md): larger ones are a setting until a GPU has run them.
DEFAULT_PREFILL_TOKEN_CAP = 4096
DEFAULT_RESERVED_SMS = 2


def _dg_flag(value: str | None) -> bool:
    """A switch read as DeepGEMM reads it: set and not "", 0, false, False or off."""
    return value is not None and value not in ("", "0", "false", "False", "off")


def _default_jit_cache_dir(env: Mapping[str, str]) -> str:
    """$XDG_CACHE_HOME/jax_megamoe/jit, else ~/.cache/jax_megamoe/jit, else /tmp/jax_megamoe-jit-<uid>."""
    cache = env.get("XDG_CACHE_HOME") or (env["HOME"] + "/.cache" if env.get("HOME") else "")
    return f"{cache}/jax_megamoe/jit" if cache else f"/tmp/jax_megamoe-jit-{os.getuid()}"


@dataclasses.dataclass(frozen=True)
class Locations:
    """Where the FFI library, nvcc and the DeepGEMM headers are: read once with the policy and
    handed to the loader (:mod:`._ffi`) and the toolchain lookup (:mod:`._toolchain`) as values.

    ``ffi_lib``: ``JAX_MEGAMOE_FFI_LIB`` (a file; tried first). ``nvcc``: ``(variable, path)`` of
    ``JAX_MEGAMOE_NVCC`` or ``DG_JIT_NVCC_COMPILER`` (an explicit nvcc). ``cuda_roots``:
    ``(variable, folder)`` of ``CUDA_HOME`` then ``CUDA_PATH``. ``search_path``: ``PATH``.
    ``deepgemm_include``: ``JAX_MEGAMOE_DEEPGEMM_INCLUDE``. ``allow_deepgemm_version``:
    ``JAX_MEGAMOE_ALLOW_DEEPGEMM_VERSION``.
    """

    ffi_lib: str | None = None
    nvcc: tuple[str, str] | None = None
    cuda_roots: tuple[tuple[str, str], ...] = ()
    search_path: str | None = None
    deepgemm_include: str | None = None
    allow_deepgemm_version: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Locations:
        """The locations ``environ`` (default ``os.environ``) describes; reads, changes nothing."""
        env = os.environ if environ is None else environ
        nvcc = next(((v, env[v]) for v in ENV_NVCC if env.get(v)), None)
        return cls(
            ffi_lib=env.get(ENV_FFI_LIB) or None,
            nvcc=nvcc,
            cuda_roots=tuple((v, env[v]) for v in ENV_CUDA_ROOTS if env.get(v)),
            search_path=env.get("PATH"),
            deepgemm_include=env.get(ENV_DEEPGEMM_INCLUDE) or None,
            allow_deepgemm_version=env.get(ENV_ALLOW_DEEPGEMM_VERSION, "").strip().lower()
            in ("1", "true", "yes", "on"),
        )


@dataclasses.dataclass(frozen=True)
class EnvSetting:
    value: bool
    source: str  # which variable (or "default") decided it


@dataclasses.dataclass(frozen=True)
class EnvState:
    """The two sm_100 flags as DeepGEMM sees them (``DG_*``) and what the forwarding set; reported
    by ``describe()``."""

    fp4_acts: EnvSetting
    mxf4_kind: EnvSetting
    forwarded: tuple[tuple[str, str], ...]  # (DG_ variable, value) pairs this process set

    def sm100_mode(self) -> str:
        """The sm_100 mode these flags select (W4A8 unless both are on); ValueError for a mix."""
        return config.mode_from_flags(
            self.fp4_acts.value,
            self.mxf4_kind.value,
            source=f"{DG_FP4_ACTS} (from {self.fp4_acts.source}) / {DG_MXF4_KIND} (from {self.mxf4_kind.source})",
        )

    def sm100_source(self) -> str:
        srcs = [s.source for s in (self.fp4_acts, self.mxf4_kind) if s.source != "default"]
        return " / ".join(srcs) or "default"


def _flags_of(env: Mapping[str, str]) -> tuple[EnvState, dict[str, str]]:
    """What the forwarding does with ``env``: the resulting flags and the ``DG_*`` values it would
    set (an explicit ``DG_*`` wins; else the first of the project's / SGLang's names; else off)."""
    settings = []
    to_set: dict[str, str] = {}
    for names, dg in _FLAGS:
        if dg in env:
            settings.append(EnvSetting(config.parse_bool(dg, env[dg]), dg))
            continue
        var = next((n for n in names if n in env), None)
        if var is None:
            settings.append(EnvSetting(False, "default"))
            continue
        val = config.parse_bool(var, env[var])
        to_set[dg] = "1" if val else "0"
        settings.append(EnvSetting(val, var))
    return EnvState(settings[0], settings[1], tuple(to_set.items())), to_set


@dataclasses.dataclass(frozen=True)
class Policy:
    """Every choice of the package (frozen, hashable: usable as a static jit argument).

    ``sm100_mode``: the kernel mode used on sm_100 when a call names none (``fp8xfp4`` W4A8 or
    ``mxf4xmxf4`` W4A4; sm_90 always runs ``fp8``). ``num_max_tokens``: the token cap of the
    kernel's buffer when a call gives none. ``prefill_token_cap``: how far a call with more tokens
    than ``num_max_tokens`` (and no cap of its own) may raise its buffer's cap, to the power of two
    >= T; above it the fused kernel runs in chunks of that many tokens
    (:func:`jax_megamoe.ops.token_cap`). ``reserved_sms``: SMs the sm_100 kernel leaves free.
    ``graph_targets``: call the custom-call twins that declare CUDA-graph compatibility.
    ``sm100_mega``: let ``backend="auto"`` use the (never run here) sm_100 fused kernel.
    ``fused_ep``: let expert parallelism take the fused intranode kernel where it can run.
    ``sm90_wide_tile``: let the sm_90 kernel take DeepGEMM's 128-row tile from 64 expected tokens
    per expert on (faster prefill; the K sum stays in the FP8 accumulator, rel. L2 ~1.3e-2 against
    the reference at H=4096, above the 1e-2 contract); off: always the 64-row tile. It reaches the
    C++ only as the sm_90 custom call's ``sm90_wide_tile`` attribute.
    ``jit_cache_dirs`` (colon-separated, the first written), ``jit_lineinfo`` (nvcc -lineinfo),
    ``jit_print_commands``: how the C++ JIT runs nvcc, handed to it by ``configure_jit``.
    ``locations``: where the library and its tools are (:class:`Locations`); ``sources``: where
    each field came from (``"default"``, ``"explicit"`` or a variable name). The ``jit_*`` fields,
    ``locations`` and ``sources`` change no result: they are not part of equality or the hash.
    """

    sm100_mode: str = "fp8xfp4"
    num_max_tokens: int = DEFAULT_NUM_MAX_TOKENS
    prefill_token_cap: int = DEFAULT_PREFILL_TOKEN_CAP
    reserved_sms: int = DEFAULT_RESERVED_SMS
    graph_targets: bool = False
    sm100_mega: bool = False
    fused_ep: bool = True
    sm90_wide_tile: bool = False
    jit_cache_dirs: str = dataclasses.field(default="", compare=False)
    jit_lineinfo: bool = dataclasses.field(default=False, compare=False)
    jit_print_commands: bool = dataclasses.field(default=False, compare=False)
    locations: Locations = dataclasses.field(default=Locations(), compare=False)
    sources: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.sm100_mode not in config.SM100_MODES:
            raise ValueError(
                f"sm100_mode: {self.sm100_mode!r} is not an sm_100 mode; expected one of {', '.join(config.SM100_MODES)}"
            )
        for name in _INT_FIELDS:
            v = getattr(self, name)
            lo = 0 if name == "reserved_sms" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: {v!r} must be an integer >= {lo}")
        if not isinstance(self.jit_cache_dirs, str):
            raise TypeError(f"jit_cache_dirs: {self.jit_cache_dirs!r} must be a str")
        for name in ("graph_targets", "sm100_mega", "fused_ep", "sm90_wide_tile", *_DG_FLAGS):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: {getattr(self, name)!r} must be a bool")
        if not isinstance(self.locations, Locations):
            raise TypeError(f"locations: expected a jax_megamoe.policy.Locations, got {type(self.locations).__name__}")

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
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Policy:
        """The policy ``environ`` (default ``os.environ``) describes; reads, changes nothing (the
        sm_100 mode is the one the DG_* forwarding of ``environ`` would give)."""
        env = os.environ if environ is None else environ
        return cls._build(env, _flags_of(env)[0])

    @classmethod
    def _build(cls, env: Mapping[str, str], flags: EnvState) -> Policy:
        sources: dict[str, str] = {}
        values: dict[str, Any] = {}
        for name, names in ENV.items():
            hit = next(((n, env[n]) for n in names if n in env and (env[n] or name != "jit_cache_dirs")), None)
            if hit is None:
                continue
            var, raw = hit
            if name in _INT_FIELDS:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None
            elif name == "jit_cache_dirs":
                values[name] = raw
            elif name in _DG_FLAGS:
                values[name] = any(_dg_flag(env.get(n)) for n in names)
            else:
                values[name] = config.parse_bool(var, raw)
            sources[name] = var
        values.setdefault("jit_cache_dirs", _default_jit_cache_dir(env))
        values["sm100_mode"] = flags.sm100_mode()  # the one derivation of the mode from the flags
        if flags.sm100_source() != "default":
            sources["sm100_mode"] = flags.sm100_source()
        try:
            return cls(**values, locations=Locations.from_environ(env), sources=tuple(sorted(sources.items())))
        except (TypeError, ValueError) as e:
            name = str(e).split(":")[0]
            raise ValueError(f"environment variable {sources.get(name, name)}: {e}") from None

    def describe(self) -> str:
        """One line per field: value and where it came from."""
        out = []
        for f in dataclasses.fields(self):
            if f.name == "locations":
                for g in dataclasses.fields(self.locations):
                    if g.name == "search_path":
                        continue  # PATH: long, and only nvcc's lookup uses it
                    out.append(f"  locations.{g.name} = {getattr(self.locations, g.name)!r}")
            elif f.name != "sources":
                out.append(f"  {f.name} = {getattr(self, f.name)!r}  ({self.source(f.name)})")
        return "\n".join(out)


_lock = threading.RLock()
_current: Policy | None = None
_env_state: EnvState | None = None


def forward_env() -> EnvState:
    """Forward JAX_MEGAMOE_* / SGLang sm_100 flags to DG_USE_* once per process (set-if-absent).

    Thread-safe and idempotent: the first caller does the work, every later caller gets the
    same snapshot, whatever the environment looks like by then. An explicit ``DG_*`` value
    already in the environment wins over the forwarded one. :func:`current` calls it first.
    """
    global _env_state
    with _lock:
        if _env_state is None:
            state, to_set = _flags_of(os.environ)
            for dg, value in to_set.items():
                os.environ[dg] = value
            _env_state = state
        return _env_state


def current() -> Policy:
    """The process policy: read from the environment on the first call (which also forwards the
    sm_100 flags to DG_*, once, and derives the sm_100 mode from them), the same object on every
    later call whatever ``os.environ`` does meanwhile."""
    global _current
    with _lock:
        if _current is None:
            _current = Policy._build(os.environ, forward_env())
        return _current


def resolve(policy: Policy | None) -> Policy:
    """``policy`` itself, or the process policy for None (a TypeError for anything else)."""
    if policy is None:
        return current()
    return _validate.check_instance("policy", policy, Policy, "a jax_megamoe.policy.Policy")


def resolve_mode(mode: str | None, arch: int | None = None, policy: Policy | None = None) -> str:
    """The kernel mode of a call: an explicit ``mode`` wins; else ``fp8`` on sm_90 (``arch == 9``);
    else ``policy.sm100_mode`` (default: the process policy's)."""
    if mode is not None:
        return config.check_mode(mode)
    if arch == 9:
        return "fp8"
    return resolve(policy).sm100_mode


def describe() -> str:
    """The process policy, one line per field."""
    return current().describe()


def _reset() -> None:
    """Forget the process policy and the DG_* forwarding snapshot (tests only)."""
    global _current, _env_state
    with _lock:
        _current = None
        _env_state = None
