"""Evaluation: encode the query and database splits, score retrieval, write `results.json`.

Protocol (docs/design.md, "Evaluation protocol"): database = train split, query = test split,
mAP over the whole database (mAP@all) for every code length, plus precision@k. Distance ties
are broken by database index unless `config.eval.tie_break` says otherwise.
"""

import collections
import functools
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from fdh_jax import adaptation, inference, parallel
from fdh_jax.atomic_files import write_text_atomically
from fdh_jax.data.pipeline import eval_dataset, model_inputs
from fdh_jax.metrics import (
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    precision_within_radius,
)
from fdh_jax.models.fdh import binarize
from fdh_jax.retrieval import hamming_topk
from fdh_jax.visualize import plot_pr_curves, retrieval_gallery

__all__ = [
    "Evaluation",
    "encode",
    "encode_source",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_adapted",
    "evaluate_and_report",
    "format_table",
    "mean_average_precision",
    "score_codes",
    "state_variables",
    "write_extra_metrics",
    "write_figures",
    "write_results",
]


def state_variables(state: Any) -> dict:
    """The variables of a train state that validation, evaluation and serving use: the moving
    average of the parameters when the run keeps one (`train.ema_decay > 0`), else the
    parameters; with the BatchNorm statistics."""
    params = state.params if getattr(state, "ema_params", None) is None else state.ema_params
    return {"params": params, "batch_stats": state.batch_stats}


def encode(model, variables: dict, images: Any) -> dict[str, jax.Array]:
    """Binary codes of a batch: `images: [B, H, W, 3]` (or a frozen backbone's stage maps
    `{"C3": [B, ...], ...}`) -> `{"K": int8 [B, K] in {-1, +1}}`."""

    def codes(inputs):
        outputs = model.apply(variables, inputs, train=False)
        return {k: binarize(h) for k, h in outputs["hash"].items()}

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
    takes slots `[p * b, (p + 1) * b)` of each global batch (`b = G / processes`). Each slot's
    dataset position travels with its inputs through the same sharding and gather, so outputs
    can be put back in dataset order whatever the device order of the mesh. Positions `>= N`
    are padding (they repeat item 0). `transform` makes the inputs of a record (default: see
    `eval_dataset`).
    """
    local_batch = config.eval.batch_size // jax.process_count()
    mine = _process_positions(len(source), config.eval.batch_size)
    indices = np.where(mine < len(source), mine, 0)
    # Two batches in flight: the next is dispatched before the previous is read back, so the
    # device computes while the host gathers. With one process each runs in a thread of its
    # own: XLA's CPU client then executes both at once (MobileNetV2 over 64-image halves on 2
    # cores: 223 images/s against 129 one after the other); several processes dispatch in one
    # order from the main thread, as their collectives require.
    pool = ThreadPoolExecutor(IN_FLIGHT) if jax.process_count() == 1 else None
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
                    yield _gathered(*in_flight.popleft()())
        while in_flight:
            yield _gathered(*in_flight.popleft()())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _process_positions(num_items: int, global_batch: int) -> np.ndarray:
    """This process's dataset positions, in order: the items padded to whole global batches,
    slots `[p * b, (p + 1) * b)` of each (`b` = global batch / processes); `>= num_items` is
    padding."""
    local_batch = global_batch // jax.process_count()
    slots = np.arange(num_items + (-num_items) % global_batch).reshape(-1, global_batch)
    first = jax.process_index() * local_batch
    return slots[:, first : first + local_batch].reshape(-1).astype(np.int32)


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


class Evaluation(NamedTuple):
    """Scores plus what they were computed from (for figures and index files)."""

    results: dict  # the results.json content (docs/design.md, "Contracts")
    extra: dict  # precision within Hamming radius 2 and PR curves, per code length
    query_codes: dict[str, np.ndarray]  # {"K": int8 [Q, K]}
    db_codes: dict[str, np.ndarray]  # {"K": int8 [N, K]}
    query_labels: np.ndarray  # int32 [Q]
    db_labels: np.ndarray  # int32 [N]


def evaluate(
    model,
    variables: dict,
    query: Any,
    database: Any,
    config: ml_collections.ConfigDict,
    mesh,
) -> Evaluation:
    """Encodes both splits; mAP@all, precision@k, radius-2 precision and PR curves per length."""
    query_codes, query_labels = encode_source(model, variables, query, config, mesh)
    db_codes, db_labels = encode_source(model, variables, database, config, mesh)
    return score_codes(query_codes, db_codes, query_labels, db_labels, config)


def score_codes(
    query_codes: dict[str, np.ndarray],
    db_codes: dict[str, np.ndarray],
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    config: ml_collections.ConfigDict,
) -> Evaluation:
    """mAP@all, precision@k, radius-2 precision and PR curves of `{"K": int8 [N, K]}` codes."""
    results = {
        "dataset": config.data.name,
        "bits": [int(k) for k in config.bits],
        "mAP": {},
        "precision_at_k": {},
        "num_query": len(query_labels),
        "num_database": len(db_labels),
    }
    extra = {"tie_break": config.eval.tie_break, "precision_radius_2": {}, "pr_curve": {}}
    for k in map(str, config.bits):
        scored = (query_codes[k], db_codes[k], query_labels, db_labels)
        results["mAP"][k] = float(mean_average_precision(*scored, tie_break=config.eval.tie_break))
        results["precision_at_k"][k] = {
            str(n): float(precision_at_k(*scored, n)) for n in config.eval.precision_at_k
        }
        extra["precision_radius_2"][k] = float(precision_within_radius(*scored, radius=2))
        precision, recall = precision_recall_curve(*scored)
        extra["pr_curve"][k] = {"precision": precision.tolist(), "recall": recall.tolist()}
    return Evaluation(results, extra, query_codes, db_codes, query_labels, db_labels)


@functools.lru_cache(maxsize=4)
def _transfer_encoder(model, mesh):
    """The outputs the transfer features are made of (`fdh_jax.adaptation`), jitted over `mesh`."""

    def outputs(variables, inputs):
        out = model.apply(variables, inputs, train=False)
        return {"pooled": out["pooled"], "descriptor": out["descriptor"]}

    return jax.jit(outputs, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))


def transfer_outputs(
    model, variables: dict, source: Any, config: ml_collections.ConfigDict, mesh
) -> tuple[np.ndarray, np.ndarray]:
    """`(pooled [N, C5], descriptor [N, D])` of every item of `source`, in dataset order: what
    `adaptation.transfer_features` combines."""
    outputs = _in_dataset_order(_transfer_encoder(model, mesh), variables, source, config, mesh)
    return outputs["pooled"], outputs["descriptor"]


def evaluate_adapted(
    model,
    variables: dict,
    query: Any,
    database: Any,
    config: ml_collections.ConfigDict,
    mesh,
) -> Evaluation:
    """Like `evaluate`, with codes fitted to the database (`fdh_jax.adaptation`): per length, a
    PCA-ITQ fitted on the database's transfer features (no labels) hashes both splits."""
    adaptation.check_collection_size(len(database), max(int(k) for k in config.bits))
    weight = adaptation.descriptor_weight(config)
    query_features, db_features = (
        adaptation.transfer_features(*transfer_outputs(model, variables, s, config, mesh), weight)
        for s in (query, database)
    )
    query_codes, db_codes = {}, {}
    for k in config.bits:
        fitted = adaptation.fit_pca_itq(db_features, int(k), seed=0)
        query_codes[str(k)], db_codes[str(k)] = fitted(query_features), fitted(db_features)
    labels = (np.asarray(s.labels, np.int32) for s in (query, database))
    return score_codes(query_codes, db_codes, *labels, config)


