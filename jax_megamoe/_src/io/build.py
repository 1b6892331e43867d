"""Build one MoE layer in kernel layout from its checkpoint-format tensors.

:func:`build_moe_layer` turns :class:`~jax_megamoe._src.io.v4_checkpoint.MoELayerTensors` into a
:class:`~jax_megamoe._src.io.v4_checkpoint.MoELayer` (``MoEWeights`` of the chosen mode, plus the gate and
the shared expert); :func:`load_moe_layer` reads and builds in one call. The mode defaults to the
device's, resolved through the policy (:func:`jax_megamoe.policy.resolve_mode` with
:func:`jax_megamoe.ops.device_arch`: ``fp8`` on sm_90, else ``policy.sm100_mode``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from jax_megamoe._src.io.safetensors_reader import CheckpointError, CheckpointSource
from jax_megamoe._src.io.v4_checkpoint import MoELayer, MoELayerTensors, read_moe_layer
from jax_megamoe._src.kernels import ops
from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy
from jax_megamoe._src.numerics.progress import ProgressArg, make_progress

__all__ = ["build_moe_layer", "load_moe_layer"]

log = logging.getLogger("jax_megamoe.checkpoint")  # the logger name users configure (stable across the re-layering)


@dataclasses.dataclass(frozen=True, eq=False)
class _Relay:
    """A fixed, hashable progress callable for the jitted FP4 -> FP8 conversion (its identity is a
    static argument of the jit, so one relay object avoids a recompilation per call); the sink it
    forwards to is swapped per call."""

    target: list

    def __call__(self, done: int, total: int) -> None:
        if self.target and self.target[0] is not None:
            self.target[0](done, total)


_CONVERT_RELAY = _Relay([None])
_CONVERT_LOCK = threading.Lock()  # one conversion at a time uses the relay


def _resolve_mode(mode: str | None, policy: Policy | None = None) -> str:
    return _policy.resolve_mode(mode, ops.device_arch() if mode is None else None, policy)


def build_moe_layer(
    tensors: MoELayerTensors,
    *,
    mode: str | None = None,
    progress: ProgressArg = None,
    experts_per_step: int = 1,
    allow_nan_scales: bool = False,
    policy: Policy | None = None,
) -> MoELayer:
    """Kernel-layout :class:`MoELayer` from checkpoint-format tensors (see :func:`load_moe_layer`;
    ``allow_nan_scales`` goes to :meth:`~jax_megamoe.layout.MoEWeights.from_checkpoint_with_report`;
    ``experts_per_step`` experts are converted per jitted step; ``policy`` resolves ``mode=None``,
    default the process policy)."""
    mode = _resolve_mode(mode, policy)
    t = tensors
    report = None
    if t.expert_format == "fp8":
        if mode != "fp8":
            raise CheckpointError(
                f"{t.source}: layer {t.layer_idx} has FP8 routed experts, which only run in mode 'fp8' (sm_90); "
                f"mode {mode!r} needs MXFP4 experts (requantizing FP8 to FP4 is lossy and not supported)"
            )
        weights = MoEWeights.from_fp8(t.w13, t.w13_scale, t.w2, t.w2_scale)
    else:
        bar = None
        if mode == "fp8":
            bar = make_progress(progress, 2 * t.config.n_routed_experts, f"layer {t.layer_idx}: FP4 -> FP8", "tensor")
        args = (t.w13, t.w13_scale, t.w2, t.w2_scale)
        if bar is None:
            weights, report = MoEWeights.from_checkpoint_with_report(
                *args, mode=mode, experts_per_step=experts_per_step, allow_nan_scales=allow_nan_scales
            )
        else:
            with _CONVERT_LOCK:
                _CONVERT_RELAY.target[0] = lambda done, total: bar(done)
                try:
                    weights, report = MoEWeights.from_checkpoint_with_report(
                        *args,
                        mode=mode,
                        progress=_CONVERT_RELAY,
                        experts_per_step=experts_per_step,
                        allow_nan_scales=allow_nan_scales,
                    )
                finally:
                    _CONVERT_RELAY.target[0] = None
                    bar.close()
        if report is not None:
            msg = f"layer {t.layer_idx}: {report.summary()}"
            (log.info if report.lossless else log.warning)(msg)
    return MoELayer(
        layer_idx=t.layer_idx,
        config=t.config,
        mode=mode,
        weights=weights,
        report=report,
        is_hash_layer=t.is_hash_layer,
        gate_weight=t.gate_weight,
        gate_bias=t.gate_bias,
        tid2eid=t.tid2eid,
        shared=t.shared,
        expert_format=t.expert_format,
        nibble_order=t.nibble_order,
        source=t.source,
    )


def load_moe_layer(
    path: CheckpointSource,
    layer_idx: int,
    *,
    mode: str | None = None,
    progress: ProgressArg = None,
    allow_nan_scales: bool = False,
    **read_options: Any,
) -> MoELayer:
    """Read one MoE layer of a checkpoint and build its kernel-layout weights.

    ``mode``: ``"mxf4xmxf4"`` / ``"fp8xfp4"`` (sm_100) or ``"fp8"`` (sm_90); None picks the
    device's (``fp8`` on sm_90, else the process policy's ``sm100_mode``). For ``fp8`` from an FP4
    checkpoint the result's ``report`` tells what the FP4 -> FP8 conversion lost (also logged,
    as a warning when any block is lossy). ``progress`` and ``allow_nan_scales`` serve both the
    read and the build; ``read_options`` are :func:`read_moe_layer`'s others (``config``,
    ``nibble_order``, ``prefix``). For a policy of
    your own or ``experts_per_step``, call :func:`read_moe_layer` and :func:`build_moe_layer`.
    """
    mode = _resolve_mode(mode)
    t = read_moe_layer(path, layer_idx, progress=progress, allow_nan_scales=allow_nan_scales, **read_options)
    return build_moe_layer(t, mode=mode, progress=progress, allow_nan_scales=allow_nan_scales)
