"""The embedded default: with no data configured, train on the synthetic phantom, with a pretext encoder.

`ensure_dataset` generates the phantom's DICOM studies and converts them under `workdir/data` once; later runs
in the same work directory reuse them while the phantom settings are unchanged. `ensure_pretext_checkpoint`
returns the configured pretext checkpoint, or pretrains one under `workdir/pretrain` when none is configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from absl import logging

from data_prep import phases


def _settings(config) -> dict:
  return {"phantom": config.data.phantom.to_dict(), "image_size": int(config.data.image_size)}


def ensure_dataset(config, workdir: str) -> str:
  """`config.data.dir` if set, else the converted phantom dataset under `workdir/data` (made once)."""
  if config.data.dir:
    if not os.path.isdir(config.data.dir):
      raise FileNotFoundError(f"config.data.dir={config.data.dir!r} does not exist: give the --output folder of "
                              "`python -m data_prep.convert`, or leave it empty for the embedded phantom")
    return config.data.dir
  root = os.path.join(workdir, "data")
  converted = os.path.join(root, "converted")
  stamp = os.path.join(root, "settings.json")
  settings = _settings(config)
  if os.path.exists(stamp) and os.path.exists(os.path.join(converted, "manifest.json")):
    with open(stamp) as f:
      if json.load(f) == settings:
        logging.info("Reusing the phantom dataset in %s", converted)
        return _checked(converted, config)
  from data_prep import convert  # pylint: disable=g-import-not-at-top
  from data_prep import phantom  # pylint: disable=g-import-not-at-top

  p = config.data.phantom
  dicom_dir = os.path.join(root, "dicom")
  for d in (dicom_dir, converted):
    shutil.rmtree(d, ignore_errors=True)
  if os.path.exists(stamp):
    os.remove(stamp)
  logging.info("No data.dir: generating %d phantom cases in %s", p.cases, dicom_dir)
  phantom.generate(dicom_dir, cases=p.cases, seed=p.seed, size=p.size, slices=p.slices,
                   slice_thickness=p.slice_thickness, pixel_spacing=p.pixel_spacing, preview=True)
  logging.info("Converting the phantom to records in %s", converted)
  # The phantom's pseudonymisation key is fixed by its seed, so that its case ids and splits are reproducible.
  key_file = os.path.join(root, "phantom.hmac_key")
  with open(key_file, "wb") as f:
    f.write(hashlib.sha256(f"vcect-phantom-{p.seed}".encode()).digest())
  convert.run(convert.Settings(input=dicom_dir, output=converted, phases=phases.CONTRAST_PHASES,
                                          image_size=int(config.data.image_size), key_file=key_file,
                                          split_fractions=tuple(config.data.phantom.split_fractions),
                                          split_method="rank"))
  with open(stamp, "w") as f:
    json.dump(settings, f)
  return _checked(converted, config)


def _checked(converted: str, config) -> str:
  """The phantom dataset, if the configured phase has training and validation examples."""
  with open(os.path.join(converted, "manifest.json")) as f:
    splits = json.load(f)["phases"][config.phase]["splits"]
  empty = [s for s in ("train", "validation") if not splits[s]["examples"]]
  if empty:
    raise ValueError(f"the phantom's {config.phase} records have no {' or '.join(empty)} examples "
                     f"({config.data.phantom.cases} cases): raise --config.data.phantom.cases")
  return converted


def ensure_pretext_checkpoint(config, workdir: str) -> str:
  """The pretext checkpoint path: the configured one (which must exist) or one pretrained here once."""
  path = config.perceptual.pretext_checkpoint
  if path:
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"perceptual.pretext_checkpoint={path!r} does not exist: run `python -m vcect_jax.main "
          "--config=configs/pretrain.py` first and pass its <workdir>/pretext, or leave the field empty to "
          "pretrain one automatically")
    return path
  from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

  pretrain_workdir = os.path.join(workdir, "pretrain")
  path = os.path.join(pretrain_workdir, "pretext")
  if os.path.isdir(path):
    try:
      pretrain.read_description(path)
      logging.info("Reusing the pretext checkpoint in %s", path)
      return path
    except (FileNotFoundError, ValueError) as e:  # an interrupted pretraining: start it again
      logging.warning("Discarding the unusable pretext checkpoint in %s: %s", path, e)
      shutil.rmtree(path)
  logging.info("No perceptual.pretext_checkpoint: pretraining the intensity classifier in %s", pretrain_workdir)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mode = "pretrain"
    cfg.data.dir = ensure_dataset(config, workdir)
  pretrain.pretrain(cfg, pretrain_workdir)
  return path
