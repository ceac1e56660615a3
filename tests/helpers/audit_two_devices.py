"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=2: audits on two host devices.

Prints one JSON line per audit (claimed ε, lower bounds, devices, clipping path); tests/test_audit.py checks them.
"""

import dataclasses
import json

import jax

from dptune.data.datasets import ArraySplit, load_dataset
from dptune.search import audit
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig

assert jax.local_device_count() == 2, jax.devices()
ds = load_dataset("digits")
small = dataclasses.replace(ds, train=ArraySplit(ds.train.images[:100], ds.train.labels[:100]))
hp = Hyperparams(batch_size=100, learning_rate=0.1, clip_norm=1.0, noise_multiplier=8.0, optimizer="sgd")
rows = []
for threat, clipping, seed in (("white-box", "bookkeeping", 0), ("white-box", "vmap", 1), ("black-box", "auto", 2)):
    cfg = RunConfig(microbatch_size=16, clipping=clipping, private_seed=seed, num_devices=2, eval_every=1000)
    r = audit.run_audit(small, hp, 10, config=cfg, budget=PrivacyBudget(100.0, 1e-5), threat_model=threat,
                        canaries=200)
    rows.append({k: v for k, v in r.as_dict().items() if k != "notes"})
print(json.dumps(rows))
