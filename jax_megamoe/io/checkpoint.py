"""Load one DeepSeek V4 MoE layer from a safetensors checkpoint into kernel layout.

What is read (names relative to the layer prefix ``layers.{i}.``; ``E`` experts, ``H`` hidden,
``I`` expert intermediate, ``K`` top-k, ``I_s = I * n_shared_experts``)::

    ffn.gate.weight                     BF16      [E, H]          router
    ffn.gate.bias                       F32       [E]             selection bias (non-hash layers;
                                                                  BF16 accepted, the on-disk dtype
                                                                  is unconfirmed)
    ffn.gate.tid2eid                    I64       [vocab, K]      hash table (hash layers; I32 accepted)
    ffn.experts.{e}.w1.weight           I8        [I, H/2]        packed E2M1 (U8 accepted)
    ffn.experts.{e}.w1.scale            F8_E8M0   [I, H/32]       UE8M0, one per 32 along K (U8 accepted)
    ffn.experts.{e}.w3.*                as w1                     up projection
    ffn.experts.{e}.w2.weight           I8        [H, I/2]
    ffn.experts.{e}.w2.scale            F8_E8M0   [H, I/32]
    ffn.shared_experts.{w1,w3}.weight   F8_E4M3   [I_s, H]
    ffn.shared_experts.w2.weight        F8_E4M3   [H, I_s]
    ffn.shared_experts.*.scale          F8_E8M0   [N/128, K/128]  128x128 blocks (F32 accepted)

FP8 expert checkpoints (``sgl-project/DeepSeek-V4-*-FP8`` and similar re-packagings) are read too:
``ffn.experts.{e}.w{1,2,3}.weight`` F8_E4M3 ``[N, K]`` with a 128x128 block scale named ``.scale``
or ``.weight_scale_inv`` (F32, or F8_E8M0). They give mode ``'fp8'`` (sm_90) weights only: turning
FP8 back into FP4 would be lossy, so asking for an sm_100 mode raises :class:`CheckpointError`.

How it is read: the folder's ``model.safetensors.index.json`` maps tensor names to shard files
(a folder with a single ``model.safetensors`` or un-indexed ``*.safetensors`` shards, or a single
file, work too). Each shard's header (8-byte little-endian length + JSON) is parsed here, not by
the ``safetensors`` package, so ``F8_E8M0`` and I8-packed FP4 read the same everywhere. A shard is
memory-mapped once (``np.memmap``) and a tensor is a read-only view of its byte range; only the
tensors of the requested layer are ever touched, so the rest of the model is never read. The
routed experts are streamed one expert at a time into preallocated checkpoint-format arrays
(``w13 uint8[E, 2I, H/2]`` gate rows then up rows, ``w13_scale uint8[E, 2I, H/32]``, ``w2``,
``w2_scale``), which :meth:`jax_megamoe.layout.MoEWeights.from_checkpoint_with_report` turns into
the kernel layout of the chosen mode (``mxf4xmxf4`` / ``fp8xfp4`` keep the FP4 bytes; ``fp8``
converts them to FP8 128x128 and returns the :class:`~jax_megamoe.layout.ConversionReport`, which
is also logged).

Every tensor read is checked: dtype, shape (against the sizes derived from the gate and expert-0
shapes and against the config), and that its ``data_offsets`` span exactly ``dtype x shape``
bytes inside the file. Each shard's header must lay its tensors out as the official format does
(:class:`SafetensorsFile`: no overlapping or aliased offsets, no gaps, no hidden trailing data;
JSON key order is free). A UE8M0 scale byte 0xFF (NaN in E8M0) in a routed-expert scale or an
E8M0 128x128 block scale is refused, naming the tensor, the first position and the count
(``allow_nan_scales=True`` on :func:`read_moe_layer` / :func:`load_moe_layer` /
:func:`build_moe_layer` accepts it). Failures raise :class:`CheckpointError` (a ``ValueError``)
naming the tensor and the file.

A source checkpoint carries no checksum, so a flipped data byte cannot be detected here; what
is guaranteed is that reading is faithful: every array holds exactly the bytes the file holds
at that tensor's offsets (the integrity tests check this byte for byte).

Nibble order: DeepGEMM and this package pack element ``2j`` of a row in the **low** nibble
(``nibble_order="low_even"``), which is torch's ``float4_e2m1fn_x2`` convention the checkpoint is
expected to follow. ``nibble_order="high_even"`` swaps the nibbles of every routed-expert byte while
reading. :func:`check_nibble_order` (arrays) and :func:`check_checkpoint_nibble_order` (one expert
of a checkpoint against a BF16/F32 reference) tell which order a checkpoint really uses. **With no
real checkpoint available here, the order has been verified on synthetic data only.**

Where it lives: this module is the public face of the checkpoint path and re-exports it; the
code is in :mod:`jax_megamoe.io.safetensors_reader` (safetensors files and folders),
:mod:`jax_megamoe.io.v4_checkpoint` (V4 tensor names, config inference, nibble checks, reading one
layer), :mod:`jax_megamoe.io.build` (kernel layout) and :mod:`jax_megamoe.io.convert` (converted
folders). Building a Flax block from a checkpoint is the model's job:
:meth:`jax_megamoe.models.deepseek_v4.DeepseekV4MoE.from_checkpoint` /
:func:`jax_megamoe.models.deepseek_v4.load_moe_block`.
"""

from __future__ import annotations

from jax_megamoe.io.build import build_moe_layer, load_moe_layer
from jax_megamoe.io.convert import load_converted
from jax_megamoe.io.safetensors_reader import (
    CONFIG_NAME,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    TensorInfo,
    read_safetensors_header,
    safetensors_dtype,
)
from jax_megamoe.io.v4_checkpoint import (
    CONFIG_KEYS,
    NIBBLE_ORDERS,
    MoELayer,
    MoELayerTensors,
    check_checkpoint_nibble_order,
    check_nibble_order,
    dequantize_fp4_numpy,
    infer_config,
    layer_prefix,
    list_moe_layers,
    nibble_order_errors,
    read_moe_layer,
    swap_nibbles,
)
from jax_megamoe.numerics.progress import make_progress

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "SafetensorsFile",
    "Checkpoint",
    "read_safetensors_header",
    "safetensors_dtype",
    "MoELayerTensors",
    "MoELayer",
    "read_moe_layer",
    "load_moe_layer",
    "build_moe_layer",
    "load_converted",
    "infer_config",
    "layer_prefix",
    "list_moe_layers",
    "dequantize_fp4_numpy",
    "swap_nibbles",
    "nibble_order_errors",
    "check_nibble_order",
    "check_checkpoint_nibble_order",
    "NIBBLE_ORDERS",
    "SAFETENSORS_DTYPES",
    "CONFIG_KEYS",
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_NAME",
    "MAX_HEADER_BYTES",
    "make_progress",
]
