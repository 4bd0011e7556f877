"""The intensity-level classifier of the pretext task (paper section 3.2, fig. 4).

The generator's encoder followed by three fully connected layers; it tells which intensity coefficient alpha
(0.5, 1.0, 1.5 or 2.0 by default) scaled the windowed non-contrast slices. After pretraining, its encoder gives
the perceptual features (`vcect_jax.models.perceptual`) and initialises the generator's encoder.

The deepest block's features are averaged over space before the fully connected layers, so the classifier
accepts any H, W the encoder accepts (the paper does not say how its features were flattened).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax.models.generator import Encoder


class IntensityClassifier(nnx.Module):
  """`logits = C(x)`: `(B, H, W, in_channels)` model-space slices -> `(B, num_classes)` logits.

  Args:
    config: `config.model` (uses `generator.in_channels`, `generator.widths`, `generator.bn_momentum`,
      `classifier.hidden` (the two hidden layer sizes) and `classifier.num_classes`).
    rngs: parameter initialisation.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    gen = config.generator
    self.encoder = Encoder(gen.in_channels, gen.widths, momentum=float(gen.get("bn_momentum", 0.9)), rngs=rngs)
    sizes = (self.encoder.widths[-1], *(int(h) for h in config.classifier.hidden),
             int(config.classifier.num_classes))
    if len(sizes) != 4:
      raise ValueError(f"classifier.hidden must hold two sizes (three FC layers), got {config.classifier.hidden}")
    self.head = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    h = jnp.mean(self.encoder(x, use_running_average)[-1], axis=(1, 2))
    for i, layer in enumerate(self.head):
      h = layer(h)
      if i < len(self.head) - 1:
        h = jax.nn.relu(h)
    return h
