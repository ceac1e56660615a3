"""Time of the clipping engine's fast path vs its vmap reference vs a non-private gradient, for any-Flax models.

    python benchmarks/fastclip_step.py [--batch-sizes 256 1024] [--runs 5] [--smoke]

Models (plain ``flax.linen``, from ``tests/fastclip_models.py``): a ViT on
28×28×1 inputs (7×7 patches by a strided ``nn.Conv`` → 16 tokens + a cls
token, width 64, 2 blocks, 4 heads, MLP 128) and a transformer over 32 token
ids (vocabulary 512, ``nn.Embed``, a learned positional table, same blocks).
For each batch size B, three jitted functions on the same batch in one
process: the clipping engine's ``fast`` path (:func:`dptune.trainer.clipping.clipped_sum`),
its ``vmap`` reference (per-example gradients of the whole model) and the non-private gradient of the mean
loss. Each is compiled and run once, then run ``--runs`` times, interleaved so
that machine noise hits all alike; the table gives the medians (seconds), the
ratios, and the compile times. Then, per model, which layers took which rule.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dptune.trainer import clipping
from tests.fastclip_models import TinyTransformer, TinyViT


def models(smoke: bool):
    rng = np.random.default_rng(0)
    width = {"dim": 16, "depth": 1, "heads": 2, "mlp": 32} if smoke else {"dim": 64, "depth": 2, "heads": 4, "mlp": 128}
    vit = TinyViT(num_classes=10, patch=7, **width)
    text = TinyTransformer(vocab=512, num_classes=4, **width)
    yield "ViT", vit, lambda b: rng.standard_normal((b, 28, 28, 1)).astype(np.float32), 10
    yield "transformer", text, lambda b: rng.integers(0, 512, (b, 32)), 4


def rule_summary(rules: dict[str, str]) -> list[str]:
    """'rule: layer, layer, …' with each layer (parameter path without its leaf name) once."""
    layers = defaultdict(list)
    for path, rule in rules.items():
        layer = path.rsplit("/", 1)[0] if "/" in path else f"(top module) {path}"
        if layer not in layers[rule]:
            layers[rule].append(layer)
    return [f"  {rule} ({len(names)}): {', '.join(names)}" for rule, names in sorted(layers.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=(256, 1024))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny models, B = 16, 2 runs: checks the script runs")
    args = ap.parse_args()
    sizes, runs = ((16,), 2) if args.smoke else (tuple(args.batch_sizes), args.runs)
    print(f"# {jax.devices()[0].platform}, {os.cpu_count()} CPUs, jax {jax.__version__}", flush=True)
    rows, summaries = [], []
    for name, model, make_x, classes in models(args.smoke):
        params = None
        for b in sizes:
            x = jnp.asarray(make_x(b))
            y = jnp.asarray(np.random.default_rng(1).integers(0, classes, b))
            mask = jnp.ones(b, jnp.float32)
            if params is None:
                params = model.init(jax.random.key(0), x[:2])["params"]
                n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
                planned = clipping.plan(model, params, x[:2], y[:2], path="fast")
                summaries.append((name, n_params, planned.reason, rule_summary(planned.rule_map)))

            def nonprivate(p, x, y, mask, clip, model=model):
                def loss(q):
                    return jnp.mean(jax.vmap(clipping.cross_entropy)(model.apply({"params": q}, x), y))
                return jax.grad(loss)(p)

            fns = {
                "fast": jax.jit(lambda p, x, y, m, c, model=model:
                                clipping.clipped_sum(model, p, x, y, m, c, path="fast").grads),
                "vmap": jax.jit(lambda p, x, y, m, c, model=model:
                                clipping.clipped_sum(model, p, x, y, m, c, path="vmap").grads),
                "non-private": jax.jit(nonprivate),
            }
            compile_s, times = {}, defaultdict(list)
            for key, fn in fns.items():
                print(f"{name} B={b}: compiling {key}", file=sys.stderr, flush=True)
                t = time.perf_counter()
                jax.block_until_ready(fn(params, x, y, mask, 1.0))
                compile_s[key] = time.perf_counter() - t
            for r in range(runs):
                print(f"{name} B={b}: run {r + 1}/{runs}", file=sys.stderr, flush=True)
                for key, fn in fns.items():
                    t = time.perf_counter()
                    jax.block_until_ready(fn(params, x, y, mask, 1.0))
                    times[key].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((name, b, med, compile_s))

    print()
    print("| model | B | fast clipped sum (s) | vmap clipped sum (s) | non-private grad (s) | fast ÷ non-private "
          "| vmap ÷ non-private | vmap ÷ fast | compile fast / vmap / non-private (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, b, med, comp in rows:
        f, v, n = med["fast"], med["vmap"], med["non-private"]
        print(f"| {name} | {b} | {f:.3f} | {v:.3f} | {n:.3f} | {f / n:.2f} | {v / n:.2f} | {v / f:.2f} "
              f"| {comp['fast']:.1f} / {comp['vmap']:.1f} / {comp['non-private']:.1f} |")
    print(f"\n(median of {runs} runs each, interleaved; same process, same batch)")
    for name, n_params, reason, lines in summaries:
        print(f"\n{name} ({n_params:,} parameters): rules by layer"
              + (f" — fell back to vmap: {reason}" if reason else ""))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
