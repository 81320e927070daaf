"""The per-dataset config files: loadable by `config_flags` from the repo root, protocol fields."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from fdh_jax.data.sources import SOURCE_MODULES, make_source

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_CONFIGS = ["cub", "aircraft", "nabirds", "food101", "dogs", "cars", "vegfru", "folder"]


def load_config_module(stem: str):
    spec = importlib.util.spec_from_file_location(
        f"config_{stem}", REPO_ROOT / "configs" / f"{stem}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("stem", DATASET_CONFIGS)
def test_dataset_config_sets_dataset_and_protocol(stem):
    config = load_config_module(stem).get_config()
    default = load_config_module("default").get_config()
    assert config.data.name == stem and stem in SOURCE_MODULES
    assert (config.data.image_size, config.data.eval_resize) == (224, 256)
    assert (config.model.backbone, config.model.width) == ("resnet50", 64)
    # The published protocol: ImageNet weights by name, the backbone at a tenth of the rate.
    assert config.model.pretrained == "hf://timm/resnet50.tv_in1k"
    assert config.train.backbone_lr_multiplier == 0.1
    assert flat_keys(config) == flat_keys(default)  # overrides only, no new fields
    if stem == "folder":
        assert config.data.root == ""
    else:
        assert config.data.root.startswith("~/data/")
    assert load_config_module(stem).get_config("/some/root").data.root == "/some/root"


@pytest.mark.parametrize("stem", ["cub", "folder"])
def test_config_flags_load_dataset_configs_from_repo_root(stem, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", "configs/cub.py", flag_values=flag_values, lock_config=True
    )
    argv = ["prog", f"--config=configs/{stem}.py:/data/x", "--config.train.num_steps=3"]
    monkeypatch.setattr("sys.argv", argv)  # config_flags registers overrides from sys.argv
    flag_values(argv)
    assert flag_values.config.data.name == stem
    assert flag_values.config.data.root == "/data/x"
    assert flag_values.config.train.num_steps == 3


def test_folder_config_without_root_fails_clearly():
    config = load_config_module("folder").get_config()
    with pytest.raises(ValueError, match="--config.data.root"):
        make_source(config.data.name, config.data.root, "train")


def test_cli_without_network_or_cached_weights_fails_in_one_line(tmp_path):
    """configs/cub.py names its ImageNet weights; offline and uncached, the run stops at once
    (before reading the data) with one line naming them and how to pass a file instead."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",  # what an offline machine sets; the code never waits on the network
        HF_HOME=str(tmp_path / "hf"),  # an empty Hugging Face cache
        JAX_PLATFORMS="cpu",
    )
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fdh_jax.main",
            "--config=configs/cub.py",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.root={tmp_path / 'no_such_cub'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("fdh_jax: error: hf://timm/resnet50.tv_in1k:")
    assert "--config.model.pretrained=FILE" in lines[0]
    assert elapsed < 60  # imports included; no retry loop
