"""End to end: `train_and_evaluate` on a tiny model, rerun, and resumption after SIGKILL."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, tiny_config
from tensorboard.compat.proto import event_pb2

from fdh_jax.training.train import train_and_evaluate

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
from fdh_jax.training import checkpointing
from fdh_jax.training import train
save = checkpointing.save_checkpoint
def save_then_die(manager, step, state, progress, *rest):
    save(manager, step, state, progress, *rest)
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
checkpointing.save_checkpoint = save_then_die
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


def test_logged_learning_rate_is_the_one_each_update_used(finished_run):
    # Warm-up 1 step, cosine decay over 8: the update of step s (1-based) uses the optimiser's
    # count s - 1, i.e. lr 0, then the peak, then the decay. Hand-computed from the formula.
    config, workdir, _ = finished_run
    peak, total, warmup = config.train.learning_rate, 8, 1
    expected = [0.0] + [
        peak * 0.5 * (1 + np.cos(np.pi * (count - warmup) / (total - warmup)))
        for count in range(1, total)
    ]
    logged = [
        json.loads(line)["lr"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-12)


def _events(path):
    """The events of one TFRecord event file, in order."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # record: u64 length, u32 crc, payload, u32 crc
        (length,) = struct.unpack_from("<Q", data, offset)
        yield event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4


def _tensorboard_scalars(directory) -> dict[tuple[str, int], float]:
    """Every scalar in the TFRecord event files of `directory`: `{(tag, step): value}`."""
    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in _events(path):
            for value in event.summary.value:
                scalars[value.tag, event.step] = value.simple_value
    return scalars


def test_tensorboard_events_hold_the_logged_metrics(finished_run):
    _, workdir, results = finished_run
    scalars = _tensorboard_scalars(workdir / "tensorboard")
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert scalars["loss", entry["step"]] == pytest.approx(entry["loss"], rel=1e-6)
        assert scalars["proxy_8", entry["step"]] == pytest.approx(entry["proxy_8"], rel=1e-6)
    for k, value in results["mAP"].items():
        assert scalars[f"eval/mAP_{k}", 8] == pytest.approx(value, rel=1e-6)


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

    restarted = tiny_config(num_steps=8)  # restarted with another input-pipeline topology
    restarted.data.num_threads, restarted.data.num_workers = 1, 1
    resumed = train_and_evaluate(restarted, workdir)
    for k, value in reference["mAP"].items():
        assert abs(resumed["mAP"][k] - value) <= 1e-6
    # The losses logged after the restart equal the uninterrupted run's at the same steps.
    reference_losses = {
        json.loads(line)["step"]: json.loads(line)["loss"]
        for line in (reference_dir / "metrics.jsonl").read_text().splitlines()
    }
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 9))  # each step once
    for entry in logged:
        assert entry["loss"] == pytest.approx(reference_losses[entry["step"]], rel=1e-6)
    # TensorBoard: the restart's event file begins by discarding the steps after the restore.
    restarts = [
        event.step
        for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
        for event in _events(path)
        if event.HasField("session_log")
    ]
    assert len(restarts) == 2 and restarts[0] == 1 and restarts[1] in (5, 7)


def test_evaluation_writes_figures_and_extra_metrics(finished_run):
    _, workdir, _ = finished_run
    for name in ("pr_curves.png", "gallery.png", "gallery.html"):
        assert (workdir / name).stat().st_size > 0
    extra = json.loads((workdir / "retrieval_metrics.json").read_text())
    assert set(extra["precision_radius_2"]) == {"8", "12"}
    curve = extra["pr_curve"]["12"]
    assert len(curve["precision"]) == len(curve["recall"]) == 13
    assert curve["recall"][-1] == pytest.approx(1.0)  # radius K retrieves everything


def test_encode_then_search_finds_each_image_itself(finished_run, tmp_path):
    from PIL import Image

    from fdh_jax.data import load_split
    from fdh_jax.search.hash_index import HashIndex
    from fdh_jax.serving.indexing import encode_to_index, search_index

    config, workdir, _ = finished_run
    index_path = tmp_path / "query_index.npz"
    index = encode_to_index(workdir, index_path, split="test", bits=12)
    loaded = HashIndex.load(index_path)
    assert loaded.bits == 12 and len(loaded) == 12
    query = load_split(config, "test")
    assert loaded.paths == query.paths

    folder = tmp_path / "queries"
    folder.mkdir()
    for i in (0, 5, 11):
        Image.fromarray(query[i]["image"]).save(folder / f"q{i:02d}.png")
    hits = search_index(workdir, index_path, str(folder), topk=12)
    for entry, i in zip(hits, (0, 5, 11), strict=True):
        own = [hit for hit in entry["results"] if hit["path"] == query.paths[i]]
        assert own and own[0]["distance"] == 0  # the PNG round trip is lossless
        assert entry["results"][0]["distance"] == 0
        np.testing.assert_array_equal(index.codes, loaded.codes)


def test_search_refuses_wrong_code_length(finished_run, tmp_path):
    from fdh_jax.search.hash_index import HashIndex
    from fdh_jax.serving.indexing import search_index

    config, workdir, _ = finished_run
    path = tmp_path / "other.npz"
    HashIndex(codes=np.ones((2, 16), np.int8), labels=[0, 1], paths=["a", "b"]).save(path)
    with pytest.raises(ValueError, match="16-bit codes"):
        search_index(workdir, path, str(tmp_path))
