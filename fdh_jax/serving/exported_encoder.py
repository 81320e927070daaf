"""An encoder loaded from an export directory (`fdh_jax.serving.export`).

`load_export` checks every file against `export.json` (checksums, format version, platform, the
variables' fingerprint) and returns an `ExportedEncoder`, which runs the `jax.export` program on
batches that the evaluation transform (Pillow and NumPy, exactly as in evaluation) prepares.
This module and those it imports need only jax, numpy and Pillow: no Flax, no
`fdh_jax.models`, no grain or Orbax.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export

from fdh_jax.common.checksums import file_sha256, unflatten_variables, variables_fingerprint
from fdh_jax.data.transforms import eval_transform
from fdh_jax.serving.encoder import Encoder
from fdh_jax.training.workdir import FORMAT_VERSION, ModelFileError, read_json_object

EXPORT_FILE = "export.json"
EXPORT_PROGRAM = "encoder.jaxexport"
EXPORT_VARIABLES = "variables.npz"


class ExportedEncoder(Encoder):
    """An encoder loaded from an export directory: `jax.export` program + variables."""

    def __init__(self, manifest: dict, exported, variables: dict):
        super().__init__(
            manifest["model"],
            manifest["training_config"],
            manifest["step"],
            manifest["fingerprint"],
        )
        self.platforms = tuple(manifest["platforms"])
        self._exported = exported
        self._variables = jax.device_put(variables)

    def encode_source(self, source: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        size = int(self.preprocessing["image_size"])
        resize = int(self.preprocessing["eval_resize"])
        chunks: dict[str, list[np.ndarray]] = {}
        batch_size = int(batch_size or self.batch_size)
        for start in range(0, len(source), batch_size):
            count = min(batch_size, len(source) - start)
            batch = np.zeros((batch_size, size, size, 3), np.float32)
            for row in range(count):
                batch[row] = eval_transform(source[start + row]["image"], size, resize)
            for k, codes in self._exported.call(self._variables, batch).items():
                chunks.setdefault(k, []).append(np.asarray(codes)[:count])
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def encode_prepared(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One call of the exported program on the batch."""
        codes = self._exported.call(self._variables, np.asarray(batch, np.float32))
        return {k: np.asarray(v) for k, v in codes.items()}


def load_export(export_dir: str | os.PathLike) -> ExportedEncoder:
    """Loads `export_dir` (from `export_encoder`), checking every file against `export.json`."""
    export_dir = Path(export_dir)
    manifest = read_json_object(export_dir / EXPORT_FILE, "not an fdh_jax export directory")
    if manifest.get("kind") != "fdh_jax encoder export":
        raise ModelFileError(f"{export_dir / EXPORT_FILE} is not an fdh_jax encoder export")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{export_dir / EXPORT_FILE}: format version {manifest.get('format_version')}, "
            f"this fdh_jax reads version {FORMAT_VERSION}"
        )
    for name, expected in manifest.get("sha256", {}).items():
        path = export_dir / name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing: the export is incomplete")
        if file_sha256(path) != expected:
            raise ModelFileError(f"{path} does not match its checksum: the export is corrupted")
    platform = jax.default_backend()
    if platform not in manifest["platforms"]:
        raise ModelFileError(
            f"{export_dir} was exported for {', '.join(manifest['platforms'])}, not {platform}"
        )
    with np.load(export_dir / EXPORT_VARIABLES, allow_pickle=False) as archive:
        variables = unflatten_variables({name: archive[name] for name in archive.files})
    if variables_fingerprint(variables) != manifest["fingerprint"]:
        raise ModelFileError(f"{export_dir / EXPORT_VARIABLES}: variables differ from the export")
    exported = export.deserialize(bytearray((export_dir / EXPORT_PROGRAM).read_bytes()))
    return ExportedEncoder(manifest, exported, variables)
