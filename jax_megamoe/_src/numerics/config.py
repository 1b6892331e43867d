"""Modes, kernel limits and the static checks of a call (no environment: that is the policy's).

The limits here are the ones DeepGEMM's host code and kernel static asserts enforce
(`sgl-deep-gemm==0.2.5`); checking them at trace time turns a kernel trap or a silent
wrong answer into a ValueError that names the argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jax_megamoe._src.numerics import _validate

Mode = Literal["mxf4xmxf4", "fp8xfp4", "fp8"]

#: Every kernel mode: two for sm_100 (B200) and one for sm_90 (H100/H200).
MODES: tuple[str, ...] = ("mxf4xmxf4", "fp8xfp4", "fp8")
SM100_MODES: tuple[str, ...] = ("mxf4xmxf4", "fp8xfp4")
SM90_MODES: tuple[str, ...] = ("fp8",)

#: Activation scale group of the pre-dispatch / mega kernels, per mode.
ACT_GROUP = {"mxf4xmxf4": 32, "fp8xfp4": 32, "fp8": 128}

#: The symmetric buffer's token capacity is rounded up to this multiple (LCM of BLOCK_M candidates).
TOKEN_CAP_ALIGN = {"mxf4xmxf4": 1920, "fp8xfp4": 1920, "fp8": 128}

# Pre-dispatch: one thread per 8 bf16 columns, at most 1024 threads per block.
MAX_HIDDEN_PRE_DISPATCH = 8192
# sm_100 mega kernel limits (host checks of fp8_fp4_mega_moe).
MAX_TOPK_SM100 = 32
MAX_EXPERTS_SM100 = 2048
MAX_LOCAL_EXPERTS_SM100 = 512
MAX_RANKS_SM100 = 72
# sm_90 mega kernel limits (host checks of fp8_mega_moe).
MAX_INTERMEDIATE_SM90 = 4096
MAX_RANKS_SM90 = 32
# (hidden multiple, intermediate multiple, most ranks) of the mega kernels per compute-capability major.
_MEGA_LIMITS = {10: (256, 128, MAX_RANKS_SM100), 9: (512, 256, MAX_RANKS_SM90)}

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def check_mode(mode: str, name: str = "mode") -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{name}: {mode!r} is not a kernel mode; expected one of {', '.join(MODES)}")
    return mode


def arch_of_mode(mode: str) -> int:
    """Compute-capability major a mode's kernels are built for (10 = sm_100f, 9 = sm_90a)."""
    return 9 if check_mode(mode) in SM90_MODES else 10


