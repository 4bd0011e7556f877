"""Converting one case: read its series, pair and align each contrast phase with the non-contrast series, and
build the records (2.5D non-contrast stack, aligned contrast slice, body mask, labels, geometry, quality).

Runs in a worker process (one case at a time) or, for the TFDS builder, as the unit of a Beam transform.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable

import numpy as np

from data_prep import align
from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import records
from data_prep import register
from data_prep import slices
from data_prep.convert.plan import CasePlan
from data_prep.convert.plan import Settings

log = logging.getLogger("data_prep.convert")

def _load_labels(labels_dir: pathlib.Path | None, shape: tuple[int, int, int]) -> np.ndarray | None:
  """uint8 (S, H, W) non-contrast labels (slice 0 cranial) if the case has them (phantom), else None."""
  # Assumes the label volume covers the series slice for slice, as the phantom writes it.
  if labels_dir is None:
    return None
  path = labels_dir / f"{phases_lib.NON_CONTRAST}.nii.gz"
  if not path.exists():
    return None
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  # The phantom writes labels with SimpleITK in increasing table position (caudal slice first).
  data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[::-1]
  if data.shape == shape:
    return np.ascontiguousarray(data).astype(np.uint8)
  log.warning("labels of shape %s do not match the series %s; ignored", data.shape, shape)
  return None


@dataclasses.dataclass
class CaseContext:
  """What every contrast phase of a case shares: the non-contrast series at full and at output size."""

  plan: CasePlan
  settings: Settings
  pre: dicom_io.Volume  # the non-contrast volume as read (HU int16 (S, H, W), geometry, padding)
  body_masks: list[np.ndarray]  # uint8 (H, W) per slice, original matrix (ECC's region)
  pre_hu: np.ndarray  # int16 (S, size, size) HU
  body_mask: np.ndarray  # uint8 (S, size, size)
  labels: np.ndarray  # uint8 (S, size, size); zeros without label volumes
  pixel_spacing_mm: float  # in-plane spacing of the records (after the resize)
  features: object  # the records' TFDS features (serializer)

  @classmethod
  def build(cls, plan: CasePlan, settings: Settings, pre: dicom_io.Volume,
            geometry: dicom_io.Geometry) -> CaseContext:
    """Resizes the non-contrast slices, body masks and labels once per case (every phase's records share them)."""
    size = settings.image_size
    labels = _load_labels(plan.labels_dir, pre.hu.shape)
    masks = [align.body_mask(s, None if pre.padding is None else pre.padding[i]) for i, s in enumerate(pre.hu)]
    return cls(
        plan=plan, settings=settings, pre=pre, body_masks=masks,
        pre_hu=slices.resize_square(pre.hu, size, False, slices.AIR_HU),
        body_mask=slices.resize_square(np.stack(masks), size, True, 0),
        labels=(slices.resize_square(labels, size, True, 0) if labels is not None
                else np.zeros((len(masks), size, size), np.uint8)),
        pixel_spacing_mm=slices.resized_spacing_mm(geometry.pixel_spacing_mm[1], pre.hu.shape[1:], size),
        features=records.features(size))


def convert_case(plan: CasePlan, settings: Settings, cache: pathlib.Path | None,
                 sink: Callable[[str, dict], None] | None = None) -> dict:
  """Converts one study for every requested phase; returns its summary.

  Records go to ``cache`` (serialized, one framed file per phase), or, when ``sink`` is given, to
  ``sink(phase, example_dict)`` (the TFDS builder).
  """
  summary = {"case_id": plan.case_id, "study": plan.study_tag, "split": plan.split, "folder": plan.folder,
             "phases": {}, "skipped_series": []}
  pending = list(settings.phases)
  if phases_lib.NON_CONTRAST not in plan.series:
    for phase in pending:
      summary["phases"][phase] = {"skipped": "study has no non-contrast series"}
    return summary
  try:
    pre_geometry = dicom_io.check_geometry(plan.series[phases_lib.NON_CONTRAST])
    pre = dicom_io.read_volume(pre_geometry)
  except dicom_io.SeriesRejected as e:
    summary["skipped_series"].append({"phase": phases_lib.NON_CONTRAST, "reason": str(e)})
    for phase in pending:
      summary["phases"][phase] = {"skipped": f"non-contrast series rejected: {e}"}
    return summary
  context = CaseContext.build(plan, settings, pre, pre_geometry)
  for phase in pending:
    if phase not in plan.series:
      summary["phases"][phase] = {"skipped": f"study has no {phase} series"}
      continue
    try:
      geometry = dicom_io.check_geometry(plan.series[phase], normal=pre_geometry.normal)
      post = dicom_io.read_volume(geometry)
      if geometry.shape != pre_geometry.shape or not np.allclose(geometry.pixel_spacing_mm,
                                                                  pre_geometry.pixel_spacing_mm, atol=1e-3):
        raise dicom_io.SeriesRejected("image matrix or pixel spacing differs from the non-contrast series")
    except dicom_io.SeriesRejected as e:
      summary["skipped_series"].append({"phase": phase, "reason": str(e)})
      summary["phases"][phase] = {"skipped": f"{phase} series rejected: {e}"}
      continue
    summary["phases"][phase] = _convert_pair(
        context, post,
        None if cache is None else cache / f"{plan.name}.{phase}.rec",
        None if sink is None else (lambda example, phase=phase: sink(phase, example)))
    del post
  return summary


def case_examples(plan: CasePlan, settings: Settings) -> list[tuple[str, dict]]:
  """(unique key, example) for every record of a case (one phase in ``settings.phases``): the TFDS builder's unit
  of work, also as a Beam transform."""
  out = []
  convert_case(plan, settings, None, sink=lambda _, example: out.append(example))
  return [(f"{plan.name}-{int(example['slice_index']):05d}", example) for example in out]


def _convert_pair(context: CaseContext, post: dicom_io.Volume, out_path: pathlib.Path | None,
                  sink: Callable[[dict], None] | None) -> dict:
  """Pairs, aligns and serializes one (non-contrast, contrast) series pair; returns the phase's case stats.

  Records go to the framed file ``out_path``, or to ``sink(example)`` when given.
  """
  plan, settings, pre = context.plan, context.settings, context.pre
  pre_z, post_z = pre.geometry.table_z_mm, post.geometry.table_z_mm
  if settings.align:
    offset, z_score = align.estimate_z_offset(pre.hu, pre_z, post.hu, post_z, search_mm=settings.z_search_mm)
  else:
    offset, z_score = 0.0, float("nan")
  n = len(pre.hu)
  serialized, excluded, shifts, mis, eccs, worst, residuals, changed = [], [], [], [], [], [], [], []
  options = settings.registration_options()
  if settings.align and not options.is_paper:
    pairs = _registered_pairs(context, post, offset, options)
  else:
    pairs = align.pair_slices(pre_z, post_z, offset)
  for i, j in enumerate(pairs):
    where = {"case_id": plan.case_id, "slice_index": i, "table_z_mm": round(float(pre_z[i]), 3)}
    if isinstance(j, register.SlicePair):
      # Options beyond the paper (data_prep/register.py): the 6 px rule tests the residual after registration.
      if j.excluded is not None:
        excluded.append({**where, "reason": j.excluded})
        continue
      if j.rule_px > settings.max_misalignment_px:
        what = "misalignment" if np.isnan(j.residual_px) else "residual misalignment after registration"
        excluded.append({**where, "reason": f"{what} {j.rule_px:.2f} px > {settings.max_misalignment_px:g} px",
                         "misalignment_px": round(j.rule_px, 3)})
        continue
      post_hu, m, cc = j.post_hu, j.misalignment_px, j.ecc_score
      shifts.append(j.shift_px)
      worst.append(j.max_displacement_px)
      if not np.isnan(j.residual_px):
        residuals.append(j.residual_px)
      if not np.isnan(j.levels_changed):
        changed.append(j.levels_changed)
    elif j is None:
      excluded.append({**where, "reason": "no contrast slice within half a slice of the corrected table position"})
      continue
    elif settings.align:
      try:
        result = align.align_slice(pre.hu[i], post.hu[j], context.body_masks[i], ecc_size=settings.ecc_size)
      except align.AlignmentFailed as e:
        excluded.append({**where, "reason": str(e)})
        continue
      if result.misalignment_px > settings.max_misalignment_px:
        excluded.append({**where, "reason": f"misalignment {result.misalignment_px:.2f} px > "
                                            f"{settings.max_misalignment_px:g} px",
                         "misalignment_px": round(result.misalignment_px, 3)})
        continue
      post_hu, m, cc = result.post_hu, result.misalignment_px, result.ecc_score
      shifts.append(result.shift_px)
      worst.append(result.max_displacement_px)
    else:
      post_hu, m, cc = post.hu[j], 0.0, float("nan")
    mis.append(m)
    eccs.append(cc)
    example = {
        "pre": context.pre_hu[slices.triplet_indices(i, n)],
        "post": slices.resize_square(post_hu, settings.image_size, False, slices.AIR_HU),
        "body_mask": context.body_mask[i],
        "labels": context.labels[i],
        "case_id": plan.case_id,
        "slice_index": i,
        "table_z_mm": float(pre_z[i]),
        "pixel_spacing_mm": context.pixel_spacing_mm,
        "misalignment_px": m,
        "ecc_score": cc,
    }
    if sink is not None:
      sink(example)
    else:
      serialized.append(context.features.serialize_example(example))
  if out_path is not None:
    records.write_framed(out_path, serialized)
  shift = np.mean(shifts, axis=0) if shifts else (float("nan"), float("nan"))
  stats = {
      "examples": len(mis),
      "pairs": sum(j is not None and getattr(j, "has_partner", True) for j in pairs),
      "z_offset_mm": round(offset, 3),
      "z_score": round(z_score, 4),
      "shift_px_mean": [round(float(v), 3) for v in shift],
      "misalignment_px_mean": round(float(np.mean(mis)), 3) if mis else None,
      "misalignment_px_max": round(float(np.max(mis)), 3) if mis else None,
      "max_displacement_px_max": round(float(np.max(worst)), 3) if worst else None,
      "ecc_score_mean": round(float(np.mean(eccs)), 4) if eccs else None,
      "ecc_score_min": round(float(np.min(eccs)), 4) if eccs else None,
      "excluded_pairs": excluded,
  }
  if residuals:
    stats["residual_px_mean"] = round(float(np.mean(residuals)), 3)
    stats["residual_px_max"] = round(float(np.max(residuals)), 3)
  if changed:  # through_plane='local': the share of body pixels that took another level or shift than the nearest
    stats["levels_changed_mean"] = round(float(np.mean(changed)), 3)
  return stats


def _registered_pairs(context: CaseContext, post: dicom_io.Volume, offset: float,
                      options: register.Options) -> list[register.SlicePair]:
  """The contrast volume brought onto the non-contrast grid by `register.align_volume` (through-plane resampling
  and/or B-spline registration), one `SlicePair` per non-contrast slice."""
  pre = context.pre
  result = register.align_volume(pre.hu, pre.geometry.table_z_mm, post.hu, post.geometry.table_z_mm,
                                 context.body_masks, offset, float(pre.geometry.pixel_spacing_mm[1]), options)
  return result.pairs
