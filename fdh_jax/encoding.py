"""The encoding engine: runs a model over every item of a source, on the device mesh.

Everything that runs the model over a dataset goes through here: evaluation (`encode_source`),
training's validation and frozen-backbone feature cache (`map_source`), the encoders of
`fdh_jax.serving`, the `--adapt` features (`transfer_outputs`) and the heads' real-valued codes
(`continuous_outputs`, which the fitted codes are fitted on: `fdh_jax.training.code_fitting`).
The items, padded to whole global batches of `eval.batch_size`, are dealt out to the processes
like training slots, and each output comes back on every process in dataset order.
"""

import collections
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fdh_jax import parallel
from fdh_jax.data.pipeline import eval_dataset, model_inputs
from fdh_jax.models.fdh import binarize
from fdh_jax.models.fitted_codes import fitted_code, split_variables


def encode(model, variables: dict, images: Any) -> dict[str, jax.Array]:
    """Binary codes of a batch: `images: [B, H, W, 3]` (or a frozen backbone's stage maps
    `{"C3": [B, ...], ...}`) -> `{"K": int8 [B, K] in {-1, +1}}`: the hash heads' signs, or
    for a length the variables hold a fitted hash of, its codes (`fdh_jax.models.fitted_codes`)."""
    model_variables, fitted = split_variables(variables)

    def codes(inputs):
        outputs = model.apply(model_variables, inputs, train=False)
        return {
            k: fitted_code(fitted[k], outputs["pooled"], h)
            if fitted is not None and k in fitted
            else binarize(h)
            for k, h in outputs["hash"].items()
        }

    return parallel.map_in_chunks_on_cpu(codes, images)


IN_FLIGHT = 2  # batches of `map_source` computing at once


@functools.lru_cache(maxsize=4)
def _encoder(model, mesh):
    """`encode` jitted over `mesh`; cached so both splits of an evaluation share one compile."""
    return jax.jit(
        functools.partial(encode, model),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
    )


