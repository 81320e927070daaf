"""Feature cache: a frozen backbone's stage maps, computed once per image and view.

With `model.freeze_backbone=True` the backbone is a fixed function of the image, yet a run used
to recompute it on every crop of every step (the cub100 recipe: 25,600 crops of 2,944 photos).
Instead, the maps of the stages the model uses are computed once, stored as float16 `.npy` files
and memory-mapped; training and evaluation feed them to the model's precomputed-stage-maps path
(`FDHMFE` accepts `{"C3": ..., "C5": ...}`). The cache directory is shared by runs
(`data.feature_cache`: "auto" is `$FDH_JAX_CACHE`, else `$XDG_CACHE_HOME/fdh_jax`, else
`~/.cache/fdh_jax`; "" turns caching off), so another seed, schedule or ablation of the head
reuses it.

**Views.** Per image, `V = data.cached_views` views are stored: view 0 is the evaluation view
(resize the shorter side to `eval_resize`, centre-crop `image_size`); views 1..V-1 are training
views (random-resized crop with `data.crop_scale`, horizontal flip), drawn from a generator
seeded by `(VIEW_SEED, image index, view)`. The views belong to the cache, not to a run: every
run reuses them, and the run's seed chooses per step and slot which view an example uses
(`fdh_jax.data.pipeline`), so training stays a pure function of `(seed, step)` and resumes
exactly. The query split stores view 0 only. With `model.flip_average` (test-time flip averaging)
each split also gets an entry of one view, the mirror image of view 0, whose maps travel with
view 0 under `"mirrored"`; it is a separate entry, so turning the switch on or off leaves the
training views' entry (and training) as it is. Compared with fresh crops at every step, training
sees `V` fixed crops per image; the count is the trade between augmentation and extraction time
(docs/results.md, "Real photos").

**Key.** An entry lives in `<cache>/stage_maps/<key>/` where `key` is a SHA-256 over everything
the maps depend on: the format version, the backbone (name, width, compute dtype), the SHA-256 of
its variables (so other weights, or another random initialisation, recompute), the stages, the
image list (each file's path, size, modification time and mode), the source's own image
transform, the view parameters (`image_size`, `eval_resize`, `crop_scale`, `horizontal_flip`,
`V`, `VIEW_SEED`; `"mirrored": true` for a mirrored evaluation view) and the storage dtype.
Sources whose items are not files (TFDS records, the synthetic set) are not cached: they have
nothing to stat.

**Trainable last layers.** With `model.trainable_after` (e.g. "C4"), the layers after that
stage train on top of the cached maps: an entry then stores the stages up to and including it
(not C5, which the model computes), and its key covers only the variables of the frozen layers,
so a resumed or finished run, whose last layers have moved, finds the same entry.

**Files.** `manifest.json` (the key's inputs, shapes, and the SHA-256 of each `.npy`) and one
`<stage>.npy` of float16 `[N, V, h, w, c]` per stage. An entry is written into a temporary
directory and renamed into place, so it appears whole; when two processes write the same entry,
the first rename wins and the other discards its copy (the contents are identical). Opening
checks every file against the manifest: a truncated or altered entry is removed with a warning
and computed again. Size: `N x V x` the maps of one crop (MobileNetV2 at 224 px: C3, C4, C5 are
208 KiB per crop, so cub100's 2,944 database images with 4 views and 2,958 queries take
3.0 GiB).

**Several processes.** Extraction runs like evaluation (`fdh_jax.encoding.map_source`): each
process computes its share of every global batch on its devices; every process receives every
map and writes the entry into its own cache directory (a shared one gets one copy).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdh_jax import parallel
from fdh_jax.common.checksums import file_record, files_problem, variables_fingerprint
from fdh_jax.data.image_scan import files_digest
from fdh_jax.data.transforms import eval_transform, train_transform
from fdh_jax.encoding import map_source
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import precomputed_stages
from fdh_jax.models.mobilenet import layers_after

FORMAT_VERSION = 1
VIEW_SEED = 0x57A6E  # fixes the training views of every cache entry
MANIFEST = "manifest.json"
STORAGE_DTYPE = np.float16


def cache_root(setting: str) -> Path | None:
    """The cache directory `data.feature_cache` names: None for "", the default for "auto"."""
    if not setting:
        return None
    if setting == "auto":
        root = os.environ.get("FDH_JAX_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or "~/.cache", "fdh_jax"
        )
        return Path(os.path.expanduser(root))
    return Path(os.path.expanduser(setting))


def _stored_stages(config: ml_collections.ConfigDict) -> list[str]:
    # The model's stages and C5 (which makes the suppression mask), less what trainable layers
    # after `model.trainable_after` compute from that stage's map.
    model = config.model
    return list(precomputed_stages(model.stages, model.get("trainable_after", "")))


def _frozen_variables(config: ml_collections.ConfigDict, backbone_variables: dict) -> dict:
    """The backbone variables that the stored maps depend on: all of them, less the layers after
    `model.trainable_after` (they train, and the maps stop before them)."""
    start = config.model.get("trainable_after", "")
    if not start:
        return backbone_variables
    trainable = set(layers_after(start))
    return {
        kind: {layer: tree for layer, tree in trees.items() if layer not in trainable}
        for kind, trees in backbone_variables.items()
    }


def _file_paths(source: Any) -> list[str] | None:
    """The source's image files, or None if its items are not all files on disk."""
    paths = [str(p) for p in getattr(source, "paths", [])]
    if len(paths) != len(source) or not all(os.path.isfile(p) for p in paths):
        return None
    return paths


