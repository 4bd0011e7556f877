"""The networks: generator, conditional discriminator, pretext intensity classifier and perceptual features.

    G = models.Generator(config.model.generator, rngs=nnx.Rngs(0))         # (B,H,W,3) -> (B,H,W,1)
    D = models.Discriminator(config.model.discriminator, rngs=nnx.Rngs(1))  # D(x, y) -> (B,H/8,W/8,1) logits
    C = models.IntensityClassifier(config.model, rngs=nnx.Rngs(2))         # (B,H,W,3) -> (B,4); C.encoder
    loss, per_block = models.perceptual.perceptual_loss(encoder, virtual, real, weights)
"""

from vcect_jax.models import perceptual
from vcect_jax.models.classifier import IntensityClassifier
from vcect_jax.models.discriminator import Discriminator
from vcect_jax.models.generator import Encoder
from vcect_jax.models.generator import Generator

__all__ = ["Discriminator", "Encoder", "Generator", "IntensityClassifier", "perceptual"]
