"""The sharded step equals the single-device step (4 forced host devices, own process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_four_devices_equal_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = Path(__file__).parent / "helpers" / "multidevice_check.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Same key, same batch: only the order of floating-point summation differs.
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["param_scale"]), result
    assert result["bookkeeping_diff"] <= 1e-5 * max(1.0, result["param_scale"]), result
    assert result["acc1"] == pytest.approx(result["acc4"], abs=1e-6)
    assert result["devices_used"] == 4 and result["steps"] == 4
    assert result["default_devices"] == [4, 3, 1]
    assert result["ghost_diff"] <= 1e-5 * max(1.0, result["ghost_scale"]), result
    assert result["nonprivate_diff"] <= 1e-5 * max(1.0, result["grad_scale"]), result
    assert result["augmented_diff"] <= 1e-5 * max(1.0, result["grad_scale"]), result
