"""benchmarks/gpu_check.sh runs end to end (smoke mode on CPU) and reports what it measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    feeds = sorted(w["dp"]["feed"] for w in result["workloads"])
    assert feeds == ["resident", "streamed"]
    for w in result["workloads"]:
        assert w["dp"]["examples_per_s"] > 0 and w["plain"]["examples_per_s"] > 0
        assert w["ratio"] == pytest.approx(w["dp"]["examples_per_s"] / w["plain"]["examples_per_s"])
    assert {p["kind"] for p in result["pipeline"]} == {"imagenet-jpeg", "cifar-png"}
    assert all(p["images_per_s"] > 0 for p in result["pipeline"])
    assert "DP step consumption" in proc.stdout
