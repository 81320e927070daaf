"""Shared test helpers: tiny configs that train in seconds on a CPU."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Caches (image scans, stage maps) of test runs stay out of the user's ~/.cache; child processes
# inherit this. Directories made here are removed when the process that made them exits.
_TEMP_DIRS = [tempfile.mkdtemp(prefix="fdh_jax_test_cache_")]
os.environ["FDH_JAX_CACHE"] = _TEMP_DIRS[0]
# One XLA compilation cache for the whole session, children included: most tests compile the same
# tiny train and evaluation steps, and compiling them (not running them) is most of a test's time
# on a 2-core CPU (a tiny 8-step run: 27 s cold, 6 s from the cache). Executables are reused
# unchanged, so numbers do not move. Set before JAX is imported; a child that imports this module
# keeps the directory it inherited.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _TEMP_DIRS.append(tempfile.mkdtemp(prefix="fdh_jax_test_xla_"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _TEMP_DIRS[-1]
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TEMP_DIRS])
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Tests build tiny models, whose steps run in milliseconds: XLA's expensive optimization passes
# cost far more than they save (test_train.py: 92 s with them, 63 s without). Children inherit it.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import jax  # noqa: E402

from fdh_jax import config_files  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = Path(__file__).resolve().parents[1]


# The shared data and weights, read at run time (tests that need them skip when absent).
SHARED = Path(os.environ.get("FDH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TFLITE_PATH = SHARED / "weights" / "mobilenet_v2_1.0_224_ptq.tflite"


def load_config(name: str):
    """`configs/<name>.py`'s `get_config()`."""
    return config_files.load_config(REPO / "configs" / f"{name}.py")


def tiny_config(num_steps: int = 4):
    """The demo config shrunk to a model and data set that run in seconds."""
    config = load_config("demo")
    config.data.synthetic.num_classes = 4
    config.data.synthetic.train_per_class = 6
    config.data.synthetic.test_per_class = 3
    config.data.synthetic.image_size = 32
    config.data.image_size = 32
    config.data.eval_resize = 32
    config.model.width = 8
    return shrink(config, num_steps)


def shrink(config, num_steps: int):
    """A graph, code lengths, batches (4 classes x 2) and logging sized for a test; in place."""
    config.model.node_dim = 16
    config.model.gnn_heads = 2
    config.model.gnn_layers = 1
    config.bits = (8, 12)
    config.train.batch_size = 8
    config.train.classes_per_batch = 4
    config.train.images_per_class = 2
    config.train.num_steps = num_steps
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.eval.batch_size = 8
    config.eval.precision_at_k = (2,)
    return config


@pytest.fixture
def tiny():
    return tiny_config()


def run_on_fake_devices(script: str, num_devices: int = 4) -> dict:
    """Runs `tests/<script>` in a fresh process with `num_devices` fake CPU devices.

    The device count must be set before JAX starts, hence the subprocess. Returns the JSON
    report the script prints as its last line; a failing script fails the calling test.
    """
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def dataset(tmp_path):
    """`(folder dataset root, feature-cache directory)` in `tmp_path` (`folder_datasets`); the
    helper is imported here since `folder_datasets` imports this module."""
    from folder_datasets import write_folder_dataset  # noqa: PLC0415

    return write_folder_dataset(tmp_path / "data"), tmp_path / "cache"
