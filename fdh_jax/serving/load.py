"""`load_encoder`: a trained encoder from a training workdir or an export directory."""

from __future__ import annotations

import os
from pathlib import Path

from fdh_jax.serving.encoder import Encoder, EncoderRequestError
from fdh_jax.serving.exported_encoder import EXPORT_FILE, load_export
from fdh_jax.training.workdir import CONFIG_FILE, ModelFileError


def load_encoder(path: str | os.PathLike, step: int | None = None) -> Encoder:
    """A trained encoder from a training workdir or an export directory.

    `step` picks a checkpoint of a workdir (default: the latest); an export holds one. Raises
    `ModelFileError` or `NoCheckpointError` with one line naming the file at fault.

    The workdir encoder is imported only for a workdir: loading an export must not import Flax,
    Orbax or the model code (`exported_encoder.py`). The encoder's `source_path` is the
    folder's absolute path (a collection records it, to load the same model again).
    """
    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        if step is not None:
            raise EncoderRequestError(f"{path} is an export: --step applies to workdirs only")
        encoder = load_export(path)
    elif (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir():
        from fdh_jax.serving.workdir_encoder import restore_encoder  # noqa: PLC0415

        encoder = restore_encoder(path, step)
    else:
        raise ModelFileError(
            f"{path}: neither a training workdir (config.json, model.json, checkpoints/) nor an "
            f"export directory ({EXPORT_FILE})"
        )
    encoder.source_path = str(path.resolve())
    return encoder