def _source_transform(source: Any) -> str | None:
    while hasattr(source, "parent"):  # a SubsetSource of the bad-image policy
        source = source.parent
    transform = getattr(source, "image_transform", None)
    return None if transform is None else f"{transform.__module__}.{transform.__qualname__}"


def entry_description(
    config: ml_collections.ConfigDict,
    source: Any,
    paths: list[str],
    weights: str,
    views: int,
    mirrored: bool = False,
) -> dict:
    """Everything an entry's maps depend on (the key is the SHA-256 of this, as JSON).
    `mirrored`: the entry holds the mirror image of the evaluation view (one view)."""
    data, model = config.data, config.model
    # Only mirrored entries carry the field, so the keys of the others stay as they were.
    return ({"mirrored": True} if mirrored else {}) | {
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone,
        "width": int(model.width),
        "compute_dtype": model.dtype,
        "backbone_variables_sha256": weights,
        "stages": _stored_stages(config),
        "num_images": len(paths),
        "images_sha256": files_digest(paths),
        "source_transform": _source_transform(source),
        "image_size": int(data.image_size),
        "eval_resize": int(data.eval_resize),
        "crop_scale": [float(v) for v in data.crop_scale],
        "horizontal_flip": bool(data.horizontal_flip),
        "views": int(views),
        "view_seed": VIEW_SEED,
        "storage_dtype": np.dtype(STORAGE_DTYPE).name,
    }


def entry_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


def view_image(
    image: np.ndarray,
    index: int,
    view: int,
    data: ml_collections.ConfigDict,
    mirrored: bool = False,
) -> np.ndarray:
    """View `view` of image `index`: `uint8 [H, W, 3]` -> normalised float32 `[S, S, 3]`.
    `mirrored`: the mirror image of the evaluation view (view 0)."""
    if mirrored:
        return eval_transform(image, data.image_size, data.eval_resize)[:, ::-1]
    if view == 0:
        return eval_transform(image, data.image_size, data.eval_resize)
    rng = np.random.default_rng([VIEW_SEED, index, view])
    return train_transform(
        image,
        data.image_size,
        rng,
        crop_scale=tuple(data.crop_scale),
        horizontal_flip=data.horizontal_flip,
    )


