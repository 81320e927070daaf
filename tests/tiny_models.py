"""A tiny FDH-MFE and random images for tests that need a model running in milliseconds."""

import jax.numpy as jnp
import numpy as np

from fdh_jax.models.fdh import FDHMFE


def tiny_model(freeze_backbone: bool = False, **fields) -> FDHMFE:
    """A model that runs in milliseconds on 32-px images; `fields` set other attributes."""
    return FDHMFE(
        num_classes=5,
        bits=(6, 10),
        backbone="resnet_narrow",
        width=8,
        node_dim=16,
        gnn_heads=2,
        gnn_layers=1,
        freeze_backbone=freeze_backbone,
        **fields,
    )


def random_images(seed: int = 0) -> jnp.ndarray:
    """`[3, 32, 32, 3]` float32 standard-normal images, seeded."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=(3, 32, 32, 3)), jnp.float32)
