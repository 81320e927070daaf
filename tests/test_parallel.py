"""Data parallelism: the jitted train step on 4 fake CPU devices equals the 1-device step."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import REPO


def test_four_devices_match_one_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multidevice_check.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["per_device_batch"] == 2
    np.testing.assert_allclose(report["losses_4"], report["losses_1"], rtol=2e-5)
    assert report["param_allclose_excess"] <= 0.0
    # The steps did train: the loss moved.
    assert report["losses_1"][0] != report["losses_1"][-1]
