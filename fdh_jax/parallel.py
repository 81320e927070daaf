"""Data parallelism: one jitted program over a `('data',)` device mesh (DESIGN 2.1).

The batch is sharded along `data`, the train state is replicated; XLA inserts the gradient
all-reduce, and BatchNorm statistics are computed over the global batch. The same code runs on
one CPU, eight GPUs or a TPU pod slice; across hosts each process supplies its local part of the
batch and `jax.make_array_from_process_local_data` assembles the global array.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh, axis name `data`, over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: reshapes and jraph's scatters on the sharded batch must not raise.
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec("data"))


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
    """This process's part of a batch -> global `jax.Array`s sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
