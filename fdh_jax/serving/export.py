"""`--mode=export`: serialise a workdir's encoder so that it runs without fdh_jax's model code.

An export directory holds `export.json` (preprocessing, code lengths, identity, training config,
file checksums), the encoder serialised with `jax.export` (`encoder.jaxexport`: symbolic batch
size, lowered for every platform in `EXPORT_PLATFORMS` that lowers here) and its variables
(`variables.npz`). The exported program takes the variables and ImageNet-normalised float32
images `[b, S, S, 3]` and returns `{"K": int8 [b, K]}`; `exported_encoder.py` loads it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from fdh_jax.common.atomic_files import replace_directory
from fdh_jax.common.checksums import file_sha256, flatten_variables
from fdh_jax.encoding import encode
from fdh_jax.parallel import CPU_CHUNK
from fdh_jax.serving.exported_encoder import (
    EXPORT_CHUNKED_PROGRAM,
    EXPORT_FILE,
    EXPORT_PROGRAM,
    EXPORT_VARIABLES,
    FORMAT_VERSION,
)
from fdh_jax.serving.workdir_encoder import restore_encoder

# Platforms an export is lowered for (jax.export lowers for each without its hardware).
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# ----------------------------------------------------------------------------- export
def _lower_for_platforms(function, *specs) -> tuple[Any, tuple[str, ...]]:
    """`jax.export` for every platform of `EXPORT_PLATFORMS` that lowers here (CPU at least)."""
    try:
        return export.export(function, platforms=EXPORT_PLATFORMS)(*specs), EXPORT_PLATFORMS
    except Exception:  # noqa: BLE001 - some platform failed to lower: find which ones work
        working = []
        for platform in EXPORT_PLATFORMS:
            try:
                export.export(function, platforms=(platform,))(*specs)
                working.append(platform)
            except Exception:  # noqa: BLE001, S112 - that platform is left out, and said so
                continue
        if "cpu" not in working:
            raise
        return export.export(function, platforms=tuple(working))(*specs), tuple(working)


def export_encoder(
    workdir: str | os.PathLike, export_dir: str | os.PathLike, step: int | None = None
) -> Path:
    """Serialises the encoder of a workdir's checkpoint into `export_dir` (see module docstring).

    The directory appears complete or not at all (written beside it, then renamed); an existing
    export there is replaced, anything else there is refused.
    """
    export_dir = Path(export_dir)
    if export_dir.exists() and not (export_dir / EXPORT_FILE).is_file():
        if not export_dir.is_dir() or any(export_dir.iterdir()):
            raise FileExistsError(
                f"{export_dir} exists and is not an fdh_jax export: choose a new directory"
            )
    encoder = restore_encoder(workdir, step)
    variables = jax.device_get(encoder.variables)
    size = encoder.preprocessing["image_size"]
    variable_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    image_spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {size}, {size}, 3"), jnp.float32)
    encode_fn = jax.jit(functools.partial(encode, encoder.model))
    exported, platforms = _lower_for_platforms(encode_fn, variable_specs, image_spec)
    # The same program for batches of a multiple of CPU_CHUNK images, which XLA:CPU computes in
    # chunks (`parallel.map_in_chunks_on_cpu`): the loader's fast path on CPU.
    chunked_spec = jax.ShapeDtypeStruct(
        export.symbolic_shape(f"{CPU_CHUNK}*b, {size}, {size}, 3"), jnp.float32
    )
    chunked = export.export(encode_fn, platforms=platforms)(variable_specs, chunked_spec)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        (staging / EXPORT_PROGRAM).write_bytes(exported.serialize())
        (staging / EXPORT_CHUNKED_PROGRAM).write_bytes(chunked.serialize())
        np.savez(staging / EXPORT_VARIABLES, **flatten_variables(variables))
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "fdh_jax encoder export",
            "input": f"float32 [b, {size}, {size}, 3]: the evaluation transform, then ImageNet "
            "normalisation; b is symbolic",
            "output": {str(k): f"int8 [b, {k}] in {{-1, +1}}" for k in encoder.bits},
            "chunked_program": f"{EXPORT_CHUNKED_PROGRAM}: the same for b a multiple of "
            f"{CPU_CHUNK}, computed {CPU_CHUNK} images at a time on CPU (faster there)",
            "platforms": list(platforms),
            "batch_size": encoder.batch_size,
            "step": encoder.step,
            "fingerprint": encoder.fingerprint,
            "model": encoder.description,
            "training_config": encoder.training_config,
            "source_workdir": str(Path(workdir).absolute()),
            "sha256": {
                name: file_sha256(staging / name)
                for name in (EXPORT_PROGRAM, EXPORT_CHUNKED_PROGRAM, EXPORT_VARIABLES)
            },
        }
        (staging / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_directory(staging, export_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return export_dir
