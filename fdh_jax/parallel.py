"""Data parallelism: one jitted program over a `('data',)` device mesh (docs/design.md,
"Architecture").

The batch is sharded along `data`, the train state is replicated; XLA inserts the gradient
all-reduce, and BatchNorm statistics are computed over the global batch. The same code runs on
one CPU, eight GPUs or a TPU pod slice; across hosts each process supplies its local part of the
batch and `jax.make_array_from_process_local_data` assembles the global array.
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _on_cloud_tpu() -> bool:
    """Whether this is a Cloud TPU VM, by the check `jax.distributed.initialize` itself uses. It
    is imported from JAX's private modules here, inside a `try`, since it may move or vanish."""
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # noqa: PLC0415
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins this process to a multi-process run; returns False (and does nothing) for one process.

    Must run before anything touches a JAX device. In order of precedence:
    - explicit arguments (`--coordinator_address`, `--num_processes`, `--process_id`), each
      falling back to `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
    - SLURM with more than one task, or a Cloud TPU VM: JAX's own cluster detection;
    - otherwise a single process: nothing to initialise.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address or num_processes is not None or process_id is not None:
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_JOB_ID" in os.environ else 1
    if slurm_tasks > 1 or _on_cloud_tpu():
        jax.distributed.initialize()
        return True
    return False


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


def micro_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """`[A, B / A, ...]` micro-batches: each micro-batch split over `data`, so every device works
    on every micro-step."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """This process's part of a batch (a dict of `[b, ...]` arrays, possibly nested) -> global
    `jax.Array`s sharded over `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda value: jax.make_array_from_process_local_data(sharding, np.asarray(value)),
        local_batch,
    )


CPU_CHUNK = 4  # examples per step of `map_in_chunks_on_cpu`


def map_in_chunks_on_cpu(fn: Callable, inputs, chunk: int = CPU_CHUNK):
    """`fn(inputs)` for a batch of independent examples; on CPU computed `chunk` at a time.

    XLA's CPU backend runs a convolutional network faster over a few examples at a time, whose
    activations stay in cache, than over a large batch: MobileNetV2 at 224 px gives 144 images/s
    in chunks of 4 and 59 images/s as one batch of 128 on the 2-core Xeon of BENCHMARKS.md. The
    chunks are a `lax.map` chosen when lowering for CPU (`lax.platform_dependent`); other
    platforms run `fn(inputs)` as one batch. `fn` must not mix examples (eval-mode BatchNorm),
    and map a pytree of `[B, ...]` arrays to one. A batch size unknown when tracing (a symbolic
    export dimension) is computed in chunks when it is a known multiple of `chunk` (`4 * b`),
    else as one batch.
    """
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if not isinstance(batch, int):
        if not _symbolic_multiple(batch, chunk):
            return fn(inputs)
    else:
        chunk = math.gcd(batch, chunk)
        if chunk in (1, batch):
            return fn(inputs)

    def chunked(values):
        split = jax.tree.map(lambda a: a.reshape(batch // chunk, chunk, *a.shape[1:]), values)
        out = jax.lax.map(fn, split)
        return jax.tree.map(lambda a: a.reshape(batch, *a.shape[2:]), out)

    return jax.lax.platform_dependent(inputs, cpu=chunked, default=fn)


def _symbolic_multiple(size: Any, factor: int) -> bool:
    """Whether a symbolic dimension is always a multiple of `factor` (e.g. `4 * b` of 4)."""
    try:
        return bool(size % factor == 0)
    except Exception:  # noqa: BLE001 (a remainder shape polymorphism cannot decide)
        return False
