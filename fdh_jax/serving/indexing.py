"""`--mode=encode` and `--mode=search`: hash an image collection into an index, query it.

    python -m fdh_jax.main --workdir=W --mode=encode --images=DIR --index=db.npz
    python -m fdh_jax.main --workdir=W --mode=encode --split=train --index=db.npz
    python -m fdh_jax.main --workdir=W --mode=search --index=db.npz --query=IMG --topk=10
    python -m fdh_jax.main --workdir=W --mode=encode --images=DIR --index=db.npz --adapt

`W` is a training workdir (its latest checkpoint, or `--step`) or an export directory
(`--mode=export`): the model comes from there, never from `--config`. An index records the
training config and the encoder's identity (parameter fingerprint, checkpoint step, code length,
preprocessing); a search refuses an index made by another encoder, naming both. With `--adapt`
the codes are fitted to the indexed images without labels (`fdh_jax.search.adaptation`, for classes
the model never trained on; a training workdir only): the index keeps the fit, and a search
hashes its queries through it.
"""

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from fdh_jax.data.sources.image_files import ImageFilesSource
from fdh_jax.search.hash_index import HashIndex
from fdh_jax.serving.encoder import Encoder, EncoderRequestError
from fdh_jax.serving.load import load_encoder


def _bits(encoder: Encoder, bits: int | None) -> str:
    if bits is None:
        return str(max(encoder.bits))
    if bits not in encoder.bits:
        raise EncoderRequestError(f"--bits={bits}: this model has code lengths {encoder.bits}")
    return str(bits)


def _split_source(encoder: Encoder, split: str, config: ml_collections.ConfigDict | None) -> Any:
    """A split of the training dataset (or of `config.data`, to read it from another place).

    The dataset sources are imported here, for this mode only: hashing a folder of photos with
    an export needs none of them (start-up time).
    """
    from fdh_jax.data import load_split  # noqa: PLC0415

    config = config if config is not None else ml_collections.ConfigDict(encoder.training_config)
    return load_split(config, split, check_images=False)


def encode_to_index(
    model_path: str | Path,
    index_path: str | Path,
    *,
    split: str = "train",
    images: str | None = None,
    bits: int | None = None,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    adapt: bool = False,
) -> HashIndex:
    """Encodes the image files under `images` (or a split of the training dataset) and saves a
    `HashIndex` of `bits`-bit codes (default: the longest) to `index_path`, atomically.

    `model_path`: a training workdir or an export directory. `config` replaces the training
    config's data settings when encoding a split from a moved dataset. `adapt`: codes fitted to
    these images (`Encoder.index_fitted`) instead of the hash heads' codes.
    """
    encoder = load_encoder(model_path, step)
    k = _bits(encoder, bits)
    source = ImageFilesSource(images) if images else _split_source(encoder, split, config)
    labels = np.asarray(source.labels, np.int64)
    if adapt:
        index = encoder.index_fitted(source, source.paths, int(k), labels)
    else:
        index = encoder.index_codes(encoder.encode_source(source)[k], source.paths, labels)
    if jax.process_index() == 0:
        index.save(index_path)
        kind = " (fitted to these images)" if adapt else ""
        print(f"Wrote {len(index)} {k}-bit codes{kind} to {index_path}", flush=True)
    return index


def search_index(
    model_path: str | Path,
    index_path: str | Path,
    query: str,
    *,
    topk: int = 10,
    step: int | None = None,
) -> list[dict]:
    """Encodes the query image(s) and returns, per query, its ranked `(path, distance)` list."""
    index = HashIndex.load(index_path)
    encoder = load_encoder(model_path, step)
    encoder.check_index(index, str(index_path))
    source = ImageFilesSource(query)
    paths, distances = index.search(encoder.index_query_codes(index, source), topk)
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
