"""Child process of test_v4_model_checkpoint: load a checkpoint over a 2-device CPU mesh.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; argv: checkpoint folder, mode.
Prints ``OK`` after checking the placement and that an expert-parallel MoE block gives the bits
of the same block loaded on one device.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_megamoe._src.models.deepseek_v4 import loading


def main(path: str, mode: str) -> None:
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    kw = {"backend": "reference"}
    model = loading.load_checkpoint(path, mode=mode, mesh=mesh, progress=False, model_kwargs=kw)
    one = loading.load_checkpoint(path, mode=mode, progress=False, model_kwargs=kw)
    for layer in model.layers:
        w = layer.ffn.moe_weights
        for leaf in (w.l1, w.l1_sf, w.l2, w.l2_sf):
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("ep")), leaf.ndim), leaf.sharding
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {w.num_experts // 2}
        assert layer.ffn.mesh is mesh and layer.ffn.ep_axis == "ep"
        q = layer.attn.wq_a.weight.get_value()
        assert q.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), q.ndim)
        assert len(q.addressable_shards) == 2
    for a, b in zip(jax.tree.leaves(model.layers[1].ffn.moe_weights), jax.tree.leaves(one.layers[1].ffn.moe_weights)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = (jax.random.normal(jax.random.key(0), (8, model.config.hidden_size)) * 0.5).astype(jnp.bfloat16)
    y_ep = np.asarray(model.layers[1].ffn(x))
    y_1 = np.asarray(one.layers[1].ffn(x))
    assert np.abs(y_1.astype(np.float32)).max() > 0
    np.testing.assert_array_equal(y_ep, y_1)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
