"""One training run as process I of N (or alone), printing a digest of the final parameters as JSON.

    python multiprocess_check.py --process-id I --num-processes N --port P --out FILE

Run with XLA_FLAGS=--xla_force_host_platform_device_count=D. Every process
trains the same configuration on digits with a fixed private seed (a test:
the secret must be fixed to compare runs); process 0 writes the parameters.
"""

import argparse
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--feed", default="resident")
    ap.add_argument("--out", required=True)
    ap.add_argument("--clip-norm", type=float, default=1.0)
    args = ap.parse_args()
    import jax

    from dptune.trainer import multihost
    if args.num_processes > 1:
        multihost.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    import hashlib

    from dptune.data.datasets import load_dataset
    from dptune.randomness import SecretSeed
    from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate
    # Each process draws its own OS secret; after sharing, all must hold process 0's.
    shared = multihost.shared_secret(SecretSeed.from_os())
    with open(f"{args.out}.secret.{jax.process_index()}", "w") as f:
        f.write(hashlib.sha256(shared.bits).hexdigest())

    ds = load_dataset("digits")
    # One secret for both layouts: an equality test of layouts, not two runs of one fixed seed. A fixed seed
    # would be keyed on each layout (they agree only up to rounding); a secret handed in as the run's own is not.
    same = SecretSeed(SecretSeed.from_int(123).bits)
    cfg = RunConfig(model="cnn", microbatch_size=64, secret=same, eval_every=2, feed=args.feed,
                    save_checkpoint=args.out + ".msgpack")
    r = train_and_evaluate(
        ds,
        Hyperparams(batch_size=150, learning_rate=0.5, clip_norm=args.clip_norm, noise_multiplier=1.1),
        3,
        config=cfg,
        budget=PrivacyBudget(8.0, 1e-5),
    )
    if jax.process_index() == 0:
        from dptune.models import checkpoint

        params = checkpoint.load(args.out + ".msgpack")
        leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(params)]
        with open(args.out, "w") as f:
            json.dump(
                {
                    "params": np.concatenate(leaves).tolist(),
                    "devices": r.devices,
                    "steps": r.steps,
                    "epsilon": r.epsilon,
                    "val_accuracy": r.val_accuracy,
                    "processes": jax.process_count(),
                    "feed": r.feed,
                },
                f,
            )


if __name__ == "__main__":
    main()
