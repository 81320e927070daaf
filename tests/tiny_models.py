"""A tiny FDH-MFE and random images for tests that need a model running in milliseconds."""

import jax
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


def moved(variables: dict, seed: int = 2) -> dict:
    """`variables` with every parameter and statistic moved off its initial value (positive
    variances), so that every BatchNorm fold and every layer does something."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        leaf * (1 + 0.3 * jax.random.uniform(k, leaf.shape))
        + 0.05 * jax.random.normal(k, leaf.shape)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    out = jax.tree.unflatten(treedef, leaves)
    out["batch_stats"] = jax.tree.map(jnp.abs, out["batch_stats"])
    return out
