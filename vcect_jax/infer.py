"""Inference: a non-contrast CT series in, virtual contrast-enhanced series out (DICOM, NIfTI, preview).

    python -m vcect_jax.infer --checkpoint=workdir/arterial --input=/data/study_dir --output=/data/virtual

or, from a notebook, the same steps as functions:

    series = infer.read_input("/data/study_dir")                  # InputSeries: HU (S, H, W), geometry
    predictor = infer.Predictor.from_checkpoint("workdir/arterial")
    virtual_hu = infer.predict_volume(predictor, series.hu)         # (S, H, W) int16
    infer.write_series("/data/virtual", series, {"arterial": (predictor, virtual_hu)}, fmt="both")

Pipeline
  * Input: a DICOM series folder (any file order, any transfer syntax `data_prep.dicom_io` decodes), a study
    folder (the non-contrast series is found with `data_prep.phases`' rules, or named with `--series_uid`), one
    DICOM file, or a NIfTI file. Reading, sorting, HU conversion and geometry checks are `data_prep.dicom_io`'s.
  * Model: window, normalisation, resize and the 2.5D triplets come from the checkpoint's stored config through
    `vcect_jax.hu` and `data_prep.slices` (the same code as conversion and training); batched, one compile per
    shape; only the generator is restored.
  * Back to HU at the original matrix (`slices.unresize_square`, bilinear), then the HU rule below.

The HU rule (why: the model was trained on windowed images, so it knows nothing outside the window)
  The generator's output is clipped to the trained range [-1, 1] (the window, W400/L30 = HU -170..230 by
  default) and mapped back to HU. Each output pixel is then a blend of the virtual and the input value, chosen by
  the *input* HU ``x``, with ``low``/``high`` the window edges and ``m = hu.BLEND_FRACTION * width`` (40 HU):

      w(x) = smoothstep((x - low) / m) * smoothstep((high - x) / m) * smoothstep((150 - x) / 40),
      smoothstep(t) = 3t^2 - 2t^3 on [0, 1],     out = w * virtual + (1 - w) * input

  so that input pixels outside the window (air, lung, metal, pixel padding) and non-contrast pixels of 150 HU or
  more (bone, dense calcium, oral contrast: `hu.BONE_HU`, whatever the window) are kept exactly (w = 0), pixels more
  than ``m`` inside the window and below 110 HU are fully virtual (w = 1), and the transitions are smooth.
  Enhancement is bounded by the window's upper edge: a virtual vessel is at most ``high`` HU.

Bad input (a dedicated `InferenceError` with a message; the command prints it and exits with status 2):
  no DICOM or no CT under the input; several candidate series and no `--series_uid` (the series are listed);
  a series that fails the geometry checks; a checkpoint that is missing, of another phase than asked, or whose
  config this pipeline cannot feed; an output folder that exists (replaced only with `--overwrite`).
Documented handling instead of an error:
  * missing slices (gaps in the positions): a warning; each missing position takes the nearest existing slice
    (the cranial one on a tie), so the neighbours of a slice next to a gap fall back to it. DICOM output has one
    file per input file; the NIfTI output is the regular grid with the filled positions.
  * unreadable or truncated files: skipped with a warning when the rest still forms a series.
  * one or two slices: the triplet repeats the edge slice (`slices.triplets`).

Output (written to a hidden temporary folder beside ``--output`` and renamed when complete, so an interrupted run
leaves no folder that looks complete): ``<phase>/VIRT0001.dcm ...`` per phase (DICOM input), ``<phase>.nii.gz``
(and ``non_contrast.nii.gz`` for a DICOM input) with ``--format=nifti|both``, ``preview.png`` with
``--preview``, and ``summary.json`` (what was written, from which checkpoint; no patient identifiers).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from data_prep import cli_help
from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import slices
from vcect_jax import hu as hu_lib
from vcect_jax import series_out

AIR_HU = -1024  # fill of the square padding before resizing (as the converter) and of padded pixels
FORMATS = ("dicom", "nifti", "both")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NOT_DICOM = "not a DICOM file"  # dicom_io's reason for a file that is not DICOM at all


class InferenceError(Exception):
  """Input, checkpoint or output that inference cannot use; the message says what to fix."""


def _warn(warnings: list[str], message: str) -> None:
  warnings.append(message)
  from absl import logging  # local: keep the module importable without absl's flags being parsed

  logging.warning("%s", message)


# ---------------------------------------------------------------- input


@dataclasses.dataclass
class InputSeries:
  """A non-contrast series on a regular grid of slices, slice 0 the most cranial.

  Attributes:
    hu: ``(S, H, W)`` int16 HU; a position with no source slice holds its nearest existing slice.
    present: ``(S,)`` bool, True where a source slice exists (always True for NIfTI).
    pixel_spacing_mm: (between rows, between columns).
    slice_spacing_mm: between neighbouring grid positions.
    sources: the DICOM file of each present slice, in grid order (None for NIfTI input).
    positions_mm: ``(S, 3)`` ImagePositionPatient of every grid position (None for NIfTI input).
    orientation: ImageOrientationPatient (None for NIfTI input).
    nifti_reference: for NIfTI input, the input image reoriented to LPS (its geometry, for the output).
    nifti_orientation: for NIfTI input, the input's orientation code (e.g. 'RAS'), restored on output.
    description: SeriesDescription (or the file name).
    series_uid: SeriesInstanceUID (None for NIfTI input).
    warnings: what was skipped or filled in.
  """

  hu: np.ndarray
  present: np.ndarray
  pixel_spacing_mm: tuple[float, float]
  slice_spacing_mm: float
  sources: list[pathlib.Path] | None = None
  positions_mm: np.ndarray | None = None
  orientation: tuple[float, ...] | None = None
  nifti_reference: sitk.Image | None = None
  nifti_orientation: str | None = None
  description: str = ""
  series_uid: str | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def is_dicom(self) -> bool:
    return self.sources is not None


def read_input(path: str | os.PathLike, series_uid: str | None = None,
               rules: phases_lib.PhaseRules | None = None) -> InputSeries:
  """Reads the non-contrast series to predict from.

  Args:
    path: a DICOM series or study folder, one DICOM file, or a ``.nii``/``.nii.gz`` file.
    series_uid: the series to use when the folder holds several.
    rules: phase rules that find the non-contrast series (the converter's defaults when None).

  Raises:
    InferenceError: nothing usable at ``path``, or an ambiguous choice of series.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise InferenceError(f"input {path} does not exist")
  if path.is_file() and str(path).lower().endswith(NIFTI_SUFFIXES):
    return _read_nifti(path)
  warnings: list[str] = []
  if path.is_file():
    try:
      header = dicom_io.read_header(path)
    except dicom_io.SeriesRejected as e:
      raise InferenceError(f"input {path}: {e}") from None
    if header.modality != dicom_io.CT_MODALITY:
      raise InferenceError(f"input {path}: modality {header.modality or 'missing'} is not CT")
    candidates = [dicom_io.Series(header.series_uid, header.study_uid, [header])]
  else:
    studies, skipped = dicom_io.scan(path)
    candidates = [s for study in studies for s in study.series]
    if not candidates:
      raise InferenceError(f"no CT DICOM series under {path}" + (f": {_skip_summary(skipped)}" if skipped else
                                                                 " (the folder holds no files)"))
    # Files that are not DICOM at all (labels, notes) are expected in a study folder; the rest deserve a warning.
    dicom_skipped = [s for s in skipped if s.reason != NOT_DICOM]
    if dicom_skipped:
      _warn(warnings, f"{len(dicom_skipped)} DICOM file(s) under {path} skipped: {_skip_summary(dicom_skipped)}")
  series = _choose_series(candidates, series_uid, rules or phases_lib.PhaseRules(), path)
  return _read_dicom_series(series, warnings)


def _skip_summary(skipped: Sequence[dicom_io.Skipped]) -> str:
  counts = collections.Counter(s.reason for s in skipped)
  return "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(5))


def _choose_series(candidates: list[dicom_io.Series], series_uid: str | None, rules: phases_lib.PhaseRules,
                   root: pathlib.Path) -> dicom_io.Series:
  if series_uid:
    chosen = [s for s in candidates if s.uid == series_uid]
    if not chosen:
      raise InferenceError(f"no series with SeriesInstanceUID {series_uid} under {root}; found:\n"
                           + _list_series(candidates, rules))
    return chosen[0]
  phase = {id(s): rules.phase_of(s.uid, s.description, s.protocol_name) for s in candidates}
  if len(candidates) == 1:
    only = candidates[0]
    if phase[id(only)] in phases_lib.CONTRAST_PHASES + (phases_lib.IGNORE,):
      raise InferenceError(f"the only CT series under {root} looks like {phase[id(only)]!r}, not non-contrast; "
                           f"pass --series_uid to use it anyway:\n" + _list_series(candidates, rules))
    return only
  non_contrast = [s for s in candidates if phase[id(s)] == phases_lib.NON_CONTRAST]
  if len(non_contrast) == 1:
    return non_contrast[0]
  why = "no series is" if not non_contrast else f"{len(non_contrast)} series are"
  raise InferenceError(f"{len(candidates)} CT series under {root} and {why} recognised as non-contrast; choose one "
                       f"with --series_uid=UID:\n" + _list_series(candidates, rules))


def _list_series(candidates: list[dicom_io.Series], rules: phases_lib.PhaseRules) -> str:
  lines = []
  for s in candidates:
    phase = rules.phase_of(s.uid, s.description, s.protocol_name) or "unknown"
    lines.append(f"  {s.uid}  {len(s.slices):4d} slices  phase={phase:<12s} {s.description or '(no description)'!r}")
  return "\n".join(lines)


def _regular_geometry(series: dicom_io.Series, warnings: list[str]) -> tuple[dicom_io.Geometry, np.ndarray]:
  """`dicom_io.check_geometry` on the series completed to a regular stack of at least MIN_SLICES positions.

  Missing positions (gaps of whole slice steps) and, for one- or two-slice series, positions past the last
  slice are filled with placeholder headers, so that every check of the converter applies unchanged; the
  placeholders are never read.

  Returns:
    The geometry of the regular grid (placeholders past the last real slice dropped) and the grid mask of the
    positions that hold a real slice.
  """
  real = list(series.slices)
  fillers: list[dicom_io.SliceHeader] = []
  if all(s.ipp is not None and s.iop is not None for s in real):
    normal = dicom_io.slice_normal(real[0].iop)
    order = sorted(real, key=lambda s: -float(np.dot(s.ipp, normal)))
    z = np.array([float(np.dot(s.ipp, normal)) for s in order])
    steps = -np.diff(z)
    positive = steps[steps > 0.01]
    # The slice step: the typical one among the smallest (a median of all would count gaps when many are missing).
    step = (float(np.median(positive[positive < 1.5 * positive.min()])) if len(positive)
            else float(real[0].slice_thickness or 1.0))
    missing = 0
    for i, gap in enumerate(steps):
      count = int(round(gap / step)) - 1
      if gap > 1.5 * step and count > 0:
        missing += count
        for m in range(1, count + 1):
          ipp = np.asarray(order[i].ipp) - m * step * normal
          fillers.append(dataclasses.replace(order[i], ipp=tuple(float(v) for v in ipp)))
    if missing:
      _warn(warnings, f"missing slices: {missing} position(s) of the {step:.2f} mm grid have no file; each takes "
                      "its nearest existing slice")
    for m in range(1, max(0, dicom_io.MIN_SLICES - len(real) - len(fillers)) + 1):
      ipp = np.asarray(order[-1].ipp) - m * step * normal
      fillers.append(dataclasses.replace(order[-1], ipp=tuple(float(v) for v in ipp)))
    if len(real) < dicom_io.MIN_SLICES:
      _warn(warnings, f"{len(real)} slice(s) only: the neighbours of the edge slices repeat them")
  try:
    geometry = dicom_io.check_geometry(dicom_io.Series(series.uid, series.study_uid, real + fillers))
  except dicom_io.SeriesRejected as e:
    raise InferenceError(f"series {series.description or series.uid!r} cannot be used: {e}") from None
  real_ids = {id(s) for s in real}
  present = np.array([id(s) in real_ids for s in geometry.slices])
  last = int(np.flatnonzero(present)[-1]) + 1
  geometry = dataclasses.replace(geometry, slices=geometry.slices[:last], table_z_mm=geometry.table_z_mm[:last])
  return geometry, present[:last]


def _read_dicom_series(series: dicom_io.Series, warnings: list[str]) -> InputSeries:
  geometry, present = _regular_geometry(series, warnings)
  real = dataclasses.replace(geometry, slices=[s for s, p in zip(geometry.slices, present) if p],
                             table_z_mm=geometry.table_z_mm[present])
  try:
    volume = dicom_io.read_volume(real, padding_hu=AIR_HU)
  except dicom_io.SeriesRejected as e:
    raise InferenceError(f"series {series.description or series.uid!r} cannot be read: {e}") from None
  index = np.flatnonzero(present)
  # Nearest existing slice of every grid position; a tie goes to the cranial (lower) one.
  after = np.clip(np.searchsorted(index, np.arange(len(present))), 0, len(index) - 1)
  before = np.clip(after - 1, 0, len(index) - 1)
  grid = np.arange(len(present))
  nearest = np.where(np.abs(index[before] - grid) <= np.abs(index[after] - grid), before, after)
  # A one-slice series has no spacing of its own: the slice thickness stands in for it.
  spacing = (geometry.slice_spacing_mm if len(real.slices) > 1
             else float(real.slices[0].slice_thickness or geometry.slice_spacing_mm))
  positions = np.array([s.ipp for s in geometry.slices], float)
  return InputSeries(
      hu=volume.hu[nearest], present=present, pixel_spacing_mm=geometry.pixel_spacing_mm,
      slice_spacing_mm=spacing, sources=[s.path for s in real.slices], positions_mm=positions,
      orientation=tuple(real.slices[0].iop), description=series.description, series_uid=series.uid,
      warnings=warnings)


def _read_nifti(path: pathlib.Path) -> InputSeries:
  warnings: list[str] = []
  try:
    image = sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise InferenceError(f"input {path} is not a readable NIfTI file ({str(e).strip().splitlines()[-1]})") from None
  if image.GetDimension() == 4 and image.GetSize()[3] == 1:
    image = image[:, :, :, 0]
  if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
    raise InferenceError(f"input {path} is not a 3D single-channel volume (size {image.GetSize()})")
  orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
  lps = sitk.DICOMOrient(image, "LPS")  # index x -> patient left, y -> posterior, z -> superior
  values = sitk.GetArrayFromImage(lps)[::-1]  # (S, H, W), slice 0 the most cranial, rows anterior -> posterior
  hu = np.clip(np.rint(values), -32768, 32767).astype(np.int16)
  if np.percentile(hu, 1) > -200:
    _warn(warnings, f"{path.name}: no air-like values (1st percentile {np.percentile(hu, 1):.0f}); is it CT in HU?")
  sx, sy, sz = lps.GetSpacing()
  return InputSeries(hu=hu, present=np.ones(len(hu), bool), pixel_spacing_mm=(float(sy), float(sx)),
                     slice_spacing_mm=float(sz), nifti_reference=lps, nifti_orientation=orientation,
                     description=path.name, warnings=warnings)


# ---------------------------------------------------------------- model


class Predictor:
  """A generator with the settings of its checkpoint's config, jitted once per batch shape.

  Args:
    generator: an nnx module mapping ``(B, size, size, 3)`` model space to ``(B, size, size, 1)``; it is put in
      eval mode.
    config: the config stored with the checkpoint (``phase``, ``method``, ``data.image_size``,
      ``data.window``, ``model.generator``); the only source of these settings.
    step: the checkpoint's step (for the derivation description).
    path: where the checkpoint is.

  Raises:
    InferenceError: a config this pipeline cannot feed.
  """

  def __init__(self, generator, config, step: int | None = None, path: str = ""):
    import jax
    from flax import nnx

    where = f"checkpoint {path}" if path else "the model's config"
    try:
      self.phase = str(config.phase)
      self.method = str(config.get("method", "dual_path_gan"))
      self.image_size = int(config.data.image_size)
      self.window = hu_lib.Window.from_config(config.data.window)
      in_channels = int(config.model.generator.in_channels)
      widths = tuple(config.model.generator.widths) if "widths" in config.model.generator else ()
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise InferenceError(f"{where}: its config lacks a field inference needs ({type(e).__name__}: {e})") from None
    if self.phase not in phases_lib.CONTRAST_PHASES:
      raise InferenceError(f"{where}: config phase {self.phase!r} is not one of {phases_lib.CONTRAST_PHASES}")
    if in_channels != 3:
      raise InferenceError(f"{where}: the generator takes {in_channels} input channel(s); inference feeds "
                           "(previous, current, next) slice triplets, 3 channels")
    if widths and self.image_size % 2 ** (len(widths) - 1):
      raise InferenceError(f"{where}: image_size {self.image_size} is not a multiple of {2 ** (len(widths) - 1)}, "
                           "which the generator's encoder needs")
    self.config, self.step, self.path = config, step, str(path)
    generator.eval()
    graphdef, state = nnx.split(generator)
    self._state = state

    @jax.jit
    def forward(state, x):
      return jax.numpy.clip(nnx.merge(graphdef, state)(x), -1.0, 1.0)

    self._forward = forward

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike) -> "Predictor":
    """Restores only the generator of a training run (workdir, its checkpoints/ folder, or a step folder)."""
    from vcect_jax import checkpoint

    load = getattr(checkpoint, "load_generator", None)
    if load is None:
      raise InferenceError("this version of vcect_jax.checkpoint has no load_generator(path)")
    if not os.path.exists(path):
      raise InferenceError(f"checkpoint {path} does not exist")
    try:
      loaded = load(str(path))
    except FileNotFoundError as e:
      raise InferenceError(f"no checkpoint at {path} ({e})") from None
    except (ValueError, KeyError, TypeError) as e:
      raise InferenceError(f"checkpoint {path} does not match the model its config describes "
                           f"(incompatible or corrupt checkpoint): {str(e)[:600]}") from None
    return cls(loaded.generator, loaded.config, step=getattr(loaded, "step", None),
               path=str(getattr(loaded, "path", path)))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    """``(B, size, size, 3)`` model space -> ``(B, size, size)`` model space, clipped to [-1, 1]."""
    return self._forward(self._state, x)[..., 0]


