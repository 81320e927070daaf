"""Codes fitted to a collection of classes the model never trained on.

The hash heads learn the training classes: on cub100 split by species (train on 50, index the
other 50) their codes score 13 to 23 points below an unsupervised PCA-ITQ fitted on the new
collection's frozen features (photo and mirror, mask pooling, L2, as below), and more than a
little of the trained descriptor `z` under them brings that class-bound geometry back
(docs/results.md, "Species never seen in training").
For a collection of new classes the model therefore offers a second kind of code, fitted to the
collection's own images without labels, as PCA-ITQ is:

1. transfer features `t = [unit(p), w * unit(z)]`: `p` is the backbone's C5 averaged over the
   model's foreground mask (`FDHMFE` output `pooled`, no parameters), `z` the trained descriptor,
   `w` = `config.eval.adapt_descriptor_weight` (chosen on species held out of training);
2. PCA-ITQ (Gong & Lazebnik 2011) fitted on the transfer features of the collection's database:
   centre, project on the top-K principal directions, rotate by the orthogonal `R` minimising the
   quantisation error `||sign(V R) - V R||`;
3. the codes of database and queries are `where((t - mean) P R >= 0, +1, -1)` (int8).

`CollectionHash` holds the fit (`mean [F]`, `projection [F, K]` = `P R`); `fdh_jax.evaluation`
scores it with `--mode=eval --adapt`.
"""

import dataclasses

import numpy as np

ITQ_ITERATIONS = 50
# `config.eval.adapt_descriptor_weight` of configs/default.py, and of workdirs trained before
# the field existed.
DESCRIPTOR_WEIGHT = 0.3


class CollectionTooSmallError(ValueError):
    """Fewer database images than code bits: PCA-ITQ has no K directions to keep."""


def binarise(projected: np.ndarray) -> np.ndarray:
    """`[N, K]` real -> `[N, K] int8` in {-1, +1} (0 maps to +1, as the model's codes)."""
    return np.where(projected >= 0, 1, -1).astype(np.int8)


def pca_projection(centred: np.ndarray, bits: int) -> np.ndarray:
    """Top-`bits` principal directions `[D, bits]` of centred features `[N, D]`."""
    if not 0 < bits <= min(centred.shape):
        raise ValueError(
            f"PCA of {centred.shape[0]} samples of dimension {centred.shape[1]} gives at most "
            f"{min(centred.shape)} directions, asked for {bits}"
        )
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    return right[:bits].T


def itq_rotation(projected: np.ndarray, seed: int, iterations: int = ITQ_ITERATIONS) -> np.ndarray:
    """ITQ: orthogonal `R [K, K]` minimising `||B - V R||_F` with `B = sign(V R)`, by alternating
    the codes and the rotation (orthogonal Procrustes) from a seeded random rotation."""
    bits = projected.shape[1]
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))
    for _ in range(iterations):
        codes = binarise(projected @ rotation).astype(np.float64)
        left, _, right = np.linalg.svd(codes.T @ projected)
        rotation = (left @ right).T
    return rotation


@dataclasses.dataclass(frozen=True)
class CollectionHash:
    """A linear hash `x -> where((x - mean) @ projection >= 0, +1, -1)`."""

    mean: np.ndarray  # [F] float64
    projection: np.ndarray  # [F, K] float64

    @property
    def bits(self) -> int:
        return int(self.projection.shape[1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """`[N, F]` features -> `[N, K] int8` codes in {-1, +1}."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features of shape {features.shape}: this hash was fitted on "
                f"{self.mean.shape[0]}-dimensional features"
            )
        return binarise((features - self.mean) @ self.projection)


def fit_pca_itq(features: np.ndarray, bits: int, seed: int = 0) -> CollectionHash:
    """PCA-ITQ fitted on `features [N, F]` (e.g. a database's transfer features); raises
    `CollectionTooSmallError` when `N` or `F` is below `bits`."""
    features = np.asarray(features, np.float64)
    check_collection_size(features.shape[0], bits, features.shape[1])
    mean = features.mean(0)
    projection = pca_projection(features - mean, bits)
    projected = (features - mean) @ projection
    # ITQ is scale invariant; dividing by the spread only keeps the SVDs well scaled.
    rotation = itq_rotation(projected / max(projected.std(), 1e-12), seed)
    return CollectionHash(mean, projection @ rotation)


def check_collection_size(num_images: int, bits: int, dimension: int | None = None) -> None:
    """Raises `CollectionTooSmallError` (one line) unless `bits` directions can be fitted."""
    if num_images < bits:
        raise CollectionTooSmallError(
            f"codes fitted to a collection need at least as many database images as bits: "
            f"{num_images} images for {bits}-bit codes (index more images or use the hash "
            "heads' codes, without --adapt)"
        )
    if dimension is not None and dimension < bits:
        raise CollectionTooSmallError(f"{dimension}-dimensional features give no {bits}-bit PCA")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def transfer_features(
    pooled: np.ndarray, descriptor: np.ndarray, descriptor_weight: float
) -> np.ndarray:
    """`[unit(pooled), w * unit(descriptor)]`: `[N, C5 + D]` float64 (just `unit(pooled)` when
    `w` is 0)."""
    parts = [_unit_rows(np.asarray(pooled, np.float64))]
    if descriptor_weight:
        parts.append(descriptor_weight * _unit_rows(np.asarray(descriptor, np.float64)))
    return np.concatenate(parts, axis=1)


def adapted_codes_label(weight: float) -> str:
    """What `results.json` of `--mode=eval --adapt` says of its codes (`"codes"`)."""
    return (
        "PCA-ITQ fitted to the database's transfer features (fdh_jax.search.adaptation), "
        f"descriptor weight {weight}"
    )


def descriptor_weight(config) -> float:
    """`eval.adapt_descriptor_weight` of a config (a ConfigDict or its JSON dict), or
    `DESCRIPTOR_WEIGHT` for a workdir recorded before the field existed."""
    return float(config["eval"].get("adapt_descriptor_weight", DESCRIPTOR_WEIGHT))
