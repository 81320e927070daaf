"""The workdir's record of a trained model: `config.json` and `model.json`.

Training writes both when a run starts from step 0 (`record_training_run`), and nothing rewrites
them: `config.json` is the complete training config, `model.json` what encoding needs (class
count and names, code lengths, backbone, the evaluation transform). Every other mode reads the
model from them (`read_training_record`), never from `--config` (docs/design.md, "Contracts").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fdh_jax.common.atomic_files import write_text_atomically
from fdh_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A workdir or export directory whose description files are missing, corrupt or foreign."""


def preprocessing(config: Any) -> dict:
    """The evaluation transform of a model trained with `config` (pure data, JSON-ready)."""
    return {
        "transform": "resize the shorter side to eval_resize, centre-crop image_size",
        "image_size": int(config.data.image_size),
        "eval_resize": int(config.data.eval_resize),
        "mean": [float(v) for v in IMAGENET_MEAN],
        "std": [float(v) for v in IMAGENET_STD],
        "colour": "RGB, alpha composited on white, EXIF orientation applied",
    }


def describe_model(config: Any, database: Any) -> dict:
    """`model.json`: what encoding needs of a model trained with `config` on `database`."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": str(config.data.name),
        "num_classes": int(database.num_classes),
        "class_names": [str(name) for name in getattr(database, "class_names", [])],
        "bits": [int(k) for k in config.bits],
        "backbone": str(config.model.backbone),
        "preprocessing": preprocessing(config),
    }


def config_differences(recorded: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    names = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def record_training_run(workdir: Path, config: Any, database: Any, *, resuming: bool) -> None:
    """Writes `config.json` and `model.json` for a run starting at step 0 (atomically).

    A resumed run keeps the record of the run that started it; fields of the current config
    that differ from it are named once, since the resumed run then follows the current config.
    """
    config_dict = json.loads(config.to_json_best_effort())
    record = workdir / CONFIG_FILE
    if resuming and record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, dict):
            changed = config_differences(recorded, config_dict)
            if changed:
                print(
                    f"Resuming with config fields that differ from {record}: "
                    f"{', '.join(changed)} (the record keeps the values the run started with)",
                    flush=True,
                )
            if (workdir / MODEL_FILE).is_file():
                return
    if not (resuming and record.is_file()):
        write_text_atomically(record, json.dumps(config_dict, indent=2) + "\n")
    write_text_atomically(
        workdir / MODEL_FILE, json.dumps(describe_model(config, database), indent=2) + "\n"
    )


def read_json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: {what}")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelFileError(f"{path} is unreadable or not JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} does not hold a JSON object")
    return value


def read_training_record(workdir: str | os.PathLike) -> tuple[Any, dict]:
    """`(config, model description)` of a training workdir: `config.json` as a ConfigDict and
    `model.json` as a dict. Raises `ModelFileError` naming the file if either is unusable.

    ml_collections is imported here, not at the top: loading an export imports this module (for
    `ModelFileError` and `read_json_object`) and must not import the training stack.
    """
    import ml_collections  # noqa: PLC0415

    workdir = Path(workdir)
    hint = (
        "not a training workdir, or one written by fdh_jax before workdirs described their "
        "model (rerun the training command once: it restores the final checkpoint and writes it)"
    )
    config = ml_collections.ConfigDict(read_json_object(workdir / CONFIG_FILE, hint))
    description = read_json_object(workdir / MODEL_FILE, hint)
    if description.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{workdir / MODEL_FILE}: format version {description.get('format_version')}, "
            f"this fdh_jax reads version {FORMAT_VERSION}"
        )
    return config, description
