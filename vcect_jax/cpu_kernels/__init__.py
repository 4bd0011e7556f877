"""oneDNN convolutions for XLA CPU, through JAX's FFI: an optional, compiled speed-up of the networks on CPU.

XLA's CPU convolutions are level with oneDNN's in the forward pass of wide layers but several times slower in the
kernel gradients (3x3, 32 -> 32 channels at 256 px, batch 2: 35 ms against 8 ms) and in the forward pass of the
large, narrow layers, which dominate the U-Net at full resolution (benchmarks/RESULTS.md, "Performance"). This
package wraps oneDNN's convolution forward, backward-data and backward-weights primitives as three XLA FFI
handlers (`onednn_conv.cc`), for float32 2-D NHWC / HWIO convolutions without dilation or groups. A call splits
its batch over the threads of XLA's own intra-op pool (single-threaded oneDNN on each chunk), so convolutions
share the cores with the rest of the computation; `VCECT_ONEDNN_THREADS=omp` runs each call on oneDNN's OpenMP
threads instead, one call at a time (slower in the training step: benchmarks/RESULTS.md, "Performance", 8).
The same library holds BatchNorm's per-channel sums (`channel_moments`: one vectorised pass where XLA CPU runs a
scalar reduce-window; "Performance", 9).

It is optional. The handlers are compiled once, against the installed jaxlib's FFI headers and the system's
oneDNN 2.x (Debian / Ubuntu: `apt install libdnnl-dev`), with

    python -m vcect_jax.cpu_kernels.build

(`make venv` tries it and says why when it cannot). The library lands in `vcect_jax/cpu_kernels/_build/`, named
by a hash of the source and the jaxlib version, so an upgraded jaxlib or changed source is never served a stale
build. Without it, or with `VCECT_ONEDNN=0`, `available()` is False and the networks run XLA's own convolutions
(`vcect_jax.models.layers.conv` decides per call): the results are the same to float32 rounding
(tests/test_cpu_kernels.py), only slower on CPU. GPU and TPU never use it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
BUILD_DIR = pathlib.Path(__file__).with_name("_build")
OPT_OUT = "VCECT_ONEDNN"
# FFI target name -> symbol exported by onednn_conv.cc
TARGETS = {
    "vcect_conv_forward": "VcectConvForward",
    "vcect_conv_backward_data": "VcectConvBackwardData",
    "vcect_conv_backward_weights": "VcectConvBackwardWeights",
    "vcect_channel_moments": "VcectChannelMoments",
}


def library_path() -> pathlib.Path:
  """Where the build for this source and this jaxlib lives (whether or not it exists)."""
  import jaxlib
  digest = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()).hexdigest()[:12]
  return BUILD_DIR / f"libvcect_onednn_{digest}.so"


@functools.cache
def _load() -> str | None:
  """Loads and registers the handlers once; returns None, or why they are not available."""
  if os.environ.get(OPT_OUT, "1") == "0":
    return f"{OPT_OUT}=0"
  path = library_path()
  if not path.exists():
    return f"not built for this jaxlib (python -m vcect_jax.cpu_kernels.build; needs oneDNN 2.x: libdnnl-dev)"
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, AttributeError) as e:  # e.g. libdnnl.so.2 removed after the build
    return f"{path.name} could not be loaded: {e}"
  logging.info("oneDNN convolutions for CPU loaded from %s", path)
  return None


def available() -> bool:
  """Whether the oneDNN handlers are built, loaded and registered (and not switched off)."""
  return _load() is None


def why_unavailable() -> str | None:
  """None when `available()`, else the reason, for logs."""
  return _load()


def _attrs(strides, pads) -> dict:
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  return dict(stride_h=np.int64(sh), stride_w=np.int64(sw), pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr))


def output_shape(x_shape, w_shape, strides, pads) -> tuple[int, int, int, int]:
  """The NHWC output shape of the convolution of an NHWC `x_shape` with an HWIO `w_shape`."""
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  return n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o


def conv_forward(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
  """y = conv(x, w): x (N, H, W, C) float32, w (KH, KW, C, O), `strides` (sh, sw), `pads` ((top, bottom), (left,
  right)), all non-negative."""
  out = jax.ShapeDtypeStruct(output_shape(x.shape, w.shape, strides, pads), x.dtype)
  return jax.ffi.ffi_call("vcect_conv_forward", out, vmap_method="sequential")(x, w, **_attrs(strides, pads))


def conv_backward_data(dy: jax.Array, w: jax.Array, x_shape, strides, pads) -> jax.Array:
  """The gradient of conv(x, w) with respect to x (of shape `x_shape`), given dy."""
  out = jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype)
  return jax.ffi.ffi_call("vcect_conv_backward_data", out, vmap_method="sequential")(dy, w, **_attrs(strides, pads))


def conv_backward_weights(x: jax.Array, dy: jax.Array, w_shape, strides, pads) -> jax.Array:
  """The gradient of conv(x, w) with respect to w (of shape `w_shape`), given dy."""
  out = jax.ShapeDtypeStruct(tuple(w_shape), x.dtype)
  return jax.ffi.ffi_call("vcect_conv_backward_weights", out, vmap_method="sequential")(x, dy,
                                                                                        **_attrs(strides, pads))


def channel_moments(a: jax.Array, b: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(sum(a), sum(a * (b - shift)))` over all but the last axis of float32 `a` and `b` (same shape `(..., C)`),
  `shift` `(C,)`: BatchNorm's statistics (forward: `a = b = x`, shift 0) and its backward sums (`b = x`, shift the
  batch mean) in one vectorised pass split over XLA's threads, where XLA CPU runs a scalar reduce-window."""
  c = a.shape[-1]
  out = (jax.ShapeDtypeStruct((c,), jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32))
  return tuple(jax.ffi.ffi_call("vcect_channel_moments", out, vmap_method="sequential")(a, b, shift))
