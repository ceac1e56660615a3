"""Run in its own process with forced host devices: each feed's step equals the host loop's.

Prints one JSON line: for each (devices, clipping, private, augmentation, feed)
the largest |Δ| of the parameters after two steps, against the loop feed with
the same Poisson indices and noise key, and the scale of the parameters.
"""

import json
import sys

import jax
import numpy as np

from dptune.data.augment import Augmentation
from dptune.data.datasets import load_dataset
from dptune.data.sampling import poisson_batch
from dptune.models.builtin import build_model, init_params
from dptune.randomness import SecretSeed
from dptune.trainer import feed
from dptune.trainer.dp_step import step_functions
from dptune.trainer.train import Hyperparams, augmenter, train_step


def run(ds, devices, clipping, private, aug, which):
    model = build_model("cnn", ds.num_classes)
    fns = step_functions(model, "momentum", 32, devices, clipping)
    params = init_params(model, ds.image_shape, jax.random.key(0))
    state = fns.init_state(jax.device_put(params, fns.replicated))
    secret = SecretSeed.from_int(11)
    augment = augmenter(aug, secret) if aug.active else None
    key = jax.device_put(secret.noise_key(), fns.replicated)
    hp = Hyperparams(batch_size=90, learning_rate=0.3, clip_norm=0.7 if private else float("inf"),
                     noise_multiplier=1.3 if private else 0.0)
    n = len(ds.train)
    feeder = {"resident": lambda: feed.ResidentFeed(fns, ds.train),
              "streamed": lambda: feed.StreamedFeed(fns, ds.train, augment, copies=aug.multiplicity,
                                                    sampling_rate=hp.batch_size / n),
              "loop": lambda: None}[which]()
    for t in range(2):
        # Step 1 is empty: the noise-only update must match too.
        indices = np.zeros(0, np.int64) if t == 1 else poisson_batch(secret.batch_sampler(t), n, hp.batch_size / n)
        args = (key, t, hp.noise_multiplier, hp.clip_norm, float(hp.batch_size), hp.learning_rate, 0.9, 0.0)
        if feeder is None:
            state = train_step(fns, state, ds, indices, key, t, hp, float(hp.batch_size), hp.clip_norm,
                               hp.noise_multiplier, hp.learning_rate, private, augment=augment)
        else:
            state = feeder.step(state, indices, private, args, None)
    return jax.device_get(state.params)


def main():
    ds = load_dataset("digits")
    out = {"diffs": {}, "scale": 0.0}
    everything = tuple(jax.devices())
    plain, augmented = Augmentation(), Augmentation(2, 1, True)
    cases = [  # (devices, clipping, private, augmentation, feeds)
        (everything, "bookkeeping", True, plain, ("streamed", "resident")),
        (everything, "vmap", True, plain, ("resident",)),
        (everything, "bookkeeping", False, plain, ("resident",)),
        (everything, "bookkeeping", True, augmented, ("streamed",)),
        (everything[:1], "bookkeeping", True, plain, ("streamed", "resident")),
    ]
    for devices, clipping, private, aug, which_feeds in cases:
        ref = run(ds, devices, clipping, private, aug, "loop")
        out["scale"] = max(out["scale"], max(float(np.max(np.abs(leaf))) for leaf in jax.tree_util.tree_leaves(ref)))
        for which in which_feeds:
            got = run(ds, devices, clipping, private, aug, which)
            diff = max(float(np.max(np.abs(a - b))) for a, b in
                       zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got), strict=False))
            out["diffs"][
                f"{len(devices)}dev/{clipping}/{'dp' if private else 'plain'}/aug{aug.multiplicity}/{which}"
            ] = diff
    # Across device counts: the 4-device resident step equals the 1-device loop.
    one = run(ds, tuple(jax.devices()[:1]), "bookkeeping", True, Augmentation(), "loop")
    many = run(ds, tuple(jax.devices()), "bookkeeping", True, Augmentation(), "resident")
    out["diffs"]["1dev-loop/vs/alldev-resident"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many), strict=False)
    )
    out["devices"] = len(jax.devices())
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
