"""The feature cache of a frozen backbone: exact views, invalidation, damage, races, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from frozen_backbone import VIEWS, backbone_variables, cached, entries, frozen_config
from PIL import Image

from fdh_jax.data import load_splits
from fdh_jax.models.backbones import get_backbone
from fdh_jax.training import feature_cache
from fdh_jax.training.train import train_and_evaluate


def test_cached_views_are_the_backbone_maps_of_each_crop(dataset):
    root, cache = dataset
    config = frozen_config(root, cache)
    variables = backbone_variables(config)
    maps = cached(config, cache, variables)
    source = load_splits(config, ("train",))["train"]
    backbone = get_backbone("resnet_narrow", width=8)
    assert len(maps) == len(source) and maps.num_views == VIEWS
    for index in (0, len(source) - 1):
        image = source[index]["image"]
        for view in range(VIEWS):
            crop = feature_cache.view_image(image, index, view, config.data)
            expected = backbone.apply(variables, crop[None], train=False)
            stored = maps.view_inputs(index, view)
            assert set(stored) == {"C3", "C4", "C5"}
            for stage, value in stored.items():
                assert value.dtype == np.float16
                reference = np.asarray(expected[stage][0])
                np.testing.assert_allclose(
                    value, reference, rtol=2e-3, atol=2e-3 * abs(reference).max()
                )
    # View 0 is the evaluation view; the training views differ from it and from each other.
    first = maps.view_inputs(0, 0)["C3"]
    assert not np.array_equal(first, maps.view_inputs(0, 1)["C3"])
    np.testing.assert_array_equal(maps[0]["C3"], first)


def test_changed_image_or_weights_recompute(dataset):
    root, cache = dataset
    config = frozen_config(root, cache)
    variables = backbone_variables(config)
    first = cached(config, cache, variables)
    assert cached(config, cache, variables).directory == first.directory  # a hit

    image = next((root / "class_1").iterdir())
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(1, 1))  # another mtime, whatever the clock's resolution
    changed_image = cached(config, cache, variables)
    assert changed_image.directory != first.directory

    other_weights = cached(config, cache, backbone_variables(config, seed=1))
    assert other_weights.directory not in (first.directory, changed_image.directory)
    assert len(entries(cache)) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_entry_is_recomputed_with_a_warning(dataset, damage):
    root, cache = dataset
    config = frozen_config(root, cache)
    variables = backbone_variables(config)
    maps = cached(config, cache, variables)
    reference = {s: np.array(m) for s, m in maps.maps.items()}
    path = maps.directory / "C4.npy"
    del maps
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x55
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.warns(UserWarning, match="computing it again"):
        again = cached(config, cache, variables)
    for stage, value in reference.items():
        np.testing.assert_array_equal(np.asarray(again.maps[stage]), value)
    assert len(entries(cache)) == 1


_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from frozen_backbone import backbone_variables, cached, frozen_config
config = frozen_config(Path({root!r}), Path({cache!r}))
maps = cached(config, Path({cache!r}), backbone_variables(config))
print(maps.directory)
"""


def test_two_processes_writing_one_entry_leave_one_valid_entry(dataset):
    root, cache = dataset
    script = _WRITER.format(tests=str(REPO / "tests"), root=str(root), cache=str(cache))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    directories = {out.strip().splitlines()[-1] for out in outputs}
    assert len(directories) == 1
    assert [p.name for p in (cache / "stage_maps").iterdir()] == [Path(*directories).name]
    config = frozen_config(root, cache)
    description = json.loads((Path(*directories) / "manifest.json").read_text())["description"]
    assert feature_cache._check_entry(Path(*directories), description) is None
    assert cached(config, cache, backbone_variables(config)).directory == Path(*directories)


_KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from frozen_backbone import frozen_config
from fdh_jax.training import checkpointing
from fdh_jax.training import train
save = checkpointing.save_checkpoint
def save_then_die(manager, step, state, progress, *rest):
    save(manager, step, state, progress, *rest)
    if step == 2:
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
checkpointing.save_checkpoint = save_then_die
train.train_and_evaluate(frozen_config(Path({root!r}), Path({cache!r}), 4), {workdir!r})
"""


def test_resumed_cached_run_matches_an_uninterrupted_one(dataset, tmp_path):
    root, cache = dataset
    reference = train_and_evaluate(frozen_config(root, cache, 4), tmp_path / "whole")
    assert len(entries(cache)) == 2  # database (3 views) and query (1 view)

    workdir = tmp_path / "killed"
    script = _KILLED.format(
        tests=str(REPO / "tests"), root=str(root), cache=str(cache), workdir=str(workdir)
    )
    killed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train_and_evaluate(frozen_config(root, cache, 4), workdir)
    assert resumed["mAP"] == reference["mAP"]
    losses = [
        {json.loads(line)["step"]: json.loads(line)["loss"] for line in open(w / "metrics.jsonl")}
        for w in (tmp_path / "whole", workdir)
    ]
    for step, loss in losses[1].items():
        assert loss == pytest.approx(losses[0][step], rel=1e-6)


def test_cache_keys_ignore_how_the_root_is_spelled(tmp_path, monkeypatch):
    """`../data/x/a.jpg` and `/abs/data/x/a.jpg` are the same file: same key (feature cache and
    image scan), while touching the file changes it."""
    from fdh_jax.data.image_scan import files_digest

    (tmp_path / "data").mkdir()
    image = tmp_path / "data" / "a.jpg"
    image.write_bytes(b"not decoded here")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    before = files_digest([str(image)])
    assert files_digest(["../data/a.jpg"]) == before
    os.utime(image, (1, 1))
    assert files_digest(["../data/a.jpg"]) != before
