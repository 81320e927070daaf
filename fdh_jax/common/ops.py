"""Small array functions that the model and the losses share (one definition each)."""

import jax
import jax.numpy as jnp


def l2_normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """`x / sqrt(sum(x^2) + eps)` along the last axis, computed in float32, returned in x's dtype.

    The hash heads read the unit descriptor (`eps` 1e-12, see `fdh_jax.models.fdh`); the proxy
    and triplet losses compare unit codes (`eps` 1e-8).
    """
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
