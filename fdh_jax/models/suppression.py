"""Background suppression: a soft foreground mask from the deepest stage's activations.

`A = sum_c relu(C5)` is standardised per image and squashed, `M = sigmoid(tau * (A - mean) / std)`,
so the mask needs no parameters and no box labels (in the spirit of SCDA and FISH, but soft and
differentiable). Stages are suppressed as `F * (floor + (1 - floor) * M)`: background is damped
to `floor`, not erased. The complement `1 - M` marks the background that the triplet loss uses as
an extra negative.
"""

import jax
import jax.numpy as jnp


def background_mask(
    deepest_stage: jnp.ndarray,
    *,
    temperature: float = 4.0,
    gradient: bool = False,
    eps: float = 1e-5,
) -> jnp.ndarray:
    """Soft foreground mask of each image.

    Args:
      deepest_stage: `[B, H, W, C]` stage map (C5).
      temperature: tau; larger makes the mask closer to binary.
      gradient: if False the mask is a constant for backpropagation (`stop_gradient`).
      eps: guards the standardisation of a constant activation map.

    Returns:
      `[B, H, W, 1]` float32 in (0, 1): close to 1 on the object, close to 0 on background.
    """
    activation = jnp.sum(jax.nn.relu(deepest_stage.astype(jnp.float32)), axis=-1, keepdims=True)
    mean = jnp.mean(activation, axis=(1, 2, 3), keepdims=True)
    std = jnp.std(activation, axis=(1, 2, 3), keepdims=True)
    mask = jax.nn.sigmoid(temperature * (activation - mean) / (std + eps))
    return mask if gradient else jax.lax.stop_gradient(mask)


def resize_mask(mask: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """Bilinearly resizes a `[B, h, w, 1]` mask to `[B, height, width, 1]`."""
    if mask.shape[1:3] == (height, width):
        return mask
    return jax.image.resize(mask, (mask.shape[0], height, width, 1), method="bilinear")


def suppressed(plain: jnp.ndarray, weighted: jnp.ndarray, floor: float) -> jnp.ndarray:
    """`floor * F + (1 - floor) * F M` from `F` (plain) and `F M` (weighted), which is
    `F * (floor + (1 - floor) * M)`. Linear in `F`, so it holds for pooled sums too: the model
    applies it to region sums (`fdh_jax.models.mfe.stage_nodes`), `suppress` to whole maps."""
    return floor * plain + (1 - floor) * weighted


def suppressed_background(plain: jnp.ndarray, weighted: jnp.ndarray, floor: float) -> jnp.ndarray:
    """The same with the complementary mask `1 - M`: `F * (floor + (1 - floor) * (1 - M))`,
    which is `F - (1 - floor) * F M`."""
    return plain - (1 - floor) * weighted


def suppress(
    features: jnp.ndarray, mask: jnp.ndarray, floor: float, background: bool = False
) -> jnp.ndarray:
    """`F * (floor + (1 - floor) * M)` (or with `1 - M` for `background`), `M` resized to the
    map; `features: [B, H, W, C]`."""
    mask = resize_mask(mask, features.shape[1], features.shape[2]).astype(features.dtype)
    combine = suppressed_background if background else suppressed
    return combine(features, features * mask, floor)