class _Views:
    """`N x V` items: item `j` is view `j % V` of image `j // V` (for `map_source`)."""

    def __init__(self, source: Any, views: int):
        self.source, self.views = source, views

    def __len__(self) -> int:
        return len(self.source) * self.views

    def __getitem__(self, item: int) -> dict:
        return self.source[item // self.views]


class StageMapViews:
    """A source over cached stage maps: the images of `source`, `num_views` views each.

    `source[i]` is image i's evaluation view `{"C3": float16 [h, w, c], ..., "label": int}`,
    plus `"mirrored": {"C3": ..., ...}` (the mirror image's maps) once `with_mirrored` gave
    them; `view_inputs(i, v)` is view v (for training). Paths, labels and class names are the
    image source's.
    """

    def __init__(self, directory: Path, source: Any, stages: list[str], num_views: int):
        self.directory = directory
        self.maps = {s: np.load(directory / f"{s}.npy", mmap_mode="r") for s in stages}
        self.mirrored: StageMapViews | None = None
        self.num_views = num_views
        self.labels = np.asarray(source.labels)
        self.paths = list(getattr(source, "paths", []))
        self.class_names = list(getattr(source, "class_names", []))
        self.num_classes = getattr(source, "num_classes", None)
        self.name, self.split = getattr(source, "name", ""), getattr(source, "split", "")

    def __len__(self) -> int:
        return len(self.labels)

    def view_inputs(self, index: int, view: int) -> dict[str, np.ndarray]:
        return {s: np.asarray(m[index, view]) for s, m in self.maps.items()}

    def with_mirrored(self, mirrored: StageMapViews) -> StageMapViews:
        """These views with the mirror images' maps (a one-view entry of the same images)."""
        if len(mirrored) != len(self) or set(mirrored.maps) != set(self.maps):
            raise ValueError(f"{mirrored.directory} does not mirror {self.directory}")
        self.mirrored = mirrored
        return self

    def __getitem__(self, index: int) -> dict:
        record = self.view_inputs(index, 0) | {"label": int(self.labels[index])}
        if self.mirrored is not None:
            record["mirrored"] = self.mirrored.view_inputs(index, 0)
        return record

    def model_inputs(self, record: dict) -> dict:
        inputs = {s: record[s] for s in self.maps}
        if "mirrored" in record:
            inputs["mirrored"] = record["mirrored"]
        return inputs


def _check_entry(directory: Path, description: dict) -> str | None:
    """Why the entry at `directory` cannot be used (None if it is complete and intact)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    if manifest.get("description") != description:
        return "manifest of another entry"
    files = {f"{stage}.npy": expected for stage, expected in manifest.get("files", {}).items()}
    problem = files_problem(directory, files)
    if problem is not None:
        return problem
    if sorted(manifest.get("files", {})) != description["stages"]:
        return "stages missing from the manifest"
    return None


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _extract(
    staging: Path,
    source: Any,
    description: dict,
    backbone_variables: dict,
    config: ml_collections.ConfigDict,
    mesh,
) -> dict:
    """Computes every view's stage maps into `staging`; returns the manifest's `files`."""
    views, stages = description["views"], description["stages"]
    model = config.model
    backbone = get_backbone(model.backbone, width=model.width, dtype=_dtype(model.dtype))
    size = config.data.image_size
    shapes = jax.eval_shape(
        functools.partial(backbone.apply, train=False),
        backbone_variables,
        jnp.zeros((1, size, size, 3)),
    )
    arrays = {
        s: np.lib.format.open_memmap(
            staging / f"{s}.npy", "w+", STORAGE_DTYPE, (len(source), views, *shapes[s].shape[1:])
        )
        for s in stages
    }
    flat = {s: a.reshape(len(source) * views, *a.shape[2:]) for s, a in arrays.items()}

    fn = _stage_map_function(model.backbone, model.width, model.dtype, tuple(stages), mesh)
    items = _Views(source, views)

    mirrored = bool(description.get("mirrored", False))

    def transform(item: int, record: dict) -> dict:
        image = view_image(record["image"], item // views, item % views, config.data, mirrored)
        return {"image": image}

    start, last_report, done = time.perf_counter(), 0.0, 0
    for positions, outputs in map_source(fn, backbone_variables, items, config, mesh, transform):
        real = positions < len(items)
        for s in stages:
            flat[s][positions[real]] = outputs[s][real]
        done += int(real.sum())
        now = time.perf_counter()
        if now - last_report > 10 or done == len(items):
            last_report = now
            rate = done / max(now - start, 1e-9)
            _report(
                f"Caching stage maps of {description['num_images']} {source.split} images x "
                f"{views}{' mirrored' if mirrored else ''} view(s): {done}/{len(items)} | "
                f"{rate:.0f} img/s | "
                f"ETA {_format_seconds((len(items) - done) / max(rate, 1e-9))}"
            )
    for array in arrays.values():
        array.flush()
    shapes_out = {s: list(a.shape[2:]) for s, a in arrays.items()}
    arrays.clear()
    flat.clear()
    files = {}
    for s in stages:
        path = staging / f"{s}.npy"
        files[s] = file_record(path) | {"shape": shapes_out[s]}
    return files


@functools.lru_cache(maxsize=4)
def _stage_map_function(name: str, width: int, dtype: str, stages: tuple[str, ...], mesh):
    """`(variables, images) -> {stage: float16 maps}` jitted over `mesh`; cached, so that the
    database and query splits share one compilation."""
    backbone = get_backbone(name, width=width, dtype=_dtype(dtype))

    def maps(variables, images):
        def stored(chunk):
            out = backbone.apply(variables, chunk, train=False)
            return {s: out[s].astype(STORAGE_DTYPE) for s in stages}

        return parallel.map_in_chunks_on_cpu(stored, images)

    return jax.jit(maps, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _report(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def cached_stage_maps(
    config: ml_collections.ConfigDict,
    source: Any,
    backbone_variables: dict,
    mesh,
    views: int,
    root: Path,
    mirrored: bool = False,
) -> StageMapViews | None:
    """The cached stage maps of `source` (computed now if absent or damaged), or None when the
    source's items are not image files. `mirrored`: the mirror images of the evaluation view
    (`views` must be 1)."""
    if mirrored and views != 1:
        raise ValueError(f"a mirrored entry holds one view, not {views}")
    paths = _file_paths(source)
    if paths is None:
        return None
    weights = variables_fingerprint(_frozen_variables(config, backbone_variables))
    description = entry_description(config, source, paths, weights, views, mirrored)
    directory = root / "stage_maps" / entry_key(description)
    if directory.is_dir():
        problem = _check_entry(directory, description)
        if problem is None:
            return StageMapViews(directory, source, description["stages"], views)
        warnings.warn(f"stage-map cache {directory}: {problem}; computing it again", stacklevel=2)
        _remove(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        files = _extract(staging, source, description, backbone_variables, config, mesh)
        manifest = {"description": description, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            staging.rename(directory)
        except OSError:  # another process finished the same entry first: use that one
            if _check_entry(directory, description) is not None:
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    total = sum(f["bytes"] for f in files.values())
    _report(f"Stage-map cache: {total / 2**30:.2f} GiB in {directory}")
    return StageMapViews(directory, source, description["stages"], views)


def _remove(directory: Path) -> None:
    """Deletes a damaged entry: renamed aside first, so no reader ever sees half of it."""
    aside = directory.with_name(f".{directory.name}.damaged-{os.getpid()}")
    try:
        directory.rename(aside)
    except OSError:
        return  # another process moved it already
    shutil.rmtree(aside, ignore_errors=True)


def cached_splits(
    config: ml_collections.ConfigDict,
    database: Any,
    query: Any,
    backbone_variables: dict,
    mesh,
) -> tuple[Any, Any]:
    """`(database, query)` as cached stage maps when the config asks for it, else unchanged.

    The database gets `data.cached_views` views (view 0 for evaluation, all for training), the
    query view 0 only; with `model.flip_average` both also get the mirror image of view 0. Used
    when `model.freeze_backbone` and `data.feature_cache` is set.
    """
    root = cache_root(config.data.feature_cache)
    if not config.model.freeze_backbone or root is None:
        return database, query
    cached_database = cached_stage_maps(
        config, database, backbone_variables, mesh, config.data.cached_views, root
    )
    cached_query = cached_stage_maps(config, query, backbone_variables, mesh, 1, root)
    if cached_database is None or cached_query is None:
        _report("Stage maps are cached for datasets of image files only: computing them per step.")
        return database, query
    if config.model.flip_average:
        for cached, source in ((cached_database, database), (cached_query, query)):
            mirrored = cached_stage_maps(config, source, backbone_variables, mesh, 1, root, True)
            cached.with_mirrored(mirrored)
    return cached_database, cached_query
