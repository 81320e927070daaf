"""fdh_jax: FDH-MFE fine-grained deep hashing in JAX/Flax."""
