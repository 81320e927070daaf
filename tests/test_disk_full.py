"""A full disk while training: one line, exit 2, and the workdir resumes once space is freed."""

import subprocess
import sys

from conftest import REPO

# The tiny demo run of `benchmarks/kill_anywhere.py`'s size, through the real command line.
FLAGS = [
    "--config=configs/demo.py",
    "--config.data.synthetic.num_classes=4",
    "--config.data.synthetic.train_per_class=6",
    "--config.data.synthetic.test_per_class=3",
    "--config.data.image_size=32",
    "--config.data.eval_resize=32",
    "--config.data.synthetic.image_size=32",
    "--config.model.width=8",
    "--config.model.node_dim=16",
    "--config.model.gnn_heads=2",
    "--config.model.gnn_layers=1",
    "--config.bits=(8,12)",
    "--config.train.classes_per_batch=4",
    "--config.train.images_per_class=2",
    "--config.train.batch_size=8",
    "--config.train.num_steps=8",
    "--config.train.warmup_steps=1",
    "--config.train.checkpoint_every=2",
    "--config.eval.batch_size=8",
    "--config.eval.precision_at_k=(2,)",
]

# Runs fdh_jax.main with the checkpoint of step 6 failing as on a full disk.
_FULL_DISK = """
import errno, sys
from absl import app
from fdh_jax import main
from fdh_jax.training import checkpointing
save = checkpointing.save_checkpoint
def save_or_fail(manager, step, *rest):
    if step == 6:
        raise OSError(errno.ENOSPC, "No space left on device", str(manager.directory / "6"))
    save(manager, step, *rest)
checkpointing.save_checkpoint = save_or_fail
sys.argv = ["fdh_jax.main", *{flags!r}]
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_full_disk_is_one_line_and_the_workdir_resumes(tmp_path):
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", *FLAGS]
    full = subprocess.run(
        [sys.executable, "-c", _FULL_DISK.format(flags=flags)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    (line,) = [ln for ln in full.stderr.splitlines() if ln.startswith("fdh_jax: error")]
    assert "no space left on the device writing" in line and str(workdir / "checkpoints") in line

    resumed = subprocess.run(
        [sys.executable, "-m", "fdh_jax.main", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Restored {workdir / 'checkpoints'} at step 4." in resumed.stdout
    assert (workdir / "results.json").is_file()
