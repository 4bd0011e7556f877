"""vcect-jax: virtual contrast-enhanced CT of the abdomen and pelvis from non-contrast CT, in JAX/Flax."""

from vcect_jax import xla_cpu as _xla_cpu

_xla_cpu.configure()  # before any JAX backend starts: a faster CPU convolution path (see vcect_jax/xla_cpu.py)

__version__ = "0.1.0"
