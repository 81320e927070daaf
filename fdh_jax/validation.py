"""Config validation: every mistake is caught before data loading or compilation.

`validate_config` raises `ConfigError` whose message is one line that starts with the offending
field, e.g. `config.bits: code lengths must be positive integers, got (0, 24)`.
"""

import ml_collections

from fdh_jax.data.sources import SOURCE_MODULES
from fdh_jax.models.backbones import BACKBONES, STAGE_NAMES

OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float32", "bfloat16")
TIE_BREAKS = ("index", "expected", "semicon")
SELECTIONS = ("last", "best")
BAD_IMAGE_POLICIES = ("error", "skip")


class ConfigError(ValueError):
    """An invalid configuration; `str(error)` names the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config.{field}: {problem}")
        self.field = field


def _check(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise ConfigError(field, problem)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises `ConfigError` for the first invalid field of `config` on `num_devices` devices."""
    bits = tuple(config.bits)
    _check(len(bits) > 0, "bits", "needs at least one code length")
    _check(
        all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in bits),
        "bits",
        f"code lengths must be positive integers, got {bits}",
    )
    _check(len(set(bits)) == len(bits), "bits", f"code lengths must be distinct, got {bits}")

    data = config.data
    datasets = ("synthetic", *sorted(SOURCE_MODULES))
    _check(
        data.name in datasets,
        "data.name",
        f"unknown dataset {data.name!r}; choose from {', '.join(datasets)}",
    )
    _check(
        data.name == "synthetic" or bool(data.root),
        "data.root",
        f"dataset {data.name!r} needs --config.data.root=DIR (where the dataset is on disk)",
    )
    _check(data.image_size >= 32, "data.image_size", f"must be >= 32 pixels, got {data.image_size}")
    _check(
        data.eval_resize >= data.image_size,
        "data.eval_resize",
        f"must be >= data.image_size ({data.image_size}), got {data.eval_resize}",
    )
    _check(
        data.bad_images in BAD_IMAGE_POLICIES,
        "data.bad_images",
        f"must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {data.bad_images!r}",
    )
    _check(
        0 < data.test_fraction < 1,
        "data.test_fraction",
        f"must be in (0, 1), got {data.test_fraction}",
    )
    _check(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _check(
        isinstance(data.cached_views, int) and data.cached_views >= 1,
        "data.cached_views",
        f"must be an integer >= 1 (view 0 is the evaluation view), got {data.cached_views!r}",
    )

    model = config.model
    _check(
        model.backbone in BACKBONES,
        "model.backbone",
        f"unknown backbone {model.backbone!r}; choose from {', '.join(BACKBONES)}",
    )
    stages = tuple(model.stages)
    _check(
        len(stages) > 0
        and all(s in STAGE_NAMES for s in stages)
        and len(set(stages)) == len(stages),
        "model.stages",
        f"must be distinct names from {', '.join(STAGE_NAMES)}, got {stages}",
    )
    _check(model.width > 0, "model.width", f"must be positive, got {model.width}")
    _check(model.node_dim > 0, "model.node_dim", f"must be positive, got {model.node_dim}")
    _check(
        model.gnn_heads > 0 and model.node_dim % model.gnn_heads == 0,
        "model.gnn_heads",
        f"must divide model.node_dim ({model.node_dim}), got {model.gnn_heads}",
    )
    _check(model.gnn_layers >= 0, "model.gnn_layers", f"must be >= 0, got {model.gnn_layers}")
    _check(model.grid_size >= 1, "model.grid_size", f"must be >= 1, got {model.grid_size}")
    _check(
        0 <= model.mask_floor <= 1, "model.mask_floor", f"must be in [0, 1], got {model.mask_floor}"
    )
    _check(
        model.dtype in DTYPES,
        "model.dtype",
        f"must be one of {', '.join(DTYPES)}, got {model.dtype!r}",
    )

    loss = config.loss
    _check(
        loss.use_proxy
        or loss.use_triplet
        or (model.use_classifier and loss.classification_weight > 0),
        "loss",
        "every loss is switched off: enable use_proxy, use_triplet or the classifier",
    )

    train = config.train
    _check(train.batch_size > 0, "train.batch_size", f"must be positive, got {train.batch_size}")
    _check(
        train.batch_size % num_devices == 0,
        "train.batch_size",
        f"{train.batch_size} is not divisible by the {num_devices} devices",
    )
    accum = train.grad_accum_steps
    _check(
        isinstance(accum, int) and accum >= 1,
        "train.grad_accum_steps",
        f"must be a positive integer, got {accum!r}",
    )
    _check(
        train.batch_size % (accum * num_devices) == 0,
        "train.batch_size",
        f"{train.batch_size} is not divisible by train.grad_accum_steps x devices "
        f"= {accum} x {num_devices}",
    )
    _check(
        train.classes_per_batch % accum == 0,
        "train.grad_accum_steps",
        f"must divide train.classes_per_batch ({train.classes_per_batch}) so that each "
        f"micro-batch holds whole classes, got {accum}",
    )
    _check(
        train.classes_per_batch * train.images_per_class == train.batch_size,
        "train.classes_per_batch",
        f"P x Q = {train.classes_per_batch} x {train.images_per_class} = "
        f"{train.classes_per_batch * train.images_per_class} must equal train.batch_size "
        f"({train.batch_size})",
    )
    _check(
        train.images_per_class >= 2 or not loss.use_triplet,
        "train.images_per_class",
        f"the triplet loss needs >= 2 images per class in a batch, got {train.images_per_class}",
    )
    _check(
        train.num_steps > 0 or train.num_epochs > 0,
        "train.num_steps",
        "set train.num_steps > 0 or train.num_epochs > 0",
    )
    _check(
        train.optimizer in OPTIMIZERS,
        "train.optimizer",
        f"must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}",
    )
    _check(
        train.learning_rate > 0,
        "train.learning_rate",
        f"must be positive, got {train.learning_rate}",
    )
    _check(train.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {train.warmup_steps}")
    _check(train.log_every > 0, "train.log_every", f"must be positive, got {train.log_every}")
    _check(
        train.checkpoint_every > 0,
        "train.checkpoint_every",
        f"must be positive, got {train.checkpoint_every}",
    )

    ev = config.eval
    _check(ev.batch_size > 0, "eval.batch_size", f"must be positive, got {ev.batch_size}")
    _check(
        ev.batch_size % num_devices == 0,
        "eval.batch_size",
        f"{ev.batch_size} is not divisible by the {num_devices} devices",
    )
    _check(
        ev.tie_break in TIE_BREAKS,
        "eval.tie_break",
        f"must be one of {', '.join(TIE_BREAKS)}, got {ev.tie_break!r}",
    )
    _check(
        all(k > 0 for k in ev.precision_at_k),
        "eval.precision_at_k",
        f"must be positive, got {tuple(ev.precision_at_k)}",
    )
    _check(
        0.0 <= ev.validation_fraction < 1.0,
        "eval.validation_fraction",
        f"must be in [0, 1), got {ev.validation_fraction}",
    )
    _check(ev.every >= 0, "eval.every", f"must be >= 0, got {ev.every}")
    _check(
        ev.select in SELECTIONS,
        "eval.select",
        f"must be one of {', '.join(SELECTIONS)}, got {ev.select!r}",
    )
    _check(
        ev.select == "last" or ev.validation_fraction > 0,
        "eval.select",
        "'best' needs a validation split: set eval.validation_fraction (e.g. 0.1)",
    )