def predict_volume(predictor: Predictor, pre_hu: np.ndarray, batch_size: int = 8,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Virtual contrast HU of a non-contrast volume.

  Args:
    predictor: the generator and its checkpoint's settings.
    pre_hu: ``(S, H, W)`` HU, neighbouring slices adjacent (any matrix; it is padded square and resized).
    batch_size: slices per generator call (the last batch is padded, so one compile serves the volume).
    progress: called with the number of slices done after each batch.

  Returns:
    ``(S, H, W)`` int16 HU: the virtual image inside the window, the input outside it (module docstring).
  """
  pre_hu = np.asarray(pre_hu)
  if pre_hu.ndim != 3 or not len(pre_hu):
    raise InferenceError(f"expected a (slices, H, W) volume, got shape {pre_hu.shape}")
  count, h, w = pre_hu.shape
  size, window = predictor.image_size, predictor.window
  small = slices.resize_square(pre_hu, size, nearest=False, fill=AIR_HU)
  x = np.asarray(hu_lib.hu_to_model(small, window), np.float32)
  inputs = np.ascontiguousarray(slices.triplets(x).transpose(0, 2, 3, 1))  # (S, size, size, 3)
  batch = max(1, min(int(batch_size), count))
  virtual = np.empty((count, size, size), np.float32)
  pending = None  # one batch in flight while the previous one comes back to the host
  for start in range(0, count + batch, batch):
    if start < count:
      chunk = inputs[start:start + batch]
      if len(chunk) < batch:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
      submitted = (start, predictor(chunk))
    else:
      submitted = None
    if pending is not None:
      done, result = pending
      n = min(batch, count - done)
      virtual[done:done + n] = np.asarray(result)[:n]
      if progress is not None:
        progress(n)
    pending = submitted
  virtual_hu = slices.unresize_square(np.asarray(hu_lib.model_to_hu(virtual, window), np.float32), (h, w))
  virtual_hu = hu_lib.keep_input_outside_window(virtual_hu, pre_hu, window)
  return np.clip(np.rint(virtual_hu, out=virtual_hu), -32768, 32767).astype(np.int16)


def load_predictors(checkpoints: Sequence[str], phases: Sequence[str] | None = None) -> dict[str, Predictor]:
  """One predictor per checkpoint, keyed by phase; ``phases`` (if given) must match the checkpoints' phases.

  Raises:
    InferenceError: a missing or incompatible checkpoint, a phase mismatch, or two checkpoints of one phase.
  """
  if phases:
    bad = [p for p in phases if p not in phases_lib.CONTRAST_PHASES]
    if bad:
      raise InferenceError(f"unknown phase(s) {bad}; choose from {list(phases_lib.CONTRAST_PHASES)}")
    if len(phases) != len(checkpoints):
      raise InferenceError(f"{len(phases)} phase(s) {list(phases)} but {len(checkpoints)} checkpoint(s): give one "
                           "checkpoint per phase, in the same order")
  predictors: dict[str, Predictor] = {}
  for i, path in enumerate(checkpoints):
    predictor = Predictor.from_checkpoint(path)
    if phases and predictor.phase != phases[i]:
      raise InferenceError(f"checkpoint {path} was trained for the {predictor.phase} phase, not {phases[i]}")
    if predictor.phase in predictors:
      raise InferenceError(f"two checkpoints for the {predictor.phase} phase: {predictors[predictor.phase].path} "
                           f"and {path}")
    predictors[predictor.phase] = predictor
  return predictors


# ---------------------------------------------------------------- output


def write_series(folder: str | os.PathLike, series: InputSeries, virtual: dict[str, tuple[Predictor, np.ndarray]],
                 fmt: str = "dicom", preview: bool = False) -> dict:
  """Writes the virtual phases of ``series`` into ``folder`` (created; existing files are overwritten).

  Args:
    folder: the output folder.
    series: the input, for geometry and source headers.
    virtual: phase -> (its predictor, its ``(S, H, W)`` virtual HU on the series' grid).
    fmt: 'dicom', 'nifti' or 'both'.
    preview: also write preview.png.

  Returns:
    What was written: {"phases": {phase: {"dicom": folder, "files": n, "nifti": path}}, "preview": path}.
  """
  if fmt not in FORMATS:
    raise InferenceError(f"unknown format {fmt!r}; choose one of {FORMATS}")
  if fmt in ("dicom", "both") and not series.is_dicom:
    raise InferenceError("DICOM output needs a DICOM input (it copies the source slices' headers); "
                         "use --format=nifti for a NIfTI input")
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  written: dict = {"phases": {}}
  for phase, (predictor, virtual_hu) in virtual.items():
    entry = written["phases"][phase] = {"checkpoint": predictor.path, "step": predictor.step,
                                        "method": predictor.method}
    if fmt in ("dicom", "both"):
      derivation = series_out.Derivation(phase, predictor.method, predictor.path or "(not from a checkpoint)",
                                         predictor.step)
      files = series_out.write_dicom_series(folder / phase, virtual_hu[series.present], series.sources, derivation)
      entry.update(dicom=str(folder / phase), files=len(files))
    if fmt in ("nifti", "both"):
      entry["nifti"] = str(_write_nifti(folder / f"{phase}.nii.gz", series, virtual_hu))
  if fmt in ("nifti", "both") and series.is_dicom:
    written["non_contrast_nifti"] = str(_write_nifti(folder / "non_contrast.nii.gz", series, series.hu))
  if preview:
    volumes = {"non-contrast": series.hu, **{f"virtual {p}": v for p, (_, v) in virtual.items()}}
    written["preview"] = str(series_out.write_preview(folder / "preview.png", volumes, series.pixel_spacing_mm,
                                                      series.slice_spacing_mm))
  return written


def _write_nifti(path: pathlib.Path, series: InputSeries, hu: np.ndarray) -> pathlib.Path:
  if series.is_dicom:
    return series_out.write_nifti(path, hu, series.positions_mm, series.orientation, series.pixel_spacing_mm,
                                  series.slice_spacing_mm)
  image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(hu, np.int16)[::-1]))
  image.CopyInformation(series.nifti_reference)
  return series_out.write_image(path, sitk.DICOMOrient(image, series.nifti_orientation))


class _AtomicFolder:
  """A temporary folder beside ``target``, renamed to ``target`` on success and removed on failure."""

  def __init__(self, target: pathlib.Path, overwrite: bool):
    self.target = target.absolute()
    self.overwrite = overwrite
    check_output(self.target, overwrite)

  def __enter__(self) -> pathlib.Path:
    self.target.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    old = None
    if self.target.exists():
      check_output(self.target, self.overwrite)  # it may have appeared while we were working
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
      os.replace(self.target, old / "previous")
    os.replace(self.tmp, self.target)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return False


def check_output(target: pathlib.Path, overwrite: bool) -> None:
  """Raises InferenceError when ``target`` exists and may not be replaced."""
  if target.exists() and not overwrite:
    raise InferenceError(f"output folder {target} exists; pass --overwrite to replace it")
  if target.exists() and not target.is_dir():
    raise InferenceError(f"output {target} exists and is not a folder")


def run(input_path: str | os.PathLike, output: str | os.PathLike, predictors: dict[str, Predictor],
        fmt: str | None = None, batch_size: int = 8, series_uid: str | None = None, overwrite: bool = False,
        preview: bool = False, progress: bool = False) -> dict:
  """The whole command: read, predict every phase, write atomically into ``output``.

  Args:
    fmt: 'dicom', 'nifti' or 'both'; None: 'dicom' for a DICOM input, 'nifti' for a NIfTI input.
    progress: show a progress bar per phase on stderr.

  Returns:
    The summary also written to ``output/summary.json``.
  """
  started = time.perf_counter()
  output = pathlib.Path(output)
  check_output(output.absolute(), overwrite)
  if not predictors:
    raise InferenceError("no model: give at least one --checkpoint")
  series = read_input(input_path, series_uid)
  fmt = fmt or ("dicom" if series.is_dicom else "nifti")
  if fmt not in FORMATS:
    raise InferenceError(f"unknown format {fmt!r}; choose one of {FORMATS}")
  if fmt in ("dicom", "both") and not series.is_dicom:
    raise InferenceError("DICOM output needs a DICOM input; use --format=nifti for a NIfTI input")
  read_s = time.perf_counter() - started
  virtual = {}
  predict_s = {}
  for phase, predictor in predictors.items():
    t0 = time.perf_counter()
    bar = _progress_bar(len(series.hu), f"virtual {phase}") if progress else None
    virtual[phase] = (predictor, predict_volume(predictor, series.hu, batch_size, bar.update if bar else None))
    if bar:
      bar.close()
    predict_s[phase] = time.perf_counter() - t0
  t0 = time.perf_counter()
  with _AtomicFolder(output, overwrite) as tmp:
    written = write_series(tmp, series, virtual, fmt, preview)
    summary = {
        "output": str(output.absolute()),
        "input": {"description": series.description, "slices": int(series.present.sum()),
                  "grid_slices": len(series.hu), "matrix": list(series.hu.shape[1:]),
                  "kind": "dicom" if series.is_dicom else "nifti"},
        "warnings": series.warnings,
        **_relocate(written, tmp, output.absolute()),
        "seconds": {"read": round(read_s, 3), "predict": {p: round(s, 3) for p, s in predict_s.items()},
                    "write": round(time.perf_counter() - t0, 3)},
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
  return summary


def _relocate(tree, old: pathlib.Path, new: pathlib.Path):
  """Paths under the temporary folder, as they will be after the rename."""
  if isinstance(tree, dict):
    return {k: _relocate(v, old, new) for k, v in tree.items()}
  if isinstance(tree, str) and tree.startswith(str(old)):
    return str(new) + tree[len(str(old)):]
  return tree


def _progress_bar(total: int, desc: str):
  from tqdm import tqdm

  return tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, leave=True)


# ---------------------------------------------------------------- command line

EXAMPLE = """example:
  python -m vcect_jax.infer --checkpoint=workdir/demo_arterial \\
      --input=workdir/demo_arterial/data/dicom/case_0000 --output=/tmp/virtual --format=both --preview

  Several phases at once: --checkpoint=runs/arterial,runs/portal --phase=arterial,portal
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m vcect_jax.infer", epilog=EXAMPLE, formatter_class=cli_help.HelpFormatter,
      description="Virtual contrast-enhanced CT series from a non-contrast CT series (DICOM or NIfTI).")
  parser.add_argument("--checkpoint", required=True,
                      help="training workdir, its checkpoints/ folder or a step folder; several comma-separated, "
                           "one per phase")
  parser.add_argument("--input", required=True,
                      help="DICOM series folder, study folder, one DICOM file, or a .nii/.nii.gz file")
  parser.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
  parser.add_argument("--phase", default="",
                      help="comma-separated phases, one per checkpoint, checked against the checkpoints "
                           "(default: the checkpoints' own)")
  parser.add_argument("--format", default=None, choices=FORMATS,
                      help="default: dicom for a DICOM input, nifti for a NIfTI input")
  parser.add_argument("--batch_size", type=int, default=8, help="slices per generator call (default 8)")
  parser.add_argument("--series_uid", default=None,
                      help="SeriesInstanceUID of the input series in a study folder (default: the study's only "
                           "non-contrast series)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  parser.add_argument("--preview", action="store_true", help="also write preview.png (axial + coronal views)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    if args.batch_size < 1:
      raise InferenceError(f"--batch_size must be at least 1, got {args.batch_size}")
    checkpoints = [p for p in args.checkpoint.split(",") if p]
    phases = [p.strip() for p in args.phase.split(",") if p.strip()]
    check_output(pathlib.Path(args.output).absolute(), args.overwrite)  # before the slow steps
    predictors = load_predictors(checkpoints, phases or None)
    summary = run(args.input, args.output, predictors, fmt=args.format, batch_size=args.batch_size,
                  series_uid=args.series_uid, overwrite=args.overwrite, preview=args.preview,
                  progress=not args.no_progress)
  except InferenceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for message in summary["warnings"]:
    print(f"warning: {message}", file=sys.stderr)
  print(f"wrote {summary['output']} ({summary['input']['slices']} input slices, {summary['seconds']['total']:.1f} s)")
  for phase, entry in summary["phases"].items():
    where = [f"{entry['files']} DICOM files in {entry['dicom']}"] if "dicom" in entry else []
    where += [entry["nifti"]] if "nifti" in entry else []
    print(f"  {phase}: {', '.join(where)}")
  for key in ("non_contrast_nifti", "preview"):
    if key in summary:
      print(f"  {key.replace('_', ' ')}: {summary[key]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
