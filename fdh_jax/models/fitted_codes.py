"""Fitted codes: the last step of the encoder when a run fits its codes (`eval.fitted_codes`).

The hash heads' own codes `sign(h_K)` learn the training classes; a linear hash of the frozen
backbone's pooled C5 knows no class but carries over to new ones. Fitted codes sit between the
two: per code length K, a PCA-ITQ hash of the blend `t_K = [unit(pooled), w * unit(h_K)]`,
fitted once at the end of training on the training images without their labels, with the
weight `w` chosen on the run's validation split (`fdh_jax/training/code_fitting.py`, which also
says how). Every encoder then emits

    code_K = where((t_K - mean) P_K >= 0, +1, -1)                     (int8, as the heads')
           = where(unit(pooled) A_K + unit(h_K) B_K - c_K >= 0, +1, -1)

with `A_K = P_K[:C5]`, `B_K = w P_K[C5:]` and `c_K = mean P_K`: this folded form is what the
variables hold, under the collection `FITTED` of the model's variables (beside `params` and
`batch_stats`, so that checkpoints' fingerprints, exports and every encoder carry it):
`{"12": {"pooled": [C5, 12], "head": [12, 12], "offset": [12]}, ...}`. A length without an
entry keeps the heads' codes.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

FITTED = "fitted_codes"  # the variables' collection that holds the fitted hashes


def split_variables(variables: Mapping) -> tuple[dict, Mapping | None]:
    """`(the model's own variables, the fitted hashes or None)`: Flax's `apply` gets the first."""
    model_variables = {name: value for name, value in variables.items() if name != FITTED}
    return model_variables, variables.get(FITTED)


def folded_hash(mean: np.ndarray, projection: np.ndarray, weight: float, pooled_dim: int) -> dict:
    """The folded form (module docstring) of the linear hash `x -> (x - mean) @ projection` of
    the blend `x = [unit(pooled), weight * unit(h)]`, as float32 arrays."""
    mean, projection = np.asarray(mean, np.float64), np.asarray(projection, np.float64)
    if mean.shape[0] != projection.shape[0] or projection.shape[0] <= pooled_dim:
        raise ValueError(
            f"a hash of {projection.shape[0]}-dimensional features is no blend of "
            f"{pooled_dim} pooled channels and a code"
        )
    return {
        "pooled": projection[:pooled_dim].astype(np.float32),
        "head": (weight * projection[pooled_dim:]).astype(np.float32),
        "offset": (mean @ projection).astype(np.float32),
    }


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fitted_code(fitted: Mapping, pooled: jax.Array, head: jax.Array) -> jax.Array:
    """`[B, K]` int8 codes in {-1, +1} of one length's folded hash (0 maps to +1)."""
    dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    projected = dot(_unit(pooled), fitted["pooled"]) + dot(_unit(head), fitted["head"])
    return jnp.where(projected - fitted["offset"] >= 0, 1, -1).astype(jnp.int8)
