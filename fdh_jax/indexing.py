"""`--mode=encode` and `--mode=search`: hash an image collection into an index, query it.

    python -m fdh_jax.main --config=C --workdir=W --mode=encode --split=train --index=db.npz
    python -m fdh_jax.main --config=C --workdir=W --mode=encode --images=DIR --index=db.npz
    python -m fdh_jax.main --config=C --workdir=W --mode=search --index=db.npz --query=IMG --topk=10

Both restore the latest checkpoint of the workdir. The index records the code length, the
checkpoint and the config, and a search refuses an index made with another code length.
"""

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from fdh_jax import evaluate
from fdh_jax.data.sources.image_files import ImageFilesSource
from fdh_jax.retrieval import HashIndex
from fdh_jax.train import NoCheckpointError, Run, prepare_run


def _restored(config: ml_collections.ConfigDict, workdir: Path) -> Run:
    run = prepare_run(config, workdir, check_images=False)
    if run.manager.latest_step() is None:
        run.manager.close()
        raise NoCheckpointError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    return run


def _bits(config: ml_collections.ConfigDict, bits: int | None) -> str:
    if bits is None:
        return str(max(config.bits))
    if bits not in tuple(config.bits):
        raise ValueError(f"--bits={bits}: this model has code lengths {tuple(config.bits)}")
    return str(bits)


def _encode(run: Run, config, source) -> dict[str, np.ndarray]:
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    codes, _ = evaluate.encode_source(run.model, variables, source, config, run.mesh)
    return codes


def encode_to_index(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    index_path: str | Path,
    *,
    split: str = "train",
    images: str | None = None,
    bits: int | None = None,
) -> HashIndex:
    """Encodes a dataset split (or the image files under `images`) and saves a `HashIndex`."""
    workdir = Path(workdir)
    k = _bits(config, bits)
    run = _restored(config, workdir)
    try:
        if images:
            source = ImageFilesSource(images)
        else:
            source = {"train": run.database, "test": run.query}[split]
        codes = _encode(run, config, source)[k]
        index = HashIndex(
            codes=codes,
            labels=np.asarray(source.labels, np.int64),
            paths=list(source.paths),
            checkpoint=str(workdir / "checkpoints" / str(run.manager.latest_step())),
            config_json=config.to_json_best_effort(),
        )
        if jax.process_index() == 0:
            index.save(index_path)
            print(f"Wrote {len(index)} {k}-bit codes to {index_path}", flush=True)
        return index
    finally:
        run.manager.close()


def search_index(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    index_path: str | Path,
    query: str,
    *,
    topk: int = 10,
) -> list[dict]:
    """Encodes the query image(s) and returns, per query, its ranked `(path, distance)` list."""
    index = HashIndex.load(index_path)
    if index.bits not in tuple(config.bits):
        raise ValueError(
            f"{index_path} holds {index.bits}-bit codes but this model has {tuple(config.bits)}"
        )
    index_config = json.loads(index.config_json)
    if index_config.get("model", {}).get("backbone") not in (None, config.model.backbone):
        raise ValueError(
            f"{index_path} was made with backbone {index_config['model']['backbone']!r}, "
            f"this config uses {config.model.backbone!r}"
        )
    workdir = Path(workdir)
    run = _restored(config, workdir)
    try:
        source = ImageFilesSource(query)
        codes = _encode(run, config, source)[str(index.bits)]
    finally:
        run.manager.close()
    paths, distances = index.search(codes, topk)
    return [
        {
            "query": q,
            "results": [{"path": p, "distance": int(d)} for p, d in zip(ps, ds, strict=True)],
        }
        for q, ps, ds in zip(source.paths, paths, distances, strict=True)
    ]


def format_search(results: list[dict]) -> str:
    """Ranked paths with distances, one block per query."""
    lines = []
    for entry in results:
        lines.append(f"query: {entry['query']}")
        lines.extend(
            f"  {rank:3d}. d={hit['distance']:3d}  {hit['path']}"
            for rank, hit in enumerate(entry["results"], 1)
        )
    return "\n".join(lines)
