"""A damaged latest checkpoint: named, set aside, and training resumes from the previous one."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config

from fdh_jax.training import checkpointing, train


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    config = tiny_config(num_steps=8)
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 2
    return config, workdir, train.train_and_evaluate(config, workdir)


def _largest_file(step_dir):
    return max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _truncate(step_dir):
    path = _largest_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _remove(step_dir):
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _truncate_unsealed(step_dir):
    """A checkpoint killed before it was sealed: only the restore itself can fail."""
    (step_dir / checkpointing.CHECKSUMS).unlink()
    _truncate(step_dir)


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip, _remove, _truncate_unsealed],
    ids=["truncated", "flipped", "missing", "truncated-unsealed"],
)
def test_damaged_latest_checkpoint_falls_back_and_ends_the_same(finished, tmp_path, damage, capsys):
    config, reference_dir, reference = finished
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    assert (workdir / "checkpoints" / "8" / checkpointing.CHECKSUMS).is_file()
    damage(workdir / "checkpoints" / "8")

    results = train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert f"Checkpoint {workdir / 'checkpoints' / '8'} is damaged" in out
    assert f"Restored {workdir / 'checkpoints'} at step 6." in out
    assert results["steps"] == 8
    for k, value in reference["mAP"].items():
        assert abs(results["mAP"][k] - value) <= 1e-6
    assert (workdir / "damaged_checkpoints" / "8").is_dir()  # set aside, not deleted


def test_no_intact_checkpoint_is_one_line_and_deletes_nothing(finished, tmp_path):
    _, reference_dir, _ = finished
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    for step in ("6", "8"):
        _flip(workdir / "checkpoints" / step)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fdh_jax.main",
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            "--config.model.width=8",
            "--config.train.num_steps=8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("fdh_jax: error")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0], completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
