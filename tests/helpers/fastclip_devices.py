"""Run with 4 forced host devices: the fast clipped sum inside shard_map (4 devices) equals one device.

Prints one JSON line: the largest difference of the clipped sums and norms, and their scales.
Used by tests/test_fastclip.py::test_four_devices_equal_one.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dptune.trainer.clipping import clipped_sum
from tests.fastclip_models import TinyViT


def main() -> None:
    devices = jax.devices()
    assert len(devices) == 4, devices
    # The ViT: closed-form rules and layer_vjp of the top module (taps on its children's inputs too).
    model = TinyViT(dim=8, mlp=16)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 8))
    mask = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1], jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    clip = 0.5

    one = jax.jit(lambda p, x, y, m: clipped_sum(model, p, x, y, m, clip, path="fast"))(params, x, y, mask)

    def local(p, x, y, m):
        out = clipped_sum(model, p, x, y, m, clip, path="fast")
        return jax.lax.psum(out.grads, "data"), out.norms

    rep, rows = PartitionSpec(), PartitionSpec("data")
    mesh = Mesh(np.asarray(devices), ("data",))
    grads, norms = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rep, rows, rows, rows),
                                         out_specs=(rep, rows)))(params, x, y, mask)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                                 jax.tree_util.tree_leaves(one.grads), strict=False))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(one.grads))
    print(json.dumps({"grad_diff": diff, "grad_scale": scale,
                      "norm_diff": float(jnp.max(jnp.abs(norms - one.norms))),
                      "norm_scale": float(jnp.max(one.norms)), "reason": one.reason}))


if __name__ == "__main__":
    main()
