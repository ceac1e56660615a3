"""The audit table of the closing note: claimed ε beside the one-run lower bounds on mnist5k.

    python benchmarks/audit_table.py [--steps 40] [--batch-size 500] [--canaries 1000] [--json out.json]

For ε = 1, 3, 8 (δ = 1e-5, PLD accounting) it calibrates σ so that ``--steps``
Poisson steps at the expected batch ``--batch-size`` spend exactly that ε on
mnist5k's training split, then runs ``dptune.search.audit.run_audit`` twice (white-box
Dirac canaries, black-box noise-image canaries), each with ``--canaries``
canaries through the real training path (cnn, book-keeping clipping, all local
devices). It then repeats the audits with two test-only faults
(:mod:`dptune.faults`: noise 10× too small; clipping skipped). Each row gives
the claimed ε of what ran (black-box: N grows by the included canaries), the
lower bound at 95% confidence (Steinke et al.; f-DP variant in brackets), the
largest bound a perfect attack could show with that m, and the CPU minutes of
the audit (user + system time of this process, so compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--mechanisms", nargs="*", default=["none", "noise_scaled_down", "no_clipping"],
                    help="'none' (the real mechanism) and test-only faults of dptune.faults")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    # The faults are test-only; this benchmark exists to show that the audit catches them.
    os.environ["DPTUNE_TEST_ONLY_FAULTS"] = "I know this run is not private"

    import contextlib

    from dptune import faults
    from dptune.data.datasets import load_dataset
    from dptune.privacy import accounting as privacy
    from dptune.search import audit
    from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig

    ds = load_dataset("mnist5k")
    n = len(ds.train)
    q = args.batch_size / n
    delta = 1e-5
    rows = []
    print(f"mnist5k: N = {n}, B = {args.batch_size} (q = {q:.4f}), {args.steps} steps, m = {args.canaries}, "
          f"δ = {delta:g}", flush=True)
    header = (f"{'fault':<18} {'ε target':>8} {'σ':>6} {'model':<10} {'claimed ε':>9} {'lower bound (f-DP)':>20} "
              f"{'max (m)':>12} {'AUROC':>6} {'CPU min':>8}")
    print(header)
    for fault in [None if name == "none" else name for name in args.mechanisms]:
        for eps in args.epsilons:
            sigma = privacy.noise_for_epsilon(q, args.steps, eps, delta, "pld")
            hp = Hyperparams(batch_size=args.batch_size, learning_rate=2.0, clip_norm=1.0, noise_multiplier=sigma,
                             optimizer="momentum", momentum=0.9)
            for threat in audit.THREAT_MODELS:
                cfg = RunConfig(model="cnn", microbatch_size=256, clipping="bookkeeping", eval_every=10**6)
                ctx = faults.inject(fault) if fault else contextlib.nullcontext()
                tick = time.perf_counter()
                with ctx:
                    r = audit.run_audit(ds, hp, args.steps, config=cfg, budget=PrivacyBudget(100.0, delta, "pld"),
                                        threat_model=threat, canaries=args.canaries)
                row = {"fault": fault, "target_epsilon": eps, "sigma": sigma, **r.as_dict(),
                       "bench_wall_seconds": time.perf_counter() - tick}
                rows.append(row)
                flag = "  EXCEEDS" if r.exceeds_claim else ""
                print(f"{fault or 'none':<18} {eps:>8g} {sigma:>6.3f} {threat:<10} {r.claimed_epsilon:>9.3f} "
                      f"{r.epsilon_lower_bound:>9.3f} ({r.epsilon_lower_bound_fdp:>6.3f})   "
                      f"{r.max_lower_bound:>5.2f} ({r.canaries}) {r.auroc:>6.3f} {r.cpu_seconds / 60:>8.2f}{flag}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
