"""Shallow hashing baselines on frozen pretrained features: what FDH-MFE has to beat.

Extracts the C5 stage map of a pretrained backbone (resize to `eval_resize`, centre crop
`image_size`: the retrieval protocol's test transform) for every image of the database (train)
and query (test) splits of a folder dataset and of its mirror image, pools it two ways, hashes
the pooled features with linear methods fitted on the database and reports mAP@all (query =
test, database = train) at each code length:

- LSH: `b = where((x - mean) W >= 0, 1, -1)`, `W ~ N(0, 1)` seeded (Charikar's SimHash).
- PCA-ITQ: top-K principal directions, then the ITQ rotation (Gong & Lazebnik 2011): unsupervised.
- LDA-ITQ: top-K directions of regularised Fisher LDA (defined for K <= C - 1), then ITQ: the
  supervised linear hash.

Each method is scored on every variant of the features (`Variant`): the centre crop alone or
averaged with its mirror image (the model's test-time flip averaging), C5 averaged over the whole
map ("plain") or over the model's foreground mask ("mask": `fdh_jax.models.suppression`, which
has no parameter, so it is the trained model's mask without needing the trained model; the
model's `pooled` output), and the pooled features L2-normalised or not. The first table is that
grid; the second puts the old rows (centre crop, plain, not normalised: the baselines as first
published) beside the rows on equal terms with the model of `--config` (its views, L2
normalisation, and the better of the two poolings, chosen on the query split, which can only
favour the baseline), and the strongest row of the grid where that is another.

Pooled features are cached as .npy under `--cache_dir` (outside the repository), keyed by
backbone, weights file, image list, size and mask temperature, so reruns only hash and evaluate.

  python benchmarks/feature_baselines.py                     # MobileNetV2 (TFLite) on cub100
  python benchmarks/feature_baselines.py --backbone=resnet50 --weights=resnet50.safetensors
"""

import argparse
import dataclasses
import hashlib
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from fdh_jax.config_files import load_config
from fdh_jax.data.sources import make_source
from fdh_jax.data.transforms import eval_transform
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.pretrained import load_pretrained
from fdh_jax.models.suppression import background_mask
from fdh_jax.search.adaptation import CollectionHash, itq_rotation, pca_projection

SHARED = Path(os.environ.get("FDH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REPO = Path(__file__).resolve().parents[1]
POOLINGS = ("plain", "mask")
METHODS = ("LSH", "PCA-ITQ", "LDA-ITQ")


# ----------------------------------------------------------------------------------------------
# Features


@dataclasses.dataclass(frozen=True)
class Variant:
    """How pooled C5 features are made: the views, the pooling, the normalisation."""

    mirror: bool  # the centre crop's features averaged with its mirror image's (flip averaging)
    pooling: str  # "plain": mean over the map; "mask": mean weighted by the foreground mask
    l2: bool  # each image's (view-averaged) feature scaled to unit length

    @property
    def name(self) -> str:
        views = "photo + mirror" if self.mirror else "centre crop"
        return f"{views}, {self.pooling} pooling, {'L2' if self.l2 else 'raw'}"


VARIANTS = tuple(
    Variant(mirror, pooling, l2)
    for mirror in (False, True)
    for pooling in POOLINGS
    for l2 in (False, True)
)
OLD = Variant(mirror=False, pooling="plain", l2=False)  # the baselines as first published


def feature_cache_path(
    cache_dir: Path, backbone: str, weights: str, paths: list[str], size: int, *extra: str
) -> Path:
    """Cache file named by a digest of everything the features depend on."""
    digest = hashlib.sha256()
    weights_id = "random-init"
    if weights:
        stat = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    for part in (backbone, weights_id, str(size), *extra, *paths):
        digest.update(part.encode() + b"\0")
    return cache_dir / f"{backbone}_{size}px_{len(paths)}_{digest.hexdigest()[:16]}.npy"


def extract_c5_pools(source, args) -> np.ndarray:
    """`[N, 2, 2, C5 channels] float32`: per image, per view (the centre crop, its mirror image)
    and per pooling (`POOLINGS`: plain mean, mean over the foreground mask)."""
    model = get_backbone(args.backbone)
    size = args.image_size
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    if args.weights:
        variables = load_pretrained(args.backbone, args.weights, template)
    else:
        variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))

    @jax.jit
    def pools(variables, images):
        both = jnp.concatenate([images, images[:, :, ::-1]])  # as FDHMFE's flip averaging
        c5 = model.apply(variables, both, train=False)["C5"].astype(jnp.float32)
        mask = background_mask(c5, temperature=args.mask_temperature)  # FDHMFE's, no parameters
        masked = jnp.sum(c5 * mask, axis=(1, 2)) / jnp.sum(mask, axis=(1, 2))
        pooled = jnp.stack([jnp.mean(c5, axis=(1, 2)), masked], axis=1)  # [2B, 2, C]
        return jnp.stack([pooled[: images.shape[0]], pooled[images.shape[0] :]], axis=1)

    features = []
    for start in range(0, len(source), args.batch):
        indices = range(start, min(start + args.batch, len(source)))
        images = np.stack(
            [eval_transform(source[i]["image"], size, args.eval_resize) for i in indices]
        )
        if len(indices) < args.batch:  # pad the last batch: one compiled shape
            images = np.concatenate([images, np.zeros_like(images[: args.batch - len(indices)])])
        features.append(np.asarray(pools(variables, images))[: len(indices)])
        print(f"\r  {source.split}: {indices.stop}/{len(source)} images", end="", flush=True)
    print()
    return np.concatenate(features).astype(np.float32)


