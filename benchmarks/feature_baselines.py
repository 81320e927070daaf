"""Shallow hashing baselines on frozen pretrained features: what FDH-MFE has to beat.

Extracts globally average-pooled C5 features of a pretrained backbone (resize 256, centre crop
224, as the retrieval protocol's test transform) for the database (train) and query (test)
splits of a folder dataset, then hashes them with linear methods fitted on the database and
reports mAP@all (query = test, database = train) at each code length:

- LSH: `b = where((x - mean) W >= 0, 1, -1)`, `W ~ N(0, 1)` seeded (Charikar's SimHash).
- PCA-ITQ: top-K principal directions, then the ITQ rotation (Gong & Lazebnik 2011): unsupervised.
- LDA-ITQ: top-K directions of regularised Fisher LDA (defined for K <= C - 1), then ITQ: the
  supervised linear hash.

Features are cached as .npy under `--cache_dir` (outside the repository), keyed by backbone,
weights file, image list and size, so reruns only hash and evaluate.

  python benchmarks/feature_baselines.py                     # MobileNetV2 (TFLite) on cub100
  python benchmarks/feature_baselines.py --backbone=resnet50 --weights=resnet50.safetensors
"""

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from fdh_jax.data.sources import make_source
from fdh_jax.data.transforms import eval_transform
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.pretrained import load_pretrained
from fdh_jax.search.adaptation import binarise, itq_rotation, pca_projection

SHARED = Path(os.environ.get("FDH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


# ----------------------------------------------------------------------------------------------
# Features


def feature_cache_path(cache_dir: Path, backbone: str, weights: str, paths: list[str], size: int):
    """Cache file named by a digest of everything the features depend on."""
    digest = hashlib.sha256()
    weights_id = "random-init"
    if weights:
        stat = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    for part in (backbone, weights_id, str(size), *paths):
        digest.update(part.encode() + b"\0")
    return cache_dir / f"{backbone}_{size}px_{len(paths)}_{digest.hexdigest()[:16]}.npy"


def extract_pooled_c5(source, backbone: str, weights: str, size: int, batch_size: int):
    """Globally average-pooled C5 of every image: `[N, C5 channels] float32`."""
    model = get_backbone(backbone)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    if weights:
        variables = load_pretrained(backbone, weights, template)
    else:
        variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))

    @jax.jit
    def pooled_c5(variables, images):
        return jnp.mean(model.apply(variables, images, train=False)["C5"], axis=(1, 2))

    resize = round(size * 256 / 224)
    features = []
    for start in range(0, len(source), batch_size):
        indices = range(start, min(start + batch_size, len(source)))
        images = np.stack([eval_transform(source[i]["image"], size, resize) for i in indices])
        if len(indices) < batch_size:  # pad the last batch: one compiled shape
            images = np.concatenate([images, np.zeros_like(images[: batch_size - len(indices)])])
        features.append(np.asarray(pooled_c5(variables, images))[: len(indices)])
        print(f"\r  {source.split}: {indices.stop}/{len(source)} images", end="", flush=True)
    print()
    return np.concatenate(features).astype(np.float32)


def cached_features(source, args) -> np.ndarray:
    cache = feature_cache_path(
        Path(args.cache_dir), args.backbone, args.weights, source.paths, args.image_size
    )
    if cache.exists():
        return np.load(cache)
    features = extract_pooled_c5(source, args.backbone, args.weights, args.image_size, args.batch)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features


# ----------------------------------------------------------------------------------------------
# Linear hashing (fitted on the database features only)


def lsh_projection(features: np.ndarray, bits: int, seed: int) -> np.ndarray:
    """Seeded Gaussian random projection `[D, bits]`."""
    return np.random.default_rng(seed).standard_normal((features.shape[1], bits))


