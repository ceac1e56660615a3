"""dptune's DP step beside Opacus 1.6 on the same CNN, batch sizes and threads: one table.

    python benchmarks/peer_opacus.py [--batch-sizes 64 256 1024] [--steps 20] [--rounds 3] [--venv .bench/opacus-venv]

Opacus runs in a virtual environment this script makes itself the first time
(``pip install torch==2.13.0 opacus``: a pinned CPU build of torch; an
unpinned torch would pull a several-GB CUDA build). dptune runs in the Python
that runs this script. Every (framework, mode, B) is its own process, so each
peak RSS is that configuration's alone; both frameworks get the same number of
threads (dptune as its CLI runs on a CPU host: one JAX device per thread,
:func:`dptune.trainer.xla_options.use_host_cores`).

Timed: one whole DP-SGD step on one logical batch of B examples held in memory
(forward, per-example clipping, noise, optimizer update), median of
``--steps`` after two warm-up steps. Modes:

* Opacus ``hooks`` (its default per-sample gradients) and ``ghost`` (ghost
  clipping, two backward passes), and plain PyTorch without DP;
* dptune ``bookkeeping`` (its default), ``vmap`` (the reference), and its
  non-private step. As in training, the logical batch is split into
  microbatches of the size dptune measures as fastest for the device set
  (:mod:`dptune.trainer.microbatch`; the non-private step uses book-keeping's), their
  clipped sums accumulated, then noise added once and the update applied.

This machine is shared and noisy: ``--rounds R`` repeats every cell R times
(each round runs all modes of a batch size back to back), reports median
examples/s, and the ratio to the faster Opacus mode per round with its
median and range.

Peak memory: the process's peak RSS, and its growth over the RSS just before
the first step (the step's own working memory, roughly).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = (28, 28, 1)
CLASSES = 10


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step, steps: int) -> list[float]:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return times


def worker_opacus(mode: str, b: int, steps: int, threads: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(8, 16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, CLASSES),
    )
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(b, 1, 28, 28)
    y = torch.randint(0, CLASSES, (b,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    if mode != "nonprivate":
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                   max_grad_norm=1.0, criterion=criterion, grad_sample_mode=mode)
        if mode == "ghost":
            model, optimizer, criterion, _ = made
        else:
            model, optimizer, _ = made

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    before = _rss_mib()
    times = _timed(step, steps)
    return {"params": params, "rate": b / statistics.median(times), "peak": _peak_mib(),
            "step_mem": _peak_mib() - before}


def worker_dptune(mode: str, b: int, steps: int, threads: int, microbatch_size: int = 0) -> dict:
    from dptune.trainer import xla_options

    # As the dptune CLI does before JAX starts: one host device per thread it may use.
    xla_options.use_host_cores(limit=threads)
    import jax
    import numpy as np

    from dptune.models.builtin import build_model, count_params, init_params
    from dptune.trainer import dispatch, microbatch
    from dptune.trainer.dp_step import step_functions

    devices = tuple(jax.local_devices())
    model = build_model("cnn", CLASSES)
    params = init_params(model, IMAGE, jax.random.key(0))
    private = mode != "nonprivate"
    if not microbatch_size:  # the product's default: measured per device set (dptune.trainer.microbatch)
        microbatch_size = microbatch.choose("cnn", IMAGE, CLASSES, devices, clipping=mode, upper=b,
                                            use_cache=False).microbatch_size
    fns = step_functions(model, "momentum", microbatch_size, devices, mode if private else "vmap")
    accumulate = fns.accumulate if private else fns.accumulate_nonprivate
    rng = np.random.default_rng(0)
    chunks = [fns.shard_batch(rng.standard_normal((microbatch_size, *IMAGE)).astype(np.float32),
                              rng.integers(0, CLASSES, microbatch_size).astype(np.int32),
                              np.ones(microbatch_size, np.float32))
              for _ in range(-(-b // microbatch_size))]
    key = jax.random.key(0)
    sigma, clip = (1.0, 1.0) if private else (0.0, float("inf"))
    state = {"s": fns.init_state(jax.device_put(params, fns.replicated)), "t": 0}

    def step() -> None:
        # One logical batch: the clipped sums of its microbatches, then noise once and the update.
        state["t"] += 1
        # Bounded run-ahead as in dptune.trainer.train (many microbatches would otherwise deadlock XLA:CPU;
        # dptune.trainer.dispatch).
        acc = dispatch.track(fns.zeros_like(state["s"].params))
        for x, y, mask in chunks:
            acc = dispatch.track(accumulate(state["s"].params, acc, x, y, mask, clip))
        state["s"] = dispatch.track(fns.apply(state["s"], acc, key, state["t"], sigma, clip, float(b), 0.1, 0.9, 0.0))
        jax.block_until_ready(state["s"].params)

    step()  # compile outside the memory baseline, like torch's lazy init above
    before = _rss_mib()
    times = _timed(step, steps)
    return {
        "params": count_params(params),
        "rate": b / statistics.median(times),
        "peak": _peak_mib(),
        "step_mem": _peak_mib() - before,
        "microbatch": microbatch_size,
        "devices": len(devices),
    }


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import opacus, torch; print(opacus.__version__, torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"making {venv} (torch==2.13.0, opacus) …", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "opacus"], check=True)
    return python


def run(python: Path, framework: str, mode: str, b: int, steps: int, threads: int, microbatch_size: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [str(python), __file__, "--worker", framework, mode, str(b), str(steps), str(threads), str(microbatch_size)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        framework, mode, b, steps, threads, micro = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8])
        if framework == "opacus":
            print(json.dumps(worker_opacus(mode, b, steps, threads)))
        else:
            print(json.dumps(worker_dptune(mode, b, steps, threads, micro)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=(64, 256, 1024))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--venv", type=Path, default=HERE.parent / ".bench" / "opacus-venv")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every cell this many times (rounds interleaved); report medians and the ratio's range",
    )
    args = ap.parse_args()
    torch_python = ensure_venv(args.venv)
    versions = subprocess.run(
        [str(torch_python), "-c", "import opacus, torch; print(opacus.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    import jax

    print(
        f"small CNN on 28×28×1, {args.threads} threads, median of {args.steps} steps, one process per cell, "
        f"{args.rounds} round(s); opacus {versions[0]} / torch {versions[1]}, "
        f"jax {jax.__version__} ({jax.devices()[0].device_kind})"
    )
    modes = [
        ("opacus", "hooks"),
        ("opacus", "ghost"),
        ("opacus", "nonprivate"),
        ("dptune", "bookkeeping"),
        ("dptune", "vmap"),
        ("dptune", "nonprivate"),
    ]
    header = (
        "B",
        "framework",
        "mode",
        "params",
        "ex/s",
        "vs best Opacus DP",
        "range over rounds",
        "DP ÷ own non-private time",
        "peak RSS MiB",
        "step Δ MiB",
        "dptune microbatch × devices",
    )
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for b in args.batch_sizes:
        rounds = []
        for _ in range(args.rounds):
            rows: dict = {}
            for m in modes:
                # dptune's non-private step runs on the microbatch its book-keeping step chose.
                micro = (
                    rows.get(("dptune", "bookkeeping"), {}).get("microbatch", 0) if m == ("dptune", "nonprivate") else 0
                )
                rows[m] = run(
                    torch_python if m[0] == "opacus" else Path(sys.executable), *m, b, args.steps, args.threads, micro
                )
            rounds.append(rows)
        _print_rows(b, modes, rounds)


def _print_rows(b: int, modes: list, rounds: list[dict]) -> None:
    """One line per mode: median ex/s over rounds; the ratio to the best Opacus DP mode per round (median, range)."""
    for m in modes:
        framework, mode = m
        ok = [rows for rows in rounds if "error" not in rows[m]]
        if not ok:
            print(f"{b} | {framework} | {mode} | failed: {rounds[0][m]['error']}")
            continue
        r = ok[len(ok) // 2][m]
        rate = statistics.median(rows[m]["rate"] for rows in ok)
        vs, spread, ratio = "", "", ""
        if mode != "nonprivate":
            per_round = [rows[m]["rate"] / max(rows[o].get("rate", 0.0) for o in modes[:2]) for rows in ok]
            vs = f"{statistics.median(per_round):.2f}×"
            spread = f"{min(per_round):.2f}–{max(per_round):.2f}" if len(per_round) > 1 else ""
            own = [rows[(framework, "nonprivate")].get("rate") for rows in ok]
            if all(own):
                ratio = f"{statistics.median(o / rows[m]['rate'] for o, rows in zip(own, ok, strict=False)):.2f}"
        layout = f"{r['microbatch']} × {r['devices']}" if "microbatch" in r else ""
        peak = statistics.median(rows[m]["peak"] for rows in ok)
        step_mem = statistics.median(rows[m]["step_mem"] for rows in ok)
        print(
            f"{b} | {framework} | {mode} | {r['params']:,} | {rate:,.0f} | {vs} | {spread} | {ratio} | "
            f"{peak:,.0f} | {step_mem:,.0f} | {layout}"
        )


if __name__ == "__main__":
    main()
