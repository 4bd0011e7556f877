"""Sources of non-contrast 3-slice stacks for pretext pretraining (paper section 4.3.1).

`make_sources(config)` returns the train and validation sources that `config.pretrain.source` names; each is
random access (`len()`, `source[i]`) with items `{"pre": int16 (3, H, W) HU}`, H = W = `config.data.image_size`:

  * `records`: the `pre` feature of converted records (`data.dir/<phase>` or `pretrain.records_dir`, splits
    train / validation);
  * `phantom`: the non-contrast volumes of in-memory synthetic cases (`data.phantom`); the last
    `pretrain.validation_cases` cases validate;
  * `dicom`: the non-contrast series of a DICOM folder (`pretrain.dicom_dir`, the role NLST plays in the paper),
    split by study like the phantom;
  * `npy`: int16 HU arrays `(N, 3, H, W)` saved with `np.save` (`pretrain.npy_train`, `pretrain.npy_validation`);
  * `auto`: `records` when `data.dir` is set, else `phantom`.

Stacks are made with the converter's rules (`data_prep.slices`): resize to a square of the model size, the 2.5D
(previous, current, next) triplets with duplicated edges. A source without validation stacks is an error raised
here, before any training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_prep import slices

log = logging.getLogger("data_prep.pretext_sources")

SOURCES = ("auto", "records", "phantom", "dicom", "npy")


class ArraySource:
  """Random-access source over an in-memory int16 HU array `pre_hu: (N, 3, H, W)`."""

  def __init__(self, pre_hu: np.ndarray):
    pre_hu = np.asarray(pre_hu)
    if pre_hu.ndim != 4 or pre_hu.shape[1] != 3:
      raise ValueError(f"expected non-contrast stacks (N, 3, H, W), got shape {pre_hu.shape}")
    self.pre_hu = pre_hu

  def __len__(self) -> int:
    return len(self.pre_hu)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"pre": self.pre_hu[index]}


class RecordsSource:
  """The `pre` stacks of one split of converted records (`data_prep.records.load_split`)."""

  def __init__(self, records_source):
    self.records = records_source

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"pre": np.asarray(self.records[index]["pre"], np.int16)}


def _split_by_case(per_case: Sequence[np.ndarray], n_val: int, what: str) -> tuple[ArraySource, ArraySource]:
  """Train and validation sources from per-case `(S, 3, H, W)` stacks: the last `n_val` cases validate."""
  if not 0 < n_val < len(per_case):
    raise ValueError(f"{what} has {len(per_case)} usable cases; pretrain.validation_cases={n_val} must leave at "
                     "least one for training and one for validation: add cases or change "
                     "--config.pretrain.validation_cases")
  return ArraySource(np.concatenate(per_case[:-n_val])), ArraySource(np.concatenate(per_case[-n_val:]))


def phantom_sources(config) -> tuple[ArraySource, ArraySource]:
  """Train and validation sources from in-memory phantom cases, split by case (the last ones validate)."""
  from data_prep import phantom  # pylint: disable=import-outside-toplevel

  p, size = config.data.phantom, int(config.data.image_size)
  cases, n_val = int(p.cases), int(config.pretrain.validation_cases)
  if not 0 < n_val < cases:
    raise ValueError(f"pretrain.validation_cases={n_val} must be between 1 and data.phantom.cases-1={cases - 1}: "
                     "change --config.pretrain.validation_cases or raise --config.data.phantom.cases")
  # Synthesised directly at the model size, with the pixel spacing the converter's resize would give.
  spacing_mm = slices.resized_spacing_mm(float(p.pixel_spacing), (int(p.size), int(p.size)), size)
  per_case = []
  for index in range(cases):
    case = phantom.synthesize_case(index, int(p.seed), size, int(p.slices), float(p.slice_thickness), spacing_mm)
    per_case.append(slices.triplets(np.asarray(case.hu["non_contrast"], np.int16)))
  return _split_by_case(per_case, n_val, "the phantom (data.phantom.cases)")


def dicom_sources(config) -> tuple[ArraySource, ArraySource]:
  """Train and validation sources from a folder of non-contrast CT series (the paper's NLST role).

  Every CT series under `pretrain.dicom_dir` that the phase rules do not name a contrast phase is read (sorted,
  HU, resized like the converter does), split by study: the last `pretrain.validation_cases` studies validate.
  Series that cannot be read are skipped with their reason in the log.
  """
  from data_prep import dicom_io  # pylint: disable=import-outside-toplevel
  from data_prep import phases  # pylint: disable=import-outside-toplevel

  root, size = config.pretrain.dicom_dir, int(config.data.image_size)
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"pretrain.source='dicom' needs pretrain.dicom_dir, a folder of non-contrast CT "
                            f"series; {root!r} is not a directory")
  studies, skipped = dicom_io.scan(root)
  rules = phases.PhaseRules()
  per_study = []
  for study in studies:
    stacks = []
    for series in study.series:
      if rules.phase_of(series.uid, series.description, series.protocol_name) in phases.CONTRAST_PHASES:
        continue
      try:
        volume = dicom_io.read_volume(dicom_io.check_geometry(series))
      except dicom_io.SeriesRejected as e:
        log.warning("pretext data: skipped a series of %d files: %s", len(series.slices), e)
        continue
      stacks.append(slices.triplets(slices.resize_square(volume.hu, size, False, slices.AIR_HU)))
    if stacks:
      per_study.append(np.concatenate(stacks))
  log.info("pretext data: %d studies with non-contrast series under %s (%d files skipped)", len(per_study), root,
           len(skipped))
  return _split_by_case(per_study, int(config.pretrain.validation_cases), f"pretrain.dicom_dir={root!r}")


def records_sources(config) -> tuple[RecordsSource, RecordsSource]:
  """Train and validation sources over the `pre` stacks of converted records of `config.phase`."""
  from data_prep import records  # pylint: disable=import-outside-toplevel

  from etils import epath  # pylint: disable=import-outside-toplevel

  from data_prep import prepare  # pylint: disable=import-outside-toplevel

  # Local or cloud (gs://) paths, read through etils.epath; the manifest may put the phase elsewhere (tfds build).
  phase_dir = config.pretrain.records_dir or (str(prepare.phase_path(config.data.dir, config.phase))
                                              if config.data.dir else "")
  if not phase_dir or not epath.Path(phase_dir).is_dir():
    raise FileNotFoundError(f"no converted records at {phase_dir!r}: set --config.data.dir (or "
                            "--config.pretrain.records_dir) to the output of `python -m data_prep.convert`")
  return (RecordsSource(records.load_split(phase_dir, "train")),
          RecordsSource(records.load_split(phase_dir, "validation")))


def npy_sources(config) -> tuple[ArraySource, ArraySource]:
  """Train and validation sources over int16 `(N, 3, H, W)` HU arrays saved with `np.save` (memory-mapped)."""
  paths = (config.pretrain.npy_train, config.pretrain.npy_validation)
  for path in paths:
    if not path or not os.path.isfile(path):
      raise FileNotFoundError(f"pretrain.source='npy' needs int16 (N, 3, H, W) files in pretrain.npy_train and "
                              f"pretrain.npy_validation; missing {path!r}")
  return ArraySource(np.load(paths[0], mmap_mode="r")), ArraySource(np.load(paths[1], mmap_mode="r"))


def resolved_source(config) -> str:
  """The source `config.pretrain.source` names, with 'auto' resolved."""
  source = config.pretrain.source
  if source == "auto":
    return "records" if config.data.dir else "phantom"
  return source


_EMPTY_HINTS = {
    "records": "convert more cases, or give the validation split a larger share (`python -m data_prep.convert "
               "--split_fractions=...`), or point --config.pretrain.records_dir at another conversion",
    "phantom": "raise --config.data.phantom.cases or --config.pretrain.validation_cases",
    "dicom": "add studies to pretrain.dicom_dir or raise --config.pretrain.validation_cases",
    "npy": "save validation stacks (N > 0) in --config.pretrain.npy_validation",
}


def make_sources(config) -> tuple[Any, Any]:
  """The train and validation sources that `config.pretrain.source` names.

  Raises:
    ValueError: an unknown source, or a source whose train or validation split holds no stack (the message says
      what to change), so that the error comes before training, not after it.
    FileNotFoundError: a configured folder or file that does not exist.
  """
  source = resolved_source(config)
  makers = {"records": records_sources, "phantom": phantom_sources, "dicom": dicom_sources, "npy": npy_sources}
  if source not in makers:
    raise ValueError(f"pretrain.source={config.pretrain.source!r} is not one of {', '.join(map(repr, SOURCES))}")
  train, validation = makers[source](config)
  for split, s in (("training", train), ("validation", validation)):
    if not len(s):
      raise ValueError(f"the pretext {split} source (pretrain.source={source!r}) holds no non-contrast stacks: "
                       f"{_EMPTY_HINTS[source]}")
  return train, validation
