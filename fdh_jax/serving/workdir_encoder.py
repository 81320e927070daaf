"""An encoder restored from a training workdir: the Flax model over a device mesh.

Restoring reads only the parameters (their moving average, for a run with
`train.ema_decay > 0`) and BatchNorm statistics of one checkpoint (an Orbax partial restore,
`fdh_jax.training.checkpointing.restore_variables`): no dataset, no pretrained-weights file (a
pretrained backbone is in the checkpoint), no optimiser state. The model is the one the
workdir's record describes (`fdh_jax.training.workdir`).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdh_jax import encoding, parallel
from fdh_jax.common.checksums import variables_fingerprint
from fdh_jax.data.transforms import NORMALIZED
from fdh_jax.models.fdh import build_model
from fdh_jax.search import adaptation
from fdh_jax.serving.encoder import Encoder
from fdh_jax.training import code_fitting
from fdh_jax.training.checkpointing import restore_variables
from fdh_jax.training.workdir import ModelFileError, read_training_record


class WorkdirEncoder(Encoder):
    """An encoder restored from a training workdir: the Flax model over a device mesh."""

    def __init__(
        self, config: Any, description: dict, model, variables, step: int, mesh, fit_report=None
    ):
        training_config = json.loads(config.to_json_best_effort())
        super().__init__(description, training_config, step, variables_fingerprint(variables))
        self.config, self.model, self.variables, self.mesh = config, model, variables, mesh
        # How the codes were fitted at the end of training (`fdh_jax.training.code_fitting`),
        # or None: the hash heads' own codes.
        self.fit_report = fit_report
        self._configs: dict[int, Any] = {}

    def encode_source(self, source: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        codes, _ = encoding.encode_source(
            self.model, self.variables, source, self._config_for(batch_size), self.mesh
        )
        return codes

    def encode_prepared(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One call of the jitted encoder over the mesh, normalisation included (XLA computes
        it off the GIL), the batch padded to a multiple of the mesh's devices (one process)."""
        count, devices = len(batch), self.mesh.devices.size
        padded = np.concatenate([batch, np.repeat(batch[:1], (-count) % devices, axis=0)])
        inputs = jax.device_put(np.asarray(padded, np.uint8), parallel.batch_sharding(self.mesh))
        codes = _pixel_encoder(self.model, self.mesh)(self.variables, inputs)
        return {k: np.asarray(v)[:count] for k, v in codes.items()}

    def _config_for(self, batch_size: int | None) -> Any:
        """The config with `eval.batch_size` = `batch_size` rounded up to a multiple of the
        mesh's devices (one copy per size, kept)."""
        if batch_size is None or int(batch_size) == self.config.eval.batch_size:
            return self.config
        devices = self.mesh.devices.size
        size = -(-int(batch_size) // devices) * devices
        if size not in self._configs:
            config = ml_collections.ConfigDict(self.config.to_dict())
            config.eval.batch_size = size
            self._configs[size] = config
        return self._configs[size]

    def on_local_devices(self) -> WorkdirEncoder:
        if jax.process_count() == 1:
            return self
        local = copy.copy(self)
        local.mesh = _encoding_mesh(int(self.config.eval.batch_size), jax.local_devices())
        sharding = parallel.replicated(local.mesh)
        # The variables are replicated: this process's first copy holds them all.
        local.variables = jax.tree.map(
            lambda a: jax.device_put(a.addressable_data(0), sharding), self.variables
        )
        local._configs = {}
        return local

    def transfer_features(self, source: Any, descriptor_weight: float) -> np.ndarray:
        outputs = encoding.transfer_outputs(
            self.model, self.variables, source, self.config, self.mesh
        )
        return adaptation.transfer_features(*outputs, descriptor_weight)


@functools.lru_cache(maxsize=4)
def _pixel_encoder(model, mesh):
    """`fdh_jax.encoding.encode` of uint8 pixels, normalised by lookup in `NORMALIZED` (the
    values of `normalize` bit for bit), jitted over `mesh`."""

    def encode(variables, pixels):
        images = jnp.asarray(NORMALIZED)[pixels.astype(jnp.int32), jnp.arange(3)]
        return encoding.encode(model, variables, images)

    return jax.jit(encode, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))


def _encoding_mesh(batch_size: int, devices: list | None = None):
    """All devices of all processes; or, on one process (or for `devices` of this process), the
    most of them that divide the encoding batch (it is split over them)."""
    if devices is None and jax.process_count() > 1:
        return parallel.make_mesh(jax.devices())
    devices = jax.devices() if devices is None else devices
    usable = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return parallel.make_mesh(devices[:usable])


def restore_encoder(
    workdir: str | os.PathLike, step: int | None = None, config: Any | None = None
) -> WorkdirEncoder:
    """The encoder of checkpoint `step` (default: the latest) of a training workdir.

    `config` (default: the workdir's `config.json`) supplies everything but the model, which
    always comes from the workdir's record: e.g. another `eval.batch_size`, or `data.root` when
    evaluating on a dataset that moved.
    """
    workdir = Path(workdir)
    recorded, description = read_training_record(workdir)
    if config is None:
        config = recorded
    else:  # the model is the one that was trained, whatever `config` says
        config = config.copy_and_resolve_references()
        config.unlock()
        config.model = recorded.model
        config.bits = tuple(recorded.bits)
        config.seed = recorded.seed
        config.loss.use_proxy = recorded.loss.use_proxy
    model = build_model(config, description["num_classes"])
    size = description["preprocessing"]["image_size"]
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    mesh = _encoding_mesh(int(config.eval.batch_size))
    variables, step = restore_variables(
        workdir,
        abstract,
        step,
        parallel.replicated(mesh),
        moving_average=float(recorded.train.get("ema_decay", 0.0)) > 0,
    )
    try:  # the codes fitted at the end of training, when the run fitted them at this step
        stored = code_fitting.load_fit(workdir, step)
    except ValueError as error:
        raise ModelFileError(str(error)) from None
    fit_report = None
    if stored is not None:
        fitted_for = stored[1].get("fingerprint")
        if fitted_for is not None and fitted_for != variables_fingerprint(variables):
            raise ModelFileError(
                f"{code_fitting.fit_path(workdir, step)} was fitted for other parameters than "
                f"checkpoint {step}'s: rerun the training command to fit them again"
            )
        variables = code_fitting.with_fit(variables, stored[0], parallel.replicated(mesh))
        fit_report = stored[1]
    return WorkdirEncoder(config, description, model, variables, step, mesh, fit_report)
