"""An encoder loaded from an export directory (`fdh_jax.serving.export`).

`load_export` checks every file against `export.json` (checksums, format version, platform, the
variables' fingerprint) and returns an `ExportedEncoder`, which runs the `jax.export` program on
batches that the evaluation transform (Pillow and NumPy, exactly as in evaluation) prepares.
This module and those it imports need only jax, numpy and Pillow: no Flax, no
`fdh_jax.models`, no grain or Orbax.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export

from fdh_jax.common.checksums import file_sha256, unflatten_variables, variables_fingerprint
from fdh_jax.data.transforms import normalize
from fdh_jax.parallel import CPU_CHUNK
from fdh_jax.serving.encoder import Encoder
from fdh_jax.training.workdir import FORMAT_VERSION, ModelFileError, read_json_object

EXPORT_FILE = "export.json"
CPU_CALL = 32  # photos per call of the chunked program on CPU (`encode_prepared`)
PREPARE_THREADS = 4  # threads decoding and transforming photos (`encode_source`)
EXPORT_PROGRAM = "encoder.jaxexport"
EXPORT_CHUNKED_PROGRAM = "encoder_chunked.jaxexport"  # batches of a multiple of 4 (CPU chunks)
EXPORT_VARIABLES = "variables.npz"


class ExportedEncoder(Encoder):
    """An encoder loaded from an export directory: `jax.export` program + variables."""

    def __init__(self, manifest: dict, exported, variables: dict, chunked=None):
        super().__init__(
            manifest["model"],
            manifest["training_config"],
            manifest["step"],
            manifest["fingerprint"],
        )
        self.platforms = tuple(manifest["platforms"])
        self._exported = exported
        self._chunked = chunked  # absent from exports made before it existed
        self._variables = jax.device_put(variables)
        self._calls = ThreadPoolExecutor(2, thread_name_prefix="exported")

    def encode_source(self, source: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Batches of `batch_size` photos, each prepared by a pool of threads (Pillow decodes
        and resizes without the GIL) while the previous one encodes."""
        batch_size = int(batch_size or self.batch_size)
        chunks: dict[str, list[np.ndarray]] = {}
        with ThreadPoolExecutor(PREPARE_THREADS) as pool:

            def prepared(start: int) -> list:
                stop = min(start + batch_size, len(source))
                return [pool.submit(self.prepare, source[i]["image"]) for i in range(start, stop)]

            pending = prepared(0)
            for start in range(0, len(source), batch_size):
                batch = np.stack([future.result() for future in pending])
                if start + batch_size < len(source):
                    pending = prepared(start + batch_size)
                for k, codes in self.encode_prepared(batch).items():
                    chunks.setdefault(k, []).append(codes)
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def encode_prepared(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program on the batch. On CPU, with the chunked program of the export,
        the batch is padded to a multiple of 4 and run `CPU_CALL` photos per call, two calls at
        once (XLA:CPU runs two concurrently faster than one after the other); without it,
        8 photos per call (the symbolic-batch program runs a call as one batch, and a network
        whose activations stay in cache runs faster)."""
        batch = normalize(np.asarray(batch, np.uint8))
        count = len(batch)
        if jax.default_backend() != "cpu":
            return self._call(self._exported, batch)
        program, step = (self._chunked, CPU_CALL) if self._chunked else (self._exported, 8)
        if self._chunked is not None:
            batch = np.concatenate([batch, np.repeat(batch[:1], (-count) % CPU_CHUNK, axis=0)])
        calls = [batch[i : i + step] for i in range(0, len(batch), step)]
        outputs = list(self._calls.map(functools.partial(self._call, program), calls))
        return {k: np.concatenate([out[k] for out in outputs])[:count] for k in outputs[0]}

    def _call(self, program, batch: np.ndarray) -> dict[str, np.ndarray]:
        codes = program.call(self._variables, batch)
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
    chunked = None
    if EXPORT_CHUNKED_PROGRAM in manifest.get("sha256", {}):
        chunked = export.deserialize(bytearray((export_dir / EXPORT_CHUNKED_PROGRAM).read_bytes()))
    return ExportedEncoder(manifest, exported, variables, chunked)