def cached_pools(source, args) -> np.ndarray:
    """`extract_c5_pools`, read from `--cache_dir` when computed before."""
    cache = feature_cache_path(
        Path(args.cache_dir),
        args.backbone,
        args.weights,
        source.paths,
        args.image_size,
        "c5-pools-v1",
        f"resize={args.eval_resize}",
        f"mask_temperature={args.mask_temperature}",
    )
    if cache.exists():
        return np.load(cache)
    features = extract_c5_pools(source, args)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features


def variant_features(pools: np.ndarray, variant: Variant) -> np.ndarray:
    """`[N, C] float64` features of `variant` from `extract_c5_pools`'s `[N, 2, 2, C]`. As in
    `fdh_jax.search.adaptation.transfer_features`, the views are averaged before normalising."""
    by_view = pools[:, :, POOLINGS.index(variant.pooling)].astype(np.float64)
    features = by_view.mean(1) if variant.mirror else by_view[:, 0]
    if variant.l2:
        features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features


# ----------------------------------------------------------------------------------------------
# Linear hashing (fitted on one set of features, applied to any)


def lsh_projection(features: np.ndarray, bits: int, seed: int) -> np.ndarray:
    """Seeded Gaussian random projection `[D, bits]`."""
    return np.random.default_rng(seed).standard_normal((features.shape[1], bits))


def lda_projection(centred: np.ndarray, labels: np.ndarray, bits: int) -> np.ndarray:
    """Top-`bits` Fisher discriminant directions `[D, bits]`; needs bits <= classes - 1.

    Solves `S_b v = lambda (S_w + r I) v` with `r = 1e-3 * trace(S_w) / D` (shrinkage keeps S_w
    well conditioned when D approaches the number of images per class times classes).
    """
    labels = np.asarray(labels)
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


def fit_hash(method: str, features: np.ndarray, labels, bits: int, seed: int) -> CollectionHash:
    """`method` fitted on `features [N, D]` (labels: LDA-ITQ only): a linear hash of any."""
    mean = features.mean(0)
    centred = features - mean
    if method == "LSH":
        return CollectionHash(mean, lsh_projection(features, bits, seed))
    if method == "PCA-ITQ":
        projection = pca_projection(centred, bits)
    elif method == "LDA-ITQ":
        projection = lda_projection(centred, labels, bits)
    else:
        raise ValueError(method)
    projected = centred @ projection
    # ITQ is scale invariant; dividing by the spread only keeps the SVDs well scaled.
    rotation = itq_rotation(projected / projected.std(), seed)
    return CollectionHash(mean, projection @ rotation)


def score_variants(fits: dict, query, query_labels, database, database_labels, bits, args):
    """mAP@all x100 of every fit on every variant: `{(fit label, Variant): [mAP per length]}`.

    `fits`: `{label: (method, pools it is fitted on, their labels)}`; `query`, `database`:
    `extract_c5_pools` arrays of the images ranked and searched."""
    table = {}
    for variant in VARIANTS:
        query_features = variant_features(query, variant)
        database_features = variant_features(database, variant)
        for label, (method, fit_pools, fit_labels) in fits.items():
            fit_features = variant_features(fit_pools, variant)
            row = []
            for k in bits:
                hashing = fit_hash(method, fit_features, fit_labels, k, args.seed)
                score = mean_average_precision(
                    hashing(query_features),
                    hashing(database_features),
                    query_labels,
                    database_labels,
                    tie_break=args.tie_break,
                )
                row.append(100 * float(score))
            table[label, variant] = row
    return table


def equal_terms(table: dict, label: str, mirror: bool) -> Variant:
    """The row of `label` on the model's terms: its views, L2, the better pooling (by the mean
    over code lengths)."""
    candidates = [Variant(mirror, pooling, True) for pooling in POOLINGS]
    return max(candidates, key=lambda v: np.mean(table[label, v]))


