"""Expert parallelism: the Mega MoE layer with experts and tokens sharded over mesh axes.

One level (:func:`ep_moe`; :func:`ep_moe_hier` with ``axes=(axis, None)``) within a host; two levels
(:func:`ep_moe_hier`) over a host x GPU mesh. Same function as :func:`jax_megamoe.reference.mega_moe`.
"""

from jax_megamoe._src.kernels.parallel import (
    BACKENDS,
    COLLECTIVE_DISPATCHES,
    DISPATCHES,
    EPOptions,
    dispatch_path,
    ep_moe,
    ep_path,
    exact_capacity,
    fused_available,
    rank_table,
    shard_weights,
)
from jax_megamoe._src.kernels.parallel_hier import (
    INTRANODE,
    OVERFLOW_POLICY,
    EPStats,
    HierPath,
    ep_moe_hier,
    hier_path,
)

__all__ = [
    "ep_moe",
    "EPOptions",
    "ep_moe_hier",
    "shard_weights",
    "dispatch_path",
    "ep_path",
    "hier_path",
    "exact_capacity",
    "fused_available",
    "rank_table",
    "EPStats",
    "HierPath",
    "DISPATCHES",
    "COLLECTIVE_DISPATCHES",
    "INTRANODE",
    "OVERFLOW_POLICY",
    "BACKENDS",
]
