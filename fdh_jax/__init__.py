"""fdh_jax: FDH-MFE fine-grained deep hashing in JAX/Flax, as a functional library.

    import fdh_jax
    model = fdh_jax.build_model(config, num_classes)         # a Flax Linen module
    variables = fdh_jax.init_variables(model, seed=0, image_size=224)
    outputs = model.apply(variables, images)                   # continuous codes, logits, ...
    codes = fdh_jax.encode(model, variables, images)           # {"48": int8 [B, 48] in {-1, +1}}
    fdh_jax.mean_average_precision(query_codes, db_codes, query_labels, db_labels)
    fdh_jax.train_and_evaluate(config, workdir)

Re-exports only; each name lives in the module named for what it is.
"""

from fdh_jax.config_files import load_config
from fdh_jax.data import load_split, make_source
from fdh_jax.evaluate import encode
from fdh_jax.metrics import mean_average_precision
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import FDHMFE, binarize, build_model, init_variables
from fdh_jax.train import evaluate_checkpoint, train_and_evaluate

__all__ = [
    "FDHMFE",
    "binarize",
    "build_model",
    "encode",
    "evaluate_checkpoint",
    "get_backbone",
    "init_variables",
    "load_config",
    "load_split",
    "make_source",
    "mean_average_precision",
    "train_and_evaluate",
]
