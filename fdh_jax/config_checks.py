"""Config validation: every mistake is caught before data loading or compilation.

`validate_config` raises `ConfigError` whose message is one line that starts with the offending
field, e.g. `config.bits: code lengths must be positive integers, got (0, 24)`.

Two tables: `FIELD_RULES` checks each field on its own (every field of `configs/default.py` has
a rule; `tests/test_validation.py` keeps it so), `CROSS_CHECKS` the relations between fields and
the device count.
"""

from collections.abc import Callable

import ml_collections

from fdh_jax.data.sources import SOURCE_MODULES
from fdh_jax.models.backbones import BACKBONES, STAGE_NAMES
from fdh_jax.models.mobilenet import STAGE_BLOCKS

TRAINABLE_AFTER = tuple(STAGE_BLOCKS)  # the MobileNetV2 stages its last layers can train from

OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float32", "bfloat16")
TIE_BREAKS = ("index", "expected", "semicon")
SELECTIONS = ("last", "best")
VALIDATION_BY = ("images", "classes")
BAD_IMAGE_POLICIES = ("error", "skip")
DATASETS = ("synthetic", *sorted(SOURCE_MODULES))


class ConfigError(ValueError):
    """An invalid configuration; `str(error)` names the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config.{field}: {problem}")
        self.field = field


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flag(value) -> bool:
    return isinstance(value, bool)


def _text(value) -> bool:
    return isinstance(value, str)


def _at_least(low) -> Callable:
    return lambda value: _number(value) and value >= low


def _positive(value) -> bool:
    return _number(value) and value > 0


def _positive_integer(value) -> bool:
    return _integer(value) and value > 0


def _between(low, high, *, open_low=False, open_high=False) -> Callable:
    def test(value) -> bool:
        if not _number(value):
            return False
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        return above and below

    return test


def _one_of(choices) -> Callable:
    return lambda value: value in choices


def _distinct(values, test) -> bool:
    values = tuple(values)
    return len(values) > 0 and all(map(test, values)) and len(set(values)) == len(values)


# (field, test, what the field must be): the message is `must be <what>, got <value>`, or the
# text itself when it names the value (`{value!r}`).
FIELD_RULES: tuple[tuple[str, Callable, str], ...] = (
    ("seed", _integer, "an integer"),
    ("bits", lambda v: _distinct(v, _positive_integer), "distinct positive integer code lengths"),
    (
        "data.name",
        _one_of(DATASETS),
        "unknown dataset {value!r}; choose from " + ", ".join(DATASETS),
    ),
    ("data.root", _text, "a path (a string)"),
    ("data.image_size", lambda v: _integer(v) and v >= 32, "an integer >= 32 (pixels)"),
    ("data.eval_resize", _positive_integer, "a positive integer (pixels)"),
    (
        "data.crop_scale",
        lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
        "(lo, hi), 0 < lo <= hi <= 1",
    ),
    ("data.horizontal_flip", _flag, "True or False"),
    ("data.bad_images", _one_of(BAD_IMAGE_POLICIES), f"one of {', '.join(BAD_IMAGE_POLICIES)}"),
    ("data.test_fraction", _between(0, 1, open_low=True, open_high=True), "in (0, 1)"),
    ("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("data.num_threads", _positive_integer, "a positive integer"),
    ("data.prefetch", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("data.feature_cache", _text, "a directory, 'auto' or '' (off)"),
    ("data.cached_views", _positive_integer, "an integer >= 1 (view 0 is the evaluation view)"),
    ("data.synthetic.image_size", lambda v: _integer(v) and v >= 32, "an integer >= 32"),
    ("data.synthetic.num_classes", lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    ("data.synthetic.train_per_class", _positive_integer, "a positive integer"),
    ("data.synthetic.test_per_class", _positive_integer, "a positive integer"),
    ("data.synthetic.class_backgrounds", _flag, "True or False"),
    (
        "model.backbone",
        _one_of(BACKBONES),
        "unknown backbone {value!r}; choose from " + ", ".join(BACKBONES),
    ),
    ("model.width", _positive_integer, "a positive integer"),
    ("model.pretrained", _text, "a weights file path or '' (none)"),
    ("model.freeze_backbone", _flag, "True or False"),
    (
        "model.stages",
        lambda v: _distinct(v, _one_of(STAGE_NAMES)),
        f"distinct names from {', '.join(STAGE_NAMES)}",
    ),
    ("model.use_suppression", _flag, "True or False"),
    ("model.mask_temperature", _positive, "positive"),
    ("model.mask_floor", _between(0, 1), "in [0, 1]"),
    ("model.mask_gradient", _flag, "True or False"),
    ("model.use_gnn", _flag, "True or False"),
    ("model.node_dim", _positive_integer, "a positive integer"),
    ("model.grid_size", _positive_integer, "an integer >= 1"),
    ("model.gnn_layers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("model.gnn_heads", _positive_integer, "a positive integer"),
    ("model.flip_average", _flag, "True or False"),
    ("model.pooled_to_heads", _flag, "True or False"),
    (
        "model.trainable_after",
        _one_of(("", *TRAINABLE_AFTER)),
        f"'' (none) or a MobileNetV2 stage: {', '.join(TRAINABLE_AFTER)}",
    ),
    ("model.use_classifier", _flag, "True or False"),
    ("model.dtype", _one_of(DTYPES), f"one of {', '.join(DTYPES)}"),
    ("loss.use_proxy", _flag, "True or False"),
    ("loss.learnable_proxies", _flag, "True or False"),
    ("loss.proxy_scale", _positive, "positive"),
    ("loss.proxy_margin", _at_least(0), ">= 0"),
    ("loss.uniformity_weight", _at_least(0), ">= 0"),
    ("loss.uniformity_t", _positive, "positive"),
    ("loss.balance_weight", _at_least(0), ">= 0"),
    ("loss.quantization_weight", _at_least(0), ">= 0"),
    ("loss.use_triplet", _flag, "True or False"),
    ("loss.triplet_weight", _at_least(0), ">= 0"),
    ("loss.triplet_margin", _at_least(0), ">= 0"),
    ("loss.classification_weight", _at_least(0), ">= 0"),
    ("loss.label_smoothing", _between(0, 1, open_high=True), "in [0, 1)"),
    ("loss.neighbourhood_weight", _at_least(0), ">= 0"),
    ("loss.neighbourhood_temperature", _positive, "positive"),
    ("loss.neighbourhood_form", _one_of(("kl", "cosine")), "kl or cosine"),
    (
        "loss.neighbourhood_bits",
        lambda v: isinstance(v, (tuple, list)) and (not v or _distinct(v, _positive_integer)),
        "a tuple of distinct code lengths (() for all)",
    ),
    ("loss.neighbourhood_pairs", _one_of(("all", "other_classes")), "all or other_classes"),
    ("loss.instance_weight", _at_least(0), ">= 0"),
    ("loss.instance_temperature", _positive, "positive"),
    ("train.batch_size", _positive_integer, "a positive integer"),
    ("train.classes_per_batch", _positive_integer, "a positive integer"),
    ("train.images_per_class", _positive_integer, "a positive integer"),
    ("train.views_per_image", _one_of((1, 2)), "1 or 2"),
    ("train.grad_accum_steps", _positive_integer, "a positive integer"),
    ("train.num_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: use num_epochs)"),
    ("train.num_epochs", _at_least(0), ">= 0"),
    ("train.optimizer", _one_of(OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}"),
    ("train.learning_rate", _positive, "positive"),
    ("train.backbone_lr_multiplier", _at_least(0), ">= 0"),
    ("train.momentum", _between(0, 1, open_high=True), "in [0, 1)"),
    ("train.weight_decay", _at_least(0), ">= 0"),
    ("train.grad_clip", _at_least(0), ">= 0 (0: no clipping)"),
    ("train.ema_decay", _between(0, 1, open_high=True), "in [0, 1) (0: no moving average)"),
    ("train.warmup_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("train.log_every", _positive_integer, "a positive integer"),
    ("train.checkpoint_every", _positive_integer, "a positive integer"),
    ("train.keep_checkpoints", _positive_integer, "a positive integer"),
    ("eval.batch_size", _positive_integer, "a positive integer"),
    ("eval.tie_break", _one_of(TIE_BREAKS), f"one of {', '.join(TIE_BREAKS)}"),
    ("eval.precision_at_k", lambda v: all(map(_positive_integer, v)), "positive integers"),
    ("eval.validation_fraction", _between(0, 1, open_high=True), "in [0, 1)"),
    ("eval.validation_seed", _integer, "an integer"),
    ("eval.validation_by", _one_of(VALIDATION_BY), f"one of {', '.join(VALIDATION_BY)}"),
    ("eval.every", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: only at the end)"),
    ("eval.select", _one_of(SELECTIONS), f"one of {', '.join(SELECTIONS)}"),
    ("eval.adapt_descriptor_weight", _at_least(0), ">= 0 (0: the pooled features alone)"),
    ("eval.fitted_codes", _flag, "True or False"),
    (
        "eval.fitted_code_weights",
        lambda v: len(v) > 0 and all(map(_positive, v)),
        "one or more weights > 0",
    ),
    ("eval.fitted_code_tolerance", _at_least(0), ">= 0"),
)


def _field(config: ml_collections.ConfigDict, name: str):
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def _satisfies(test: Callable, value) -> bool:
    try:
        return bool(test(value))
    except (TypeError, ValueError):  # e.g. a number where a tuple belongs
        return False


def _model_checks(c: ml_collections.ConfigDict) -> list[tuple[str, bool, str]]:
    """The rows of `_cross_checks` about the model and its code lengths."""
    model, loss = c.model, c.loss
    return [
        (
            "model.gnn_heads",
            model.node_dim % model.gnn_heads == 0,
            f"must divide model.node_dim ({model.node_dim}), got {model.gnn_heads}",
        ),
        (
            "model.trainable_after",
            not model.get("trainable_after", "")
            or (model.backbone == "mobilenet_v2" and model.freeze_backbone),
            "trains the last layers of a frozen MobileNetV2: it needs model.backbone="
            "'mobilenet_v2' and model.freeze_backbone=True",
        ),
        (
            "loss.neighbourhood_bits",
            set(loss.get("neighbourhood_bits", ())) <= set(c.bits),
            f"must be code lengths of bits {tuple(c.bits)} (or () for all)",
        ),
    ]


def _view_checks(c: ml_collections.ConfigDict) -> list[tuple[str, bool, str]]:
    """The rows of `_cross_checks` about photos seen twice per batch (the instance term)."""
    train, loss, data = c.train, c.loss, c.data
    views = train.views_per_image
    cached = c.model.freeze_backbone and bool(data.feature_cache) and data.name != "synthetic"
    return [
        (
            "train.views_per_image",
            train.images_per_class % views == 0,
            f"must divide train.images_per_class ({train.images_per_class}), got {views}",
        ),
        (
            "loss.instance_weight",
            not loss.instance_weight or views == 2,
            "the instance term pairs two views of each photo: it needs "
            "--config.train.views_per_image=2",
        ),
        (
            "train.views_per_image",
            views == 1 or not cached or data.cached_views > 1,
            "two views of a photo come from the feature cache's stored views: "
            f"--config.data.cached_views={data.cached_views} would give both the same crop "
            "(store 2 or more)",
        ),
    ]


def _cross_checks(c: ml_collections.ConfigDict, num_devices: int) -> list[tuple[str, bool, str]]:
    """Relations between fields, and with the device count: `(field, holds, problem)` rows,
    checked in order once every field passed its own rule. Over 60 lines: it is one table
    literal, a row per check."""
    data, model, loss, train, ev = c.data, c.model, c.loss, c.train, c.eval
    accum = train.grad_accum_steps
    pq = train.classes_per_batch * train.images_per_class
    return [
        (
            "data.root",
            data.name == "synthetic" or bool(data.root),
            f"dataset {data.name!r} needs --config.data.root=DIR (where the dataset is on disk)",
        ),
        (
            "data.eval_resize",
            data.eval_resize >= data.image_size,
            f"must be >= data.image_size ({data.image_size}), got {data.eval_resize}",
        ),
        *_model_checks(c),
        *_view_checks(c),
        (
            "loss",
            loss.use_proxy
            or loss.use_triplet
            or (model.use_classifier and loss.classification_weight > 0),
            "every loss is switched off: enable use_proxy, use_triplet or the classifier",
        ),
        (
            "train.batch_size",
            train.batch_size % num_devices == 0,
            f"{train.batch_size} is not divisible by the {num_devices} devices",
        ),
        (
            "train.batch_size",
            train.batch_size % (accum * num_devices) == 0,
            f"{train.batch_size} is not divisible by train.grad_accum_steps x devices "
            f"= {accum} x {num_devices}",
        ),
        (
            "train.grad_accum_steps",
            train.classes_per_batch % accum == 0,
            f"must divide train.classes_per_batch ({train.classes_per_batch}) so that each "
            f"micro-batch holds whole classes, got {accum}",
        ),
        (
            "train.classes_per_batch",
            pq == train.batch_size,
            f"P x Q = {train.classes_per_batch} x {train.images_per_class} = {pq} must equal "
            f"train.batch_size ({train.batch_size})",
        ),
        (
            "train.images_per_class",
            train.images_per_class >= 2 or not loss.use_triplet,
            "the triplet loss needs >= 2 images per class in a batch, got "
            f"{train.images_per_class}",
        ),
        (
            "train.num_steps",
            train.num_steps > 0 or train.num_epochs > 0,
            "set train.num_steps > 0 or train.num_epochs > 0",
        ),
        (
            "eval.batch_size",
            ev.batch_size % num_devices == 0,
            f"{ev.batch_size} is not divisible by the {num_devices} devices",
        ),
        (
            "eval.select",
            ev.select == "last" or ev.validation_fraction > 0,
            "'best' needs a validation split: set eval.validation_fraction (e.g. 0.1)",
        ),
        (
            "eval.fitted_codes",
            not ev.fitted_codes or ev.validation_fraction > 0,
            "the fitted codes' weight is chosen on a validation split: set "
            "eval.validation_fraction (e.g. 0.1)",
        ),
    ]


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises `ConfigError` for the first invalid field of `config` on `num_devices` devices."""
    for name, test, expected in FIELD_RULES:
        value = _field(config, name)
        if not _satisfies(test, value):
            shown = tuple(value) if isinstance(value, list) else value
            problem = (
                f"must be {expected}, got {{value!r}}" if "{value" not in expected else expected
            )
            raise ConfigError(name, problem.format(value=shown))
    for name, holds, problem in _cross_checks(config, num_devices):
        if not holds:
            raise ConfigError(name, problem)