def write_figures(
    workdir: Path, evaluation: Evaluation, query: Any, database: Any, *, num_queries: int = 8
) -> list[Path]:
    """Writes `pr_curves.png`, and `gallery.png` + `gallery.html` for the longest code.

    The gallery shows `num_queries` queries spread over the query split, each with its top-10
    (ties by database index), framed green where the class matches and red where it does not.
    """
    workdir = Path(workdir)
    curves = {
        int(k): (np.asarray(c["precision"]), np.asarray(c["recall"]))
        for k, c in evaluation.extra["pr_curve"].items()
    }
    plot_pr_curves(curves, workdir / "pr_curves.png", title=f"{evaluation.results['dataset']}: PR")
    longest = str(max(evaluation.results["bits"]))
    chosen = np.linspace(0, len(query) - 1, min(num_queries, len(query))).round().astype(int)
    topk = min(10, len(database))
    distances, indices = hamming_topk(
        evaluation.query_codes[longest][chosen], evaluation.db_codes[longest], topk
    )
    retrieval_gallery(
        np.stack([_thumbnail(query[int(i)]["image"]) for i in chosen]),
        evaluation.query_labels[chosen],
        lambda i: _thumbnail(database[int(i)]["image"]),
        evaluation.db_labels,
        indices,
        distances,
        workdir / "gallery.png",
        workdir / "gallery.html",
        class_names=getattr(database, "class_names", None),
    )
    return [workdir / "pr_curves.png", workdir / "gallery.png", workdir / "gallery.html"]


def _thumbnail(image: np.ndarray, size: int = 96) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def write_extra_metrics(workdir: Path, evaluation: Evaluation) -> Path:
    """Writes `retrieval_metrics.json`: radius-2 precision and PR curves per code length."""
    path = Path(workdir) / "retrieval_metrics.json"
    return write_text_atomically(path, json.dumps(evaluation.extra, indent=2) + "\n")


def write_results(workdir: Path, results: dict) -> Path:
    """Writes `workdir/results.json` atomically (no half-written file on a crash)."""
    path = Path(workdir) / "results.json"
    return write_text_atomically(path, json.dumps(results, indent=2) + "\n")