def lda_projection(centred: np.ndarray, labels: np.ndarray, bits: int) -> np.ndarray:
    """Top-`bits` Fisher discriminant directions `[D, bits]`; needs bits <= classes - 1.

    Solves `S_b v = lambda (S_w + r I) v` with `r = 1e-3 * trace(S_w) / D` (shrinkage keeps S_w
    well conditioned when D approaches the number of images per class times classes).
    """
    classes = np.unique(labels)
    if bits > len(classes) - 1:
        raise ValueError(f"LDA gives at most {len(classes) - 1} directions, asked for {bits}")
    dim = centred.shape[1]
    class_means = np.stack([centred[labels == c].mean(0) for c in classes])  # [C, D]
    counts = np.array([(labels == c).sum() for c in classes], np.float64)
    within = centred - class_means[np.searchsorted(classes, labels)]
    scatter_within = within.T @ within
    scatter_between = (class_means * counts[:, None]).T @ class_means
    ridge = 1e-3 * np.trace(scatter_within) / dim
    _, vectors = scipy.linalg.eigh(
        scatter_between,
        scatter_within + ridge * np.eye(dim),
        subset_by_index=(dim - bits, dim - 1),
    )
    return vectors[:, ::-1]  # largest eigenvalue first


def hash_codes(method: str, database, database_labels, query, bits: int, seed: int):
    """Fits `method` on the database features; returns `(database_codes, query_codes)` int8."""
    mean = database.mean(0)
    db_centred, query_centred = database - mean, query - mean
    if method == "LSH":
        projection = lsh_projection(database, bits, seed)
        return binarise(db_centred @ projection), binarise(query_centred @ projection)
    if method == "PCA-ITQ":
        projection = pca_projection(db_centred, bits)
    elif method == "LDA-ITQ":
        projection = lda_projection(db_centred, database_labels, bits)
    else:
        raise ValueError(method)
    db_projected = db_centred @ projection
    scale = db_projected.std()  # ITQ is scale invariant; this only keeps the SVDs well scaled
    rotation = itq_rotation(db_projected / scale, seed)
    return binarise(db_projected @ rotation), binarise(query_centred @ projection @ rotation)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--weights",
        default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_ptq.tflite"),
        help="pretrained weights for --backbone ('' = random init, a floor)",
    )
    parser.add_argument("--root", default=str(SHARED / "data" / "cub100"), help="folder dataset")
    parser.add_argument("--bits", default="12,24,32,48")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie_break", default="index", help="index | expected | semicon")
    parser.add_argument(
        "--cache_dir", default=str(Path(tempfile.gettempdir()) / "fdh_feature_cache")
    )
    args = parser.parse_args()
    bits = [int(b) for b in args.bits.split(",")]

    start = time.perf_counter()
    database_source = make_source("folder", args.root, "train")
    query_source = make_source("folder", args.root, "test")
    print(
        f"{args.backbone} ({args.weights or 'random init'}) on {args.root}: "
        f"{len(database_source)} database, {len(query_source)} query, "
        f"{database_source.num_classes} classes"
    )
    database = cached_features(database_source, args).astype(np.float64)
    query = cached_features(query_source, args).astype(np.float64)
    features_seconds = time.perf_counter() - start

    start = time.perf_counter()
    methods = ("LSH", "PCA-ITQ", "LDA-ITQ")
    table = {}
    for method in methods:
        for k in bits:
            db_codes, query_codes = hash_codes(
                method, database, database_source.labels, query, k, args.seed
            )
            table[method, k] = 100 * float(
                mean_average_precision(
                    query_codes,
                    db_codes,
                    query_source.labels,
                    database_source.labels,
                    tie_break=args.tie_break,
                )
            )
    hashing_seconds = time.perf_counter() - start

    print(
        f"\nmAP@all x100 (query = test, database = train, ties: {args.tie_break}), "
        f"pooled C5, {args.image_size} px"
    )
    print(f"{'method':<10}" + "".join(f"{f'{k} bits':>10}" for k in bits))
    for method in methods:
        print(f"{method:<10}" + "".join(f"{table[method, k]:>10.2f}" for k in bits))
    print(
        f"\nfeatures {features_seconds:.1f} s (cached in {args.cache_dir}), "
        f"hashing + mAP {hashing_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
