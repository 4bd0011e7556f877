"""Training methods of the shared loop, by name (`config.method`; `mode='pretrain'` selects 'pretext').

    method = methods.create(config)   # a `methods.base.Method` bound to the config

To add a method: write `vcect_jax/methods/<name>.py` with a `base.Method` subclass and add it to `REGISTRY`.
"""

from __future__ import annotations

import importlib

from vcect_jax.methods import base

# name -> "module:class"
REGISTRY = {
    "dual_path_gan": "vcect_jax.methods.dual_path_gan:DualPathGAN",
    "pretext": "vcect_jax.methods.pretext:Pretext",
    "pix2pix": "vcect_jax.methods.pix2pix:Pix2Pix",
    "cyclegan": "vcect_jax.methods.cyclegan:CycleGAN",
    "cut": "vcect_jax.methods.cut:CUT",
}


def method_name(config) -> str:
  """The method a config trains: 'pretext' in pretrain mode, else `config.method` ('dual_path_gan' for configs
  written before the field existed)."""
  if config.get("mode") == "pretrain":
    return "pretext"
  return config.get("method", "dual_path_gan") or "dual_path_gan"


def get_class(name: str) -> type[base.Method]:
  if name not in REGISTRY:
    raise ValueError(f"config.method={name!r} is not one of {sorted(REGISTRY)}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def create(config, **kwargs) -> base.Method:
  return get_class(method_name(config))(config, **kwargs)