def print_tables(table: dict, bits: list[int], mirror: bool) -> dict[str, Variant]:
    """Prints the grid, then each fit's old row, its equal-terms row and, where another variant
    has a higher mean, the strongest row of the grid (markdown); returns the equal-terms
    variants."""
    labels = list(dict.fromkeys(label for label, _ in table))
    header = " | ".join(f"{k} bits" for k in bits)
    print(f"| fit | features | {header} | mean |")
    print("|---|---|" + "---|" * (len(bits) + 1))
    for label in labels:
        for variant in VARIANTS:
            row = table[label, variant]
            cells = " | ".join(f"{v:.2f}" for v in row)
            print(f"| {label} | {variant.name} | {cells} | {np.mean(row):.2f} |")
    views = "photo + mirror" if mirror else "centre crop"
    print(f"\nOld rows and rows on the model's terms ({views}, L2, the better pooling):")
    print(f"| baseline | {header} |")
    print("|---|" + "---|" * len(bits))
    chosen = {}
    for label in labels:
        chosen[label] = equal_terms(table, label, mirror)
        strongest = max(VARIANTS, key=lambda v, fit=label: np.mean(table[fit, v]))
        rows = [("old", OLD), ("equal terms", chosen[label])]
        if strongest != chosen[label]:
            rows.append(("strongest of the grid", strongest))
        for tag, variant in rows:
            cells = " | ".join(f"{v:.2f}" for v in table[label, variant])
            print(f"| {label}, {tag}: {variant.name} | {cells} |")
    return chosen


def cosine_map(query: np.ndarray, database: np.ndarray, query_labels, database_labels) -> float:
    """mAP@all of ranking the database by cosine similarity to each query (no hashing)."""
    query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
    unit = [
        x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (query, database)
    ]
    similarity = unit[0] @ unit[1].T
    total = 0.0
    for start in range(0, len(query), 256):
        rows = slice(start, start + 256)
        order = np.argsort(-similarity[rows], axis=1, kind="stable")
        relevant = database_labels[order] == query_labels[rows, None]
        hits = np.cumsum(relevant, axis=1)
        ranks = np.arange(1, relevant.shape[1] + 1)
        precision_sum = np.sum(np.where(relevant, hits / ranks, 0.0), axis=1)
        total += np.sum(precision_sum / np.maximum(relevant.sum(1), 1))
    return total / len(query)


# ----------------------------------------------------------------------------------------------


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that fix the features (shared with unseen_classes.py)."""
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "frozen_mobilenet_v2.py"),
        help="the model's config: its views (model.flip_average), mask temperature, image size",
    )
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--weights",
        default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_ptq.tflite"),
        help="pretrained weights for --backbone ('' = random init, a floor)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie_break", default="index", help="index | expected | semicon")
    parser.add_argument(
        "--cache_dir", default=str(Path(tempfile.gettempdir()) / "fdh_feature_cache")
    )


def resolve_model_settings(args: argparse.Namespace) -> None:
    """Sets `args.image_size`, `eval_resize`, `mask_temperature`, `flip_average` from --config."""
    config = load_config(args.config)
    args.image_size = int(config.data.image_size)
    args.eval_resize = int(config.data.eval_resize)
    args.mask_temperature = float(config.model.mask_temperature)
    args.flip_average = bool(config.model.flip_average)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_feature_arguments(parser)
    parser.add_argument("--root", default=str(SHARED / "data" / "cub100"), help="folder dataset")
    parser.add_argument("--bits", default="12,24,32,48")
    args = parser.parse_args()
    resolve_model_settings(args)
    bits = [int(b) for b in args.bits.split(",")]

    start = time.perf_counter()
    database_source = make_source("folder", args.root, "train")
    query_source = make_source("folder", args.root, "test")
    print(
        f"{args.backbone} ({args.weights or 'random init'}) on {args.root}: "
        f"{len(database_source)} database, {len(query_source)} query, "
        f"{database_source.num_classes} classes; C5 at {args.image_size} px (resize "
        f"{args.eval_resize}), mask temperature {args.mask_temperature:g}"
    )
    database = cached_pools(database_source, args)
    query = cached_pools(query_source, args)
    features_seconds = time.perf_counter() - start

    start = time.perf_counter()
    fits = {m: (m, database, database_source.labels) for m in METHODS}
    table = score_variants(
        fits, query, query_source.labels, database, database_source.labels, bits, args
    )
    hashing_seconds = time.perf_counter() - start
    print(
        f"\nmAP@all x100 (query = test, database = train, every hash fitted on the database, "
        f"ties: {args.tie_break})"
    )
    print_tables(table, bits, args.flip_average)
    print(
        f"\nfeatures {features_seconds:.1f} s (cached in {args.cache_dir}), "
        f"hashing + mAP {hashing_seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
