"""Preemption: SIGTERM mid-run saves the current step and exits 143; the restart ends exactly where
an uninterrupted run ends (same losses at every step, same parameters, same mAP)."""

import json
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, tiny_config

from fdh_jax.main import PREEMPTED_EXIT_STATUS
from fdh_jax.training.train import train_and_evaluate

STEPS, SIGNAL_AT = 8, 3

# The command line, run in a child that sends itself SIGTERM as it fetches the batch of step
# `signal_at` (as a scheduler would, mid-run). No periodic checkpoint falls before the end, so a
# checkpoint in the middle can only come from the preemption.
_CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config

def get_config():
    config = tiny_config({steps})
    config.train.checkpoint_every = 1000
    return config
"""

_PREEMPTED_RUN = """
import os, signal
from absl import app
from fdh_jax import main, parallel
fetch, calls = parallel.global_batch, [0]
def fetch_then_signal(batch, mesh):
    calls[0] += 1
    if calls[0] == {signal_at}:
        os.kill(os.getpid(), signal.SIGTERM)
    return fetch(batch, mesh)
parallel.global_batch = fetch_then_signal
app.run(main.main, argv=["fdh_jax", "--config={config}", "--workdir={workdir}"])
"""


def _config():
    config = tiny_config(STEPS)
    config.train.checkpoint_every = 1000
    return config


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


def _final_params(workdir):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")
    return restored["params"]


def test_sigterm_saves_current_step_and_restart_matches_uninterrupted_run(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(_CONFIG_FILE.format(tests=str(REPO / "tests"), steps=STEPS))
    workdir = tmp_path / "preempted"
    script = _PREEMPTED_RUN.format(signal_at=SIGNAL_AT, config=config_file, workdir=workdir)
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == PREEMPTED_EXIT_STATUS, child.stderr[-3000:]
    assert f"preempted: saved the checkpoint of step {SIGNAL_AT}" in child.stderr
    assert "Traceback" not in child.stderr
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [SIGNAL_AT]
    assert sorted(_losses(workdir)) == list(range(1, SIGNAL_AT + 1))
    assert not (workdir / "results.json").exists()

    resumed = train_and_evaluate(_config(), workdir)
    reference_dir = tmp_path / "uninterrupted"
    reference = train_and_evaluate(_config(), reference_dir)

    assert resumed["steps"] == reference["steps"] == STEPS
    preempted_losses, reference_losses = _losses(workdir), _losses(reference_dir)
    assert sorted(preempted_losses) == list(range(1, STEPS + 1))
    for step, loss in reference_losses.items():
        assert preempted_losses[step] == pytest.approx(loss, rel=1e-6), step
    for k, value in reference["mAP"].items():
        assert resumed["mAP"][k] == pytest.approx(value, abs=1e-6)
    resumed_params, reference_params = _final_params(workdir), _final_params(reference_dir)
    for a, b in zip(
        ocp.tree.to_flat_dict(resumed_params).values(),
        ocp.tree.to_flat_dict(reference_params).values(),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
