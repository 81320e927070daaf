"""Invalid configs fail before compilation with a one-line message naming the field."""

import subprocess
import sys

import ml_collections
import pytest
from conftest import REPO

from fdh_jax.config_checks import FIELD_RULES, ConfigError, validate_config
from fdh_jax.config_files import load_config


@pytest.mark.parametrize(
    "field,value,num_devices,named",
    [
        ("model.backbone", "resnet7", 1, "config.model.backbone"),
        ("bits", (0, 24), 1, "config.bits"),
        ("bits", (), 1, "config.bits"),
        ("train.batch_size", 6, 4, "config.train.batch_size"),
        ("train.classes_per_batch", 3, 1, "config.train.classes_per_batch"),
        ("model.gnn_heads", 3, 1, "config.model.gnn_heads"),
        ("loss.neighbourhood_bits", (12, 99), 1, "config.loss.neighbourhood_bits"),
        ("model.stages", ("C3", "C9"), 1, "config.model.stages"),
        ("data.name", "imagenet", 1, "config.data.name"),
        ("train.optimizer", "lion", 1, "config.train.optimizer"),
        ("eval.tie_break", "random", 1, "config.eval.tie_break"),
        ("model.dtype", "float16", 1, "config.model.dtype"),
        ("model.mask_temperature", 0.0, 1, "config.model.mask_temperature"),
        ("train.keep_checkpoints", 0, 1, "config.train.keep_checkpoints"),
        ("data.crop_scale", (0.5, 0.2), 1, "config.data.crop_scale"),
        ("data.crop_scale", (0.0, 1.0), 1, "config.data.crop_scale"),
        ("loss.label_smoothing", 1.0, 1, "config.loss.label_smoothing"),
        ("eval.precision_at_k", (10, 0), 1, "config.eval.precision_at_k"),
        ("data.eval_resize", 16, 1, "config.data.eval_resize"),
        ("train.views_per_image", 3, 1, "config.train.views_per_image"),
        ("loss.instance_weight", 1.0, 1, "config.loss.instance_weight"),  # one view per photo
    ],
)
def test_invalid_field_is_named(tiny, field, value, num_devices, named):
    section, _, name = field.rpartition(".")
    target = tiny if not section else tiny[section]
    target[name] = value
    if field == "train.batch_size":
        tiny.train.classes_per_batch, tiny.train.images_per_class = 3, 2
    with pytest.raises(ConfigError) as error:
        validate_config(tiny, num_devices)
    message = str(error.value)
    assert message.startswith(named + ":") and "\n" not in message


def test_views_per_image_must_divide_the_images_per_class(tiny):
    tiny.train.views_per_image = 2
    tiny.train.classes_per_batch, tiny.train.images_per_class = 4, 3
    tiny.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"^config.train.views_per_image: must divide"):
        validate_config(tiny, 1)
    tiny.train.classes_per_batch, tiny.train.images_per_class = 3, 4
    tiny.loss.instance_weight = 1.0
    validate_config(tiny, 1)


def test_two_views_from_the_feature_cache_need_two_stored_views(tiny):
    tiny.train.classes_per_batch, tiny.train.images_per_class = 4, 2
    tiny.train.views_per_image, tiny.loss.instance_weight = 2, 1.0
    tiny.data.name, tiny.data.root, tiny.data.feature_cache = "folder", "/photos", "auto"
    tiny.model.freeze_backbone, tiny.data.cached_views = True, 1
    with pytest.raises(ConfigError, match=r"^config.train.views_per_image: two views .* the same"):
        validate_config(tiny, 1)
    tiny.data.cached_views = 2
    validate_config(tiny, 1)
    tiny.data.cached_views, tiny.data.feature_cache = 1, ""  # crops made per step: different
    validate_config(tiny, 1)


def test_valid_tiny_config_passes(tiny):
    validate_config(tiny, 1)
    validate_config(tiny, 4)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fdh_jax.main",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'w'}",
            "--config.model.backbone=resnet7",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fdh_jax: error: config.model.backbone: unknown backbone 'resnet7'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing written, nothing compiled


def _flat_fields(config, prefix=""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat_fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_default_field_has_exactly_one_rule():
    fields = list(_flat_fields(load_config(REPO / "configs" / "default.py")))
    ruled = [name for name, _, _ in FIELD_RULES]
    assert len(ruled) == len(set(ruled))
    assert sorted(ruled) == sorted(fields)


@pytest.mark.parametrize("field", [name for name, _, _ in FIELD_RULES])
def test_each_rule_rejects_a_value_of_the_wrong_kind(tiny, field):
    # Outside ml_collections' type safety (a config built in Python can hold anything): a
    # string where a number, flag or tuple belongs, a number where a string belongs.
    config = ml_collections.ConfigDict(tiny.to_dict(), type_safe=False)
    section, _, name = field.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
        target = target[part]
    target[name] = 7 if isinstance(target[name], str) else "not-a-value"
    with pytest.raises(ConfigError) as error:
        validate_config(config, 1)
    assert str(error.value).startswith(f"config.{field}:") and "\n" not in str(error.value)
