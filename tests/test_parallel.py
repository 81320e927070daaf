"""Data parallelism: the jitted train step on 4 fake CPU devices equals the 1-device step."""

import numpy as np
from conftest import run_on_fake_devices


def test_four_devices_match_one_device():
    report = run_on_fake_devices("multidevice_check.py")
    assert report["devices"] == 4 and report["per_device_batch"] == 2
    np.testing.assert_allclose(report["losses_4"], report["losses_1"], rtol=2e-5)
    assert report["param_allclose_excess"] <= 0.0
    # The steps did train: the loss moved.
    assert report["losses_1"][0] != report["losses_1"][-1]