def align_token_cap(num_max_tokens: int, mode: str) -> int:
    """The buffer capacity DeepGEMM actually allocates for a requested token cap."""
    if num_max_tokens < 1:
        raise ValueError(f"num_max_tokens: {num_max_tokens} must be >= 1")
    a = TOKEN_CAP_ALIGN[check_mode(mode)]
    return -(-num_max_tokens // a) * a


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={value!r} is not a boolean; use 1/0, true/false, on/off")


def mode_from_flags(use_fp4_acts: bool, use_mxf4_kind: bool, *, source: str = "environment") -> str:
    """Map the legacy (FP4 acts, MXF4 kind) pair onto the 0.2.x ``mma_type`` modes."""
    if use_fp4_acts and use_mxf4_kind:
        return "mxf4xmxf4"
    if not use_fp4_acts and not use_mxf4_kind:
        return "fp8xfp4"
    if use_mxf4_kind:
        raise ValueError(
            f"{source}: USE_MXF4_KIND=1 needs USE_FP4_ACTS=1 (kind::mxf4 multiplies FP4 activations); "
            "set both for W4A4 (mode='mxf4xmxf4') or neither for W4A8 (mode='fp8xfp4')"
        )
    raise ValueError(
        f"{source}: USE_FP4_ACTS=1 without USE_MXF4_KIND=1 asks for FP4 activations through the "
        "kind::mxf8f6f4 MMA, a mode that sgl-deep-gemm 0.2.x no longer has; set USE_MXF4_KIND=1 "
        "too (mode='mxf4xmxf4') or unset both (mode='fp8xfp4')"
    )


def check_clamp(activation_clamp: float | None) -> float | None:
    """``activation_clamp`` as a static float (``None``: no clamp; ``inf`` means the same).

    It is baked into the kernel as an attribute and into the reference as a constant, so a
    traced value is rejected with a message naming it.
    """
    return _validate.static_float(
        "activation_clamp", activation_clamp, allow_none=True, lo=0.0, why="the clamp is compiled into the kernel"
    )


def validate_pre_dispatch_shape(*, hidden: int, top_k: int, mode: str) -> None:
    """Limits of the pre-dispatch kernels (one CTA per token, H/8 threads)."""
    group = ACT_GROUP[check_mode(mode)]
    if hidden % 128 != 0:
        raise ValueError(f"hidden: {hidden} must be a multiple of 128")
    if hidden > MAX_HIDDEN_PRE_DISPATCH:
        raise ValueError(
            f"hidden: {hidden} exceeds the pre-dispatch kernel's limit of {MAX_HIDDEN_PRE_DISPATCH} "
            "(one thread per 8 columns, at most 1024 threads)"
        )
    if top_k < 1 or top_k > hidden // 8:
        raise ValueError(f"top_k: {top_k} must be in [1, hidden/8 = {hidden // 8}]")
    if mode in SM100_MODES and (hidden // group) % 4 != 0:
        raise ValueError(f"hidden: {hidden}/{group} scale groups must be a multiple of 4 (packed int32 scales)")


def validate_moe_shape(
    *, hidden: int, intermediate: int, num_experts: int, top_k: int, mode: str, num_ranks: int = 1
) -> None:
    """Limits of the mega kernels for ``mode`` (sm_100: fp8_fp4_mega_moe, sm_90: fp8_mega_moe)."""
    check_mode(mode)
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k: {top_k} must be in [1, num_experts = {num_experts}]")
    if num_ranks < 1 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts: {num_experts} must be divisible by the number of ranks {num_ranks}")
    h_mult, i_mult, max_ranks = _MEGA_LIMITS[arch_of_mode(mode)]
    if hidden % h_mult != 0:
        raise ValueError(f"hidden: {hidden} must be a multiple of {h_mult} for mode {mode!r}")
    if intermediate % i_mult != 0:
        raise ValueError(f"intermediate: {intermediate} must be a multiple of {i_mult} for mode {mode!r}")
    if num_ranks > max_ranks:
        raise ValueError(f"num_ranks: {num_ranks} exceeds {max_ranks}")
    if mode in SM90_MODES:
        if intermediate > MAX_INTERMEDIATE_SM90:
            raise ValueError(
                f"intermediate: {intermediate} exceeds the sm_90 kernel's limit of {MAX_INTERMEDIATE_SM90}"
            )
        return
    if top_k > MAX_TOPK_SM100:
        raise ValueError(f"top_k: {top_k} exceeds the sm_100 kernel's limit of {MAX_TOPK_SM100}")
    if num_experts > MAX_EXPERTS_SM100:
        raise ValueError(f"num_experts: {num_experts} exceeds the sm_100 kernel's limit of {MAX_EXPERTS_SM100}")
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS_SM100:
        raise ValueError(
            f"num_experts: {num_experts // num_ranks} local experts exceed the limit of {MAX_LOCAL_EXPERTS_SM100}"
        )


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """The rarely changed options of one Mega MoE call (:func:`jax_megamoe.ops.mega_moe`,
    :func:`jax_megamoe.reference.mega_moe`), grouped so the calls keep a short signature.

    ``routed_scaling_factor``: multiplied into ``topk_weights`` in f32 (a Python float, or a traced
    scalar: then the options are not hashable, which only matters if you make them static).
    ``num_max_tokens``: the kernel buffer's token cap (default: the policy's); the reference only
    checks ``T`` against it. ``fast_math``: the kernels' fast ``exp``/division (None: on for the
    kernels; the reference always computes exactly). ``reserved_sms``: SMs the kernel leaves free
    (default: the policy's). ``kernel``: ``"auto"`` | ``"fused"`` | ``"decode"`` (see
    :func:`jax_megamoe.ops.mega_moe`). ``chunk_rows``: the reference's rows per expert step (speed
    and memory only). ``policy``: a :class:`jax_megamoe.policy.Policy` (default: the process policy).
    """

    routed_scaling_factor: Any = 1.0
    num_max_tokens: int | None = None
    fast_math: bool | None = None
    reserved_sms: int | None = None
    kernel: str = "auto"
    chunk_rows: int | None = None
    policy: Any = None

    @staticmethod
    def of(options: MoEOptions | None) -> MoEOptions:
        """``options``, or the defaults for None (a TypeError naming the argument otherwise)."""
        if options is None:
            return MoEOptions()
        return _validate.check_instance("options", options, MoEOptions, "a jax_megamoe.ops.MoEOptions")
