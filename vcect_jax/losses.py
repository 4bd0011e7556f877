"""The paper's objectives (equations 1, 3 and 4).

Discriminator: BCE-with-logits plus least-squares (MSE) terms on the patch logits, real = 1 and virtual = 0.
Generator, per path: adversarial (the same two terms with target 1) + lambda1 * pixel MSE + the sum of the
perceptual terms over the encoder's last four blocks. Dual path: 0.6 * global + 0.4 * local.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def bce_with_logits(logits: jnp.ndarray, target: float) -> jnp.ndarray:
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def least_squares(logits: jnp.ndarray, target: float) -> jnp.ndarray:
  return jnp.mean(jnp.square(logits - target))


def adversarial(logits: jnp.ndarray, target: float) -> jnp.ndarray:
  """BCE-with-logits + MSE of the patch logits against a constant target (paper section 3.1)."""
  return bce_with_logits(logits, target) + least_squares(logits, target)


def pixel_mse(virtual: jnp.ndarray, real: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.square(virtual - real))


def weighted_sum(terms: dict[str, jnp.ndarray], weights: dict[str, float]) -> jnp.ndarray:
  """sum_k weights[k] * terms[k] over the keys of `weights`."""
  return sum(weights[k] * terms[k] for k in weights)
