"""Train repeatedly with evaluation off on 2 forced host devices: the loop that once aborted in XLA's rendezvous.

Run as ``python dispatch_loop.py RUNS`` under
XLA_FLAGS=--xla_force_host_platform_device_count=2; tests/test_dispatch.py
checks that the process exits 0. Before the fix the host ran ahead until 32
programs were pending and the process died of XLA's rendezvous timeout
(SIGABRT), which no Python code here can catch.
"""

import json
import sys

import jax

from dptune.data.datasets import load_dataset
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate

assert jax.local_device_count() == 2, jax.devices()
runs = int(sys.argv[1])
ds = load_dataset("mnist5k")
steps = []
for run in range(runs):
    # Non-private and private in turn: the first sums gradients with XLA's own
    # all-reduce, the second with dptune's shard_map psum; both aborted.
    private = run % 2 == 1
    hp = Hyperparams(batch_size=1024, learning_rate=0.5, clip_norm=1.0, noise_multiplier=1.0 if private else 0.0)
    config = RunConfig(private=private, microbatch_size=32, eval_every=10**6, private_seed=run)
    result = train_and_evaluate(ds, hp, 12, config=config, budget=PrivacyBudget(8.0, 1e-5) if private else None)
    steps.append(result.steps)
    print(f"run {run} done", file=sys.stderr, flush=True)
print(json.dumps({"runs": runs, "steps": steps, "devices": result.devices}))
