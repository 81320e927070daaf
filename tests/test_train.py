"""End to end: `train_and_evaluate` on a tiny model, rerun, and resumption after SIGKILL."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config

from fdh_jax.train import train_and_evaluate

RESULT_KEYS = {
    "dataset",
    "bits",
    "mAP",
    "precision_at_k",
    "num_query",
    "num_database",
    "train_seconds",
    "steps",
}

# Trains the tiny config in a child process and SIGKILLs itself right after asking for the
# checkpoint of step `kill_at` (the asynchronous save may or may not have finished).
_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from fdh_jax import train
save = train.save_checkpoint
def save_then_die(manager, step, state, progress):
    save(manager, step, state, progress)
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save_then_die
config = tiny_config({steps})
train.train_and_evaluate(config, {workdir!r})
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(num_steps=8)
    return config, workdir, train_and_evaluate(config, workdir)


def test_train_and_evaluate_writes_results(finished_run):
    config, workdir, results = finished_run
    assert set(results) == RESULT_KEYS
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["bits"] == [8, 12] and set(results["mAP"]) == {"8", "12"}
    assert all(0.0 < v <= 1.0 for v in results["mAP"].values())
    assert results["num_query"] == 12 and results["num_database"] == 24 and results["steps"] == 8
    assert set(results["precision_at_k"]["8"]) == {"2"}
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    assert all(json.loads(line)["loss"] > 0 for line in lines)


def test_rerun_restores_instead_of_retraining(finished_run, capsys):
    config, workdir, results = finished_run
    metrics_before = (workdir / "metrics.jsonl").read_text()
    again = train_and_evaluate(config, workdir)
    assert "evaluating without training" in capsys.readouterr().out
    assert again["mAP"] == results["mAP"]
    assert again["precision_at_k"] == results["precision_at_k"]
    assert (workdir / "metrics.jsonl").read_text() == metrics_before


def test_sigkill_then_restart_matches_uninterrupted_run(finished_run, tmp_path):
    _, reference_dir, reference = finished_run
    workdir = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(REPO / "tests"), kill_at=6, steps=8, workdir=str(workdir))
    killed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (workdir / "results.json").exists()

    resumed = train_and_evaluate(tiny_config(num_steps=8), workdir)
    for k, value in reference["mAP"].items():
        assert abs(resumed["mAP"][k] - value) <= 1e-6
    # The losses logged after the restart equal the uninterrupted run's at the same steps.
    reference_losses = {
        json.loads(line)["step"]: json.loads(line)["loss"]
        for line in (reference_dir / "metrics.jsonl").read_text().splitlines()
    }
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert entry["loss"] == pytest.approx(reference_losses[entry["step"]], rel=1e-6)