def evaluate_and_report(
    model,
    variables: dict,
    query: Any,
    database: Any,
    config: ml_collections.ConfigDict,
    mesh,
    output_dir: Path,
    *,
    steps: int,
    train_seconds: float,
    extra_results: dict | None = None,
    inputs: tuple[Any, Any] | None = None,
    adapt: bool = False,
) -> dict:
    """Evaluates, then (process 0) writes `results.json`, `retrieval_metrics.json`, the PR
    curves and the gallery into `output_dir` and prints the table. Returns the results.

    `inputs`: `(query, database)` sources to encode instead of the image sources (the cached
    stage maps of a frozen backbone); the figures still show the images. `adapt`: score codes
    fitted to the database (`evaluate_adapted`) instead of the hash heads' codes.
    """
    query_inputs, database_inputs = inputs if inputs is not None else (query, database)
    scorer = evaluate_adapted if adapt else evaluate
    evaluation = scorer(model, variables, query_inputs, database_inputs, config, mesh)
    results = evaluation.results | {"train_seconds": round(train_seconds, 3), "steps": steps}
    results |= extra_results or {}
    if jax.process_index() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_results(output_dir, results)
        write_extra_metrics(output_dir, evaluation)
        write_figures(output_dir, evaluation, query, database)
        print(format_table(results), flush=True)
        print(f"Wrote {output_dir / 'results.json'}, pr_curves.png and gallery.html.", flush=True)
    return results


def evaluate_checkpoint(
    workdir: str | Path,
    config: ml_collections.ConfigDict | None = None,
    *,
    eval_data: str | None = None,
    step: int | None = None,
    adapt: bool = False,
) -> dict:
    """`--mode=eval`: scores a workdir's checkpoint (default: the latest) without training.

    The model always comes from the workdir (`config.json`, `model.json`, the checkpoint): no
    pretrained-weights file and no optimiser. `config` (default: the workdir's) supplies the
    data and evaluation settings.

    Without `eval_data`, the training dataset's query split is ranked against its database split
    and `workdir/results.json` is (re)written. With `eval_data`, a folder dataset (the layout and
    split rules of `configs/folder.py`: `split.csv`, else a per-class split seeded by the training
    seed with `data.test_fraction`) whose classes may be ones the model never saw; the results go
    to `workdir/eval/<folder name>/` and the training `results.json` is left alone.

    `adapt`: score codes fitted to the database split without its labels (`fdh_jax.adaptation`:
    PCA-ITQ on the transfer features, `config.eval.adapt_descriptor_weight`) instead of the hash
    heads' codes, for classes the model never trained on; the results go to
    `workdir/eval/<folder name or "train">_adapted/`.
    """
    from fdh_jax.data import load_splits  # noqa: PLC0415 - the data sources are heavy imports

    workdir = Path(workdir)
    encoder = inference.restore_encoder(workdir, step, config)
    config = encoder.config
    extra = {}
    if eval_data:
        config = config.copy_and_resolve_references()
        config.data.name, config.data.root = "folder", str(eval_data)
        output_dir = workdir / "eval" / Path(eval_data).resolve().name
        extra = {"eval_data": str(Path(eval_data).resolve()), "checkpoint_step": encoder.step}
    else:
        output_dir = workdir
    if adapt:
        weight = adaptation.descriptor_weight(config)
        name = Path(eval_data).resolve().name if eval_data else "train"
        output_dir = workdir / "eval" / f"{name}_adapted"
        extra |= {
            "checkpoint_step": encoder.step,
            "codes": "PCA-ITQ fitted to the database's transfer features (fdh_jax.adaptation), "
            f"descriptor weight {weight}",
        }
    splits = load_splits(config, ("train", "test"))
    database, query = splits["train"], splits["test"]
    progress = inference.checkpoint_progress(workdir, encoder.step)
    return evaluate_and_report(
        encoder.model,
        encoder.variables,
        query,
        database,
        config,
        encoder.mesh,
        output_dir,
        steps=encoder.step,
        train_seconds=float(progress.get("train_seconds", 0.0)),
        extra_results=extra,
        adapt=adapt,
    )


def format_table(results: dict) -> str:
    """The mAP / precision@k table printed after evaluation."""
    ks = list(next(iter(results["precision_at_k"].values()), {}))
    header = ["bits", "mAP@all"] + [f"P@{n}" for n in ks]
    lines = [
        f"{results['dataset']}: {results['num_query']} queries, "
        f"{results['num_database']} database items",
        " | ".join(f"{h:>8}" for h in header),
    ]
    for k in map(str, results["bits"]):
        row = [k, f"{results['mAP'][k]:.4f}"] + [
            f"{results['precision_at_k'][k][n]:.4f}" for n in ks
        ]
        lines.append(" | ".join(f"{c:>8}" for c in row))
    return "\n".join(lines)
