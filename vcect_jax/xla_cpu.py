"""The XLA CPU setting the project's networks run fastest with, applied when `vcect_jax` is imported.

jaxlib 0.10's CPU backend hands convolutions to YNNPACK fusions by default. For these networks' convolutions
(3x3 and 4x4, 3-512 channels, 16-256 px) that path is slower than XLA's own convolutions, most of all in the
kernel gradients: 96 -> 45 ms (32 -> 32 channels at 256 px, batch 2), 55 -> 17 ms (128 -> 128 at 64 px), 592 ->
198 ms (the discriminator's 4x4 / stride-2 64 -> 128 at 256 px, batch 6). With the fusion off the paper-size
training step took 6.1 s instead of 6.8 s on the 2-core CPU (benchmarks/RESULTS.md, "Performance").

`configure()` adds `--xla_cpu_experimental_ynn_fusion_type=` (no convolution or dot goes to YNNPACK) to
`XLA_FLAGS`, unless the variable already sets that flag (yours wins) or `VCECT_XLA_CPU_DEFAULTS=0`. It changes
only the CPU backend's code generation; GPU and TPU ignore it. Like every `XLA_FLAGS` setting it takes effect only
if it is set before JAX starts its backends, which is why `vcect_jax/__init__.py` calls it: import `vcect_jax`
before running any JAX computation (a notebook that ran JAX first keeps XLA's default; results are the same to
float32 rounding, only slower on CPU).
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
OPT_OUT = "VCECT_XLA_CPU_DEFAULTS"
MIN_JAXLIB = (0, 10)   # the flag is known to this jaxlib and later (an unknown XLA flag is a fatal error)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    from jaxlib import version  # a plain module: importing it does not start a backend
  except ImportError:
    return ()
  parts = []
  for piece in version.__version__.split(".")[:2]:
    digits = "".join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def configure(environ=None) -> bool:
  """Adds the flag to `XLA_FLAGS` in `environ` (default `os.environ`); returns whether it did."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT, "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  if _jaxlib_version() < MIN_JAXLIB:
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True
