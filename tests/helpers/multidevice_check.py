"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4: compare 1 vs 4 devices.

Prints one JSON line with the largest differences; tests/test_multidevice.py checks it.
"""

import json

import jax
import numpy as np

from dptune.data.datasets import load_dataset
from dptune.models.builtin import build_model, init_params
from dptune.trainer.dp_step import step_functions
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, evaluate, train_and_evaluate, train_step

assert jax.local_device_count() == 4, jax.devices()
ds = load_dataset("digits")
model = build_model("cnn", ds.num_classes)
params0 = init_params(model, ds.image_shape, jax.random.key(0))
idx = np.sort(np.random.default_rng(0).choice(len(ds.train), 150, replace=False))
hp = Hyperparams(batch_size=128, learning_rate=0.5, clip_norm=0.7, noise_multiplier=1.3, optimizer="momentum")

out = {}
for n_dev, clipping in ((1, "vmap"), (4, "vmap"), (4, "bookkeeping")):
    fns = step_functions(model, "momentum", 64, tuple(jax.local_devices()[:n_dev]), clipping)
    state = fns.init_state(jax.device_put(params0, fns.replicated))
    key = jax.device_put(jax.random.key(11), fns.replicated)
    for t in range(2):
        state = train_step(fns, state, ds, idx, key, t, hp, 128.0, 0.7, 1.3, 0.5)
    out[n_dev, clipping] = {
        "params": [np.asarray(p) for p in jax.tree_util.tree_leaves(state.params)],
        "sharding": str(state.params["Dense_0"]["kernel"].sharding),
        "acc": evaluate(fns, state.params, ds.validation, 200),
    }

# Reference: one device, vmap. Both paths on 4 devices must match it.
ref = out[1, "vmap"]
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref["params"], out[4, "vmap"]["params"], strict=False))
bk_diff = max(
    float(np.max(np.abs(a - b))) for a, b in zip(ref["params"], out[4, "bookkeeping"]["params"], strict=False)
)

# The non-private baseline's plain batched gradient, 1 vs 4 devices.
x, y = ds.train.take(idx[:64])
grads = {}
for n_dev in (1, 4):
    fns = step_functions(model, "momentum", 64, tuple(jax.local_devices()[:n_dev]))
    p = jax.device_put(params0, fns.replicated)
    acc = fns.accumulate_nonprivate(p, fns.zeros_like(p), *fns.shard_batch(x, y, np.ones(64, np.float32)), 1.0)
    grads[n_dev] = [np.asarray(g) for g in jax.tree_util.tree_leaves(acc)]
# Book-keeping with 2 augmented copies per example and a frozen first block: the
# copies of one example must stay on one device (they are consecutive rows).
from dptune.data.augment import Augmentation  # noqa: E402 (after the device count is set above)
from dptune.models.freezing import trainable_mask  # noqa: E402
from dptune.randomness import SecretSeed  # noqa: E402

xk = Augmentation(2, shift=1)(x, SecretSeed.from_int(0).augmentation_words(0, np.arange(len(x)), 2))
mask = trainable_mask(params0, "last_3")
aug = {}
for n_dev in (1, 4):
    fns = step_functions(model, "momentum", 64, tuple(jax.local_devices()[:n_dev]), "bookkeeping")
    p = jax.device_put(params0, fns.replicated)
    acc = fns.accumulate(p, fns.zeros_like(p), *fns.shard_batch(xk, y, np.ones(64, np.float32)), 0.5, mask)
    aug[n_dev] = [np.asarray(g) for g in jax.tree_util.tree_leaves(acc)]
augmented_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(aug[1], aug[4], strict=False))
nonprivate_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(grads[1], grads[4], strict=False))
grad_scale = max(float(np.max(np.abs(g))) for g in grads[1])
scale = max(float(np.max(np.abs(a))) for a in ref["params"])
r = train_and_evaluate(
    ds,
    hp,
    4,
    config=RunConfig(private_seed=0, microbatch_size=64, num_devices=4, eval_every=2),
    budget=PrivacyBudget(8.0, 1e-5),
)
# A ResNet's deep layers (small spatial size, many channels): their per-example kernel gradients
# must stay local to each device until the psum. (Gram-matrix norms, once used here, are off by
# default: dptune.trainer.clipping.rules.conv_uses_ghost.)
from dptune.models.builtin import ResNet, _BasicBlock  # noqa: E402
from dptune.trainer.clipping import rules  # noqa: E402

resnet = ResNet(10, (1, 1), _BasicBlock)
rparams = init_params(resnet, (12, 12, 3), jax.random.key(0))
assert not rules.conv_uses_ghost((1, 3, 3, 64), (1, 3, 3, 64), 3)
rx = np.random.default_rng(5).standard_normal((8, 12, 12, 3)).astype(np.float32)
ry = np.arange(8, dtype=np.int32) % 10
rsum = {}
for n_dev in (1, 4):
    fns = step_functions(resnet, "sgd", 8, tuple(jax.local_devices()[:n_dev]), "bookkeeping")
    p = jax.device_put(rparams, fns.replicated)
    acc = fns.accumulate(p, fns.zeros_like(p), *fns.shard_batch(rx, ry, np.ones(8, np.float32)), 0.5)
    rsum[n_dev] = [np.asarray(g) for g in jax.tree_util.tree_leaves(acc)]
ghost_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(rsum[1], rsum[4], strict=False))
ghost_scale = max(float(np.max(np.abs(g))) for g in rsum[1])

# Without num_devices: the most devices that evenly share the microbatch.
from dptune.trainer.train import _devices  # noqa: E402

default_devices = [len(_devices(RunConfig(microbatch_size=m))) for m in (64, 6, 5)]
print(
    json.dumps(
        {
            "ghost_diff": ghost_diff,
            "ghost_scale": ghost_scale,
            "default_devices": default_devices,
            "max_abs_diff": diff,
            "augmented_diff": augmented_diff,
            "bookkeeping_diff": bk_diff,
            "param_scale": scale,
            "nonprivate_diff": nonprivate_diff,
            "grad_scale": grad_scale,
            "acc1": ref["acc"],
            "acc4": out[4, "vmap"]["acc"],
            "devices_used": r.devices,
            "steps": r.steps,
        }
    )
)
