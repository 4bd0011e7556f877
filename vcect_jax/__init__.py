"""vcect-jax: virtual contrast-enhanced CT of the abdomen and pelvis from non-contrast CT, in JAX/Flax."""

__version__ = "0.1.0"