def map_source(
    fn: Callable,
    variables: Any,
    source: Any,
    config: ml_collections.ConfigDict,
    mesh,
    transform: Callable[[int, dict], dict] | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Applies `fn(variables, inputs) -> {name: [b, ...]}` (jitted over `mesh`) to every item of
    `source`; yields `(positions [G], outputs {name: [G, ...]})` per global batch of
    `G = eval.batch_size`, the same on every process.

    The items, padded to whole global batches, are dealt out like training slots: process `p`
    takes slots `[p * b, (p + 1) * b)` of each global batch (`b = G / processes`), the processes
    being those whose devices `mesh` holds (a mesh of this process's devices only encodes all
    of `source` here, alone, in a multi-process run). Each slot's
    dataset position travels with its inputs through the same sharding and gather, so outputs
    can be put back in dataset order whatever the device order of the mesh. Positions `>= N`
    are padding (they repeat item 0). `transform` makes the inputs of a record (default: see
    `eval_dataset`).
    """
    processes, rank = _mesh_processes(mesh)
    local_batch = config.eval.batch_size // processes
    mine = _process_positions(len(source), config.eval.batch_size, processes, rank)
    indices = np.where(mine < len(source), mine, 0)
    # Two batches in flight: the next is dispatched before the previous is read back, so the
    # device computes while the host gathers. With one process each runs in a thread of its
    # own: XLA's CPU client then executes both at once (MobileNetV2 over 64-image halves on 2
    # cores: 223 images/s against 129 one after the other); several processes dispatch in one
    # order from the main thread, as their collectives require.
    pool = ThreadPoolExecutor(IN_FLIGHT) if processes == 1 else None
    gathered = _gathered if processes > 1 else _local
    in_flight: collections.deque[Callable[[], tuple]] = collections.deque()

    def run(batch: dict) -> tuple:
        return batch["position"], jax.block_until_ready(fn(variables, model_inputs(batch)))

    done = 0
    try:
        for element in eval_dataset(source, config, indices, transform):
            # `eval_dataset` batches by the global batch size; this process's share of one
            # global batch is `local_batch` of those.
            inputs = {k: v for k, v in element.items() if k not in ("label", "index")}
            for start in range(0, len(element["index"]), local_batch):
                part = jax.tree.map(lambda v, s=start: v[s : s + local_batch], inputs)
                part["position"] = mine[done : done + local_batch]
                batch = parallel.global_batch(part, mesh)
                done += local_batch
                if pool is None:
                    dispatched = (batch["position"], fn(variables, model_inputs(batch)))
                    in_flight.append(lambda dispatched=dispatched: dispatched)
                else:
                    in_flight.append(pool.submit(run, batch).result)
                if len(in_flight) >= IN_FLIGHT:
                    yield gathered(*in_flight.popleft()())
        while in_flight:
            yield gathered(*in_flight.popleft()())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _mesh_processes(mesh) -> tuple[int, int]:
    """(how many processes own the devices of `mesh`, this process's rank among them)."""
    owners = sorted({device.process_index for device in mesh.devices.flat})
    return len(owners), owners.index(jax.process_index())


def _process_positions(num_items: int, global_batch: int, processes: int, rank: int) -> np.ndarray:
    """The dataset positions of process `rank` of `processes`, in order: the items padded to
    whole global batches, slots `[rank * b, (rank + 1) * b)` of each (`b` = global batch /
    processes); `>= num_items` is padding."""
    local_batch = global_batch // processes
    slots = np.arange(num_items + (-num_items) % global_batch).reshape(-1, global_batch)
    first = rank * local_batch
    return slots[:, first : first + local_batch].reshape(-1).astype(np.int32)


def _local(positions: jax.Array, outputs: dict) -> tuple[np.ndarray, dict]:
    """A global batch of a one-process mesh as NumPy: there is nothing to gather."""
    return np.asarray(positions), {k: np.asarray(v) for k, v in outputs.items()}


def _gathered(positions: jax.Array, outputs: dict) -> tuple[np.ndarray, dict]:
    """A global batch's positions and outputs, gathered onto every process as NumPy."""
    return np.asarray(multihost_utils.process_allgather(positions, tiled=True)), {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in outputs.items()
    }


def encode_source(
    model, variables: dict, source: Any, config: ml_collections.ConfigDict, mesh
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Codes of every item of `source`, in dataset order, on every process (see `map_source`;
    every item is checked to appear exactly once). Returns `({"K": int8 [N, K]}, labels [N])`."""
    codes = _in_dataset_order(_encoder(model, mesh), variables, source, config, mesh)
    return codes, np.asarray(source.labels, np.int32)


def _in_dataset_order(
    fn: Callable, variables: Any, source: Any, config: ml_collections.ConfigDict, mesh
) -> dict[str, np.ndarray]:
    """`map_source`'s outputs concatenated in dataset order, padding dropped; raises if an item
    is missing or repeated."""
    chunks: dict[str, list[np.ndarray]] = {}
    positions = []
    for batch_positions, outputs in map_source(fn, variables, source, config, mesh):
        positions.append(batch_positions)
        for name, value in outputs.items():
            chunks.setdefault(name, []).append(value)
    num_items = len(source)
    position = np.concatenate(positions)
    real = position < num_items
    if not np.array_equal(np.sort(position[real]), np.arange(num_items)):
        raise RuntimeError("encoding lost or repeated items: the global batches are misassembled")
    order = np.argsort(position[real])
    return {name: np.concatenate(v)[real][order] for name, v in chunks.items()}


@functools.lru_cache(maxsize=4)
def _transfer_encoder(model, mesh):
    """The model's real-valued outputs before binarisation, jitted over `mesh`: the pooled C5
    and descriptor the transfer features are made of (`fdh_jax.search.adaptation`) and each
    hash head's continuous code."""

    def outputs(variables, inputs):
        out = model.apply(split_variables(variables)[0], inputs, train=False)
        hashes = {f"hash_{k}": h.astype(jnp.float32) for k, h in out["hash"].items()}
        return {"pooled": out["pooled"], "descriptor": out["descriptor"], **hashes}

    return jax.jit(outputs, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))


def continuous_outputs(
    model, variables: dict, source: Any, config: ml_collections.ConfigDict, mesh
) -> dict[str, np.ndarray]:
    """Every item's real-valued outputs, in dataset order: `pooled [N, C5]`, `descriptor
    [N, D]` and `hash_K [N, K]` per code length (whose `binarize` is the heads' own codes:
    `encode_source`'s, unless the variables hold fitted codes)."""
    return _in_dataset_order(_transfer_encoder(model, mesh), variables, source, config, mesh)


def transfer_outputs(
    model, variables: dict, source: Any, config: ml_collections.ConfigDict, mesh
) -> tuple[np.ndarray, np.ndarray]:
    """`(pooled [N, C5], descriptor [N, D])` of every item of `source`, in dataset order: what
    `adaptation.transfer_features` combines."""
    outputs = continuous_outputs(model, variables, source, config, mesh)
    return outputs["pooled"], outputs["descriptor"]
