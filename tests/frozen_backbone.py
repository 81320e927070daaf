"""A frozen narrow backbone over the folder dataset with its feature cache, and helpers to read
the cache, shared by the feature-cache and flip-averaging tests."""

from pathlib import Path

import jax
import jax.numpy as jnp
from conftest import load_config, shrink

from fdh_jax import parallel
from fdh_jax.data import load_splits
from fdh_jax.models.backbones import get_backbone
from fdh_jax.training import feature_cache

VIEWS = 3


def frozen_config(root: Path, cache: Path, steps: int = 4):
    config = load_config("folder")
    config.data.root = str(root)
    config.data.image_size = config.data.eval_resize = 32
    config.data.feature_cache = str(cache)
    config.data.cached_views = VIEWS
    config.model.backbone = "resnet_narrow"
    config.model.pretrained = ""  # folder.py's default is ImageNet ResNet-50
    config.model.width = 8
    config.model.freeze_backbone = True
    shrink(config, steps)
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-2
    return config


def backbone_variables(config, seed: int = 0) -> dict:
    backbone = get_backbone(config.model.backbone, width=config.model.width)
    return jax.jit(lambda: backbone.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3))))()


def cached(config, cache: Path, variables: dict, split: str = "train", views: int = VIEWS):
    source = load_splits(config, (split,))[split]
    return feature_cache.cached_stage_maps(
        config, source, variables, parallel.make_mesh(), views, cache
    )


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "stage_maps").iterdir() if not p.name.startswith("."))
