"""Does the model learn contrast? Trains the demo for a phase on a phantom seed, evaluates it, prints one table.

  python -m benchmarks.quality --phase=arterial --seed=11 --workdir=/tmp/quality_arterial_11
      [--variant=demo] [--split=test] [--set train.steps=400 ...] [--data_dir=CONVERTED] [--reuse]
      [--test_seed=41 [--test_cases=12] [--test_slices=48] [--test_motion_scale=0]] [--test_data_dir=HELD_OUT]

Training is `vcect_jax.runtime.dispatch` (mode 'train') on `configs/<phase>.py:<variant>` with
`data.phantom.seed = --seed` (the phantom generated and converted under `<workdir>/data`, unless `--data_dir`
names a conversion); evaluation is `vcect_jax.evaluate.run` (mode 'eval') on `--split`, whose report lands in
`<workdir>/report_<split>`.

A held-out test set (`--test_seed`, `--test_data_dir`): the phantom's own test split is 2-4 cases, too few to tell
settings apart. `--test_seed=S` generates the config's phantom geometry (`data.phantom`, `--test_cases` cases) with
phantom seed S and converts it once into `--test_data_dir` (default `<workdir>/heldout_<S>`) with every case in
the test split (`split_fractions=(0, 0, 1)`, rank split) and the paper's alignment, whatever the training data's
alignment; the model is then evaluated and scored on that set instead (report in `<workdir>/report_<held-out
folder's name>_test`, e.g. `report_heldout_41_test`).
`--test_slices=N` gives the held-out phantom N slices instead of the config's: the phantom stretches its anatomy,
liver dome to pelvis, over the scanned length (`data_prep/phantom/anatomy.py`), so a taller volume samples every
organ on more slices at the same slice thickness, and the few top liver slices that breathing moves onto lung in
the contrast scan (7-10 mm at the dome) weigh less in the liver's score (benchmarks/RESULTS.md, issue 12, round 6).
The model sees the same in-plane anatomy, stretched along z (its 3-slice input stacks change less from slice to
slice than in training).
`--test_motion_scale=0` makes the held-out phantom without motion between its scans (`python -m data_prep.phantom
--motion_scale`): the contrast series lie on the non-contrast grid and anatomy, so a pair differs only by
enhancement and noise. On such pairs identity's organ error is the organ's enhancement, and the scores measure what
the model learned rather than the pairs' misalignment, which on the moving phantom caps even the oracle (issue 12).
`--test_data_dir` alone names such a conversion made before (by this script, or by `python -m data_prep.phantom`
and `python -m data_prep.convert --split_method=rank --split_fractions=0,0,1`), to score every run of a comparison
on the same records. The table compares three predictions of the contrast slice, on the same records:

  model:    the trained generator, mapped to HU by evaluation's rule (`evaluate.virtual_hu`);
  identity: the non-contrast slice itself (what doing nothing scores);
  oracle:   the real contrast slice with each organ of the *non-contrast* slice's labels filled with that organ's
            mean HU in the real contrast slice: a model that knows where every organ is and exactly how much it
            enhances, on these pairs (noise-free inside organs; misalignment of the pair still counts against it);
  real in window: the real contrast slice clipped to the model's CT window (`data.window`) and put through
            evaluation's HU rule (`evaluate.virtual_hu`: the non-contrast HU kept outside the window), i.e. a
            perfect model's prediction: the best that any model of that window can score. Its ratio is the ceiling
            of the model's (through the paper's W400/L30, HU -170..230: the delayed collecting system 0.61 and
            the arterial aorta 0.80 on aligned pairs; benchmarks/RESULTS.md, issue 12, round 7).
  truth without noise: on a held-out set without motion (`--test_motion_scale=0`) only: the phantom's contrast
            series rendered again without noise (`phantom.synthesize_case(..., noise=False)`: the same anatomy and
            enhancement on the non-contrast grid), resized as the converter writes records. The best prediction
            that any model of the non-contrast slice can make; what it scores is the floor that the real slice's
            noise, and the converter's resampling of it (its in-plane registration moves even a motionless pair
            by fractions of a pixel), set under every method. With it the table has a second block of rows: each
            method's error against that truth instead of the real slice (its own error, without the target's
            noise), and the goals' lines give the floor's multiple of identity beside the model's. A second
            table says where the model's error against that truth sits in each organ (`error_parts`): inside the
            organ or on its rim, painted brighter near its edge than deep inside (a halo: what misaligned
            training pairs teach), in patches (what is left after smoothing) or in the input's own noise passed on.

Rows: whole-body MAE (HU, inside the body), PSNR (dB) and SSIM (HU mode, `vcect_jax.metrics.hu_metrics`), then for
each enhancing organ of the phase (the organs that the phantom's table enhances by at least 10 HU in that phase,
`phase_organs`) the MAE inside the organ's non-contrast label (HU) and the enhancement ratio (virtual -
non-contrast) / (real - non-contrast) (1: all of the enhancement, 0: none), twice: the mean over cases of each
case's ratio of organ means, and pooled (the sums over every voxel of the organ in the split: a case whose real
slices show little enhancement, e.g. a misaligned organ, cannot swing it; nan where the pooled real enhancement is
under 10 HU, as the per-case ratio is in such a case). Other values are means over the split's
cases. The goals of issue 12 are checked below the table: organ MAE at most 0.5x identity's, the key organs'
pooled ratio at least 0.7, whole-body metrics no worse than identity's.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import os
import time

import numpy as np

from data_prep import cli_help
from vcect_jax import evaluate
from vcect_jax import hu
from vcect_jax import metrics

ORACLE = "oracle"
WINDOWED = "real in window"
TRUTH = "truth without noise"
ENHANCING_ORGANS = ("aorta", "portal_vein", "liver", "spleen", "kidney_cortex", "collecting_system", "bladder")
KEY_ORGANS = {"arterial": ("aorta", "kidney_cortex"), "portal": ("kidney_cortex",), "delayed": ("collecting_system",)}
MIN_ENHANCEMENT_HU = 10.0


def phase_organs(phase: str) -> tuple[str, ...]:
  """The organs of `ENHANCING_ORGANS` that the phantom enhances by at least `MIN_ENHANCEMENT_HU` in `phase` (its
  mean HU table; the bladder in the delayed phase through its layered contrast)."""
  from data_prep.phantom import enhancement  # pylint: disable=g-import-not-at-top
  column = enhancement.PHASES.index(phase)
  table = enhancement.MEAN_HU
  return tuple(o for o in ENHANCING_ORGANS if table[o][column] - table[o][0] >= MIN_ENHANCEMENT_HU
               or (o == "bladder" and phase == "delayed"))


def oracle_hu(case: evaluate.Case) -> np.ndarray:
  """(S, H, W) float32: the real contrast volume with each organ of the non-contrast labels set, slice by slice,
  to that organ's mean HU in the real contrast slice."""
  out = case.post_hu.astype(np.float32).copy()
  for value in metrics.ORGAN_LABELS.values():
    for s in range(len(out)):
      inside = case.labels[s] == value
      if inside.any():
        out[s][inside] = float(case.post_hu[s][inside].mean())
  return out


def organ_errors(virtual: np.ndarray, real: np.ndarray, pre: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
  """organ -> inside the organ's non-contrast label: `mae` (HU) of `virtual` against the real contrast volume, and
  for the pooled ratio the sums of virtual - non-contrast and real - non-contrast and the voxel count (0 where the
  organ is absent)."""
  out = {}
  for name in ENHANCING_ORGANS:
    inside = labels == metrics.ORGAN_LABELS[name]
    v, r, p = virtual[inside], real[inside], pre[inside]
    out[name] = {"mae": float(np.abs(v - r).mean()) if inside.any() else math.nan,
                 "virtual_sum": float((v - p).sum(dtype=np.float64)),
                 "real_sum": float((r - p).sum(dtype=np.float64)), "voxels": float(inside.sum())}
  return out


def score_split(source, predict_fn, window: hu.Window, batch_size: int = 8,
                truth: dict[str, np.ndarray] | None = None,
                pre_truth: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
  """method -> {"hu/mae", "hu/psnr", "hu/ssim", "<organ>/mae", "<organ>/ratio", "<organ>/enhancement"}: means
  over the cases of `source` (nan skipped). `predict_fn` None: identity and oracle only. `truth` (case id -> the
  noise-free contrast volume on the records' grid, every slice of the case: `noise_free_truth`) adds the method
  `TRUTH` and, for every method, "hu/mae_truth" (the error against that truth) and `error_parts`' keys;
  `pre_truth` (the same for the non-contrast series) adds "<organ>/noise_kept"."""
  per_method: dict[str, list[dict[str, float]]] = {}
  for case in evaluate.iter_cases(source):
    virtuals = {}
    if predict_fn is not None:
      virtuals[evaluate.MODEL] = evaluate.virtual_hu(evaluate.predict_case(predict_fn, case, window, batch_size),
                                                     case.current_pre_hu, window)
    virtuals[evaluate.IDENTITY] = case.current_pre_hu.astype(np.float32)
    virtuals[ORACLE] = oracle_hu(case)
    pre, real = case.current_pre_hu.astype(np.float32), case.post_hu.astype(np.float32)
    # What a perfect model would be scored: the real slice in the window, through evaluation's HU rule.
    virtuals[WINDOWED] = hu.keep_input_outside_window(np.clip(real, window.low, window.high), pre, window)
    true = None
    if truth is not None:
      if case.case_id not in truth:
        raise ValueError(f"case {case.case_id} of the scored records is not in the noise-free truth: the records "
                         "are not the held-out phantom's whose settings.json lies beside them; make the held-out "
                         "set again (`--test_seed`)")
      true = truth[case.case_id][case.slice_index]
      virtuals[TRUTH] = true
    noise_in = None if pre_truth is None else pre - pre_truth[case.case_id][case.slice_index]
    body = case.body_mask.astype(bool)
    regions = organ_regions(case.labels) if true is not None else None   # the same for every method
    for method, virtual in virtuals.items():
      row = {f"hu/{k}": float(v) for k, v in metrics.hu_metrics(virtual, real, case.body_mask).items()}
      organs = metrics.organ_enhancement(virtual, real, pre, case.labels, min_enhancement_hu=MIN_ENHANCEMENT_HU)
      for name, errors in organ_errors(virtual, real, pre, case.labels).items():
        row.update({f"{name}/{k}": v for k, v in errors.items()})   # mae, and the sums for the pooled ratio
        row[f"{name}/ratio"] = organs[name]["enhancement_ratio"]
        row[f"{name}/enhancement"] = organs[name]["real_mean"] - organs[name]["pre_mean"]
      if true is not None:
        row["hu/mae_truth"] = float(np.abs(virtual - true)[body].mean()) if body.any() else math.nan
        row.update(error_parts(virtual - true, regions, noise_in))
      per_method.setdefault(method, []).append(row)
  out = {m: {k: v["mean"] for k, v in evaluate.summarize(rows).items()} for m, rows in per_method.items()}
  for scores in out.values():
    for name in ENHANCING_ORGANS:
      real_sum, virtual_sum = scores.pop(f"{name}/real_sum"), scores.pop(f"{name}/virtual_sum")
      voxels = scores.pop(f"{name}/voxels")
      # As per case: no ratio where the pairs show less than MIN_ENHANCEMENT_HU (misaligned organs; not enhanced).
      enhanced = voxels > 0 and real_sum / voxels >= MIN_ENHANCEMENT_HU
      scores[f"{name}/ratio_pooled"] = virtual_sum / real_sum if enhanced else math.nan
  return out


PARTS = (("interior_mae_truth", "MAE inside (HU)", ".1f"), ("rim_mae_truth", "MAE on the rim (HU)", ".1f"),
         ("near_edge_bias_truth", "mean error 2-4 px in from the edge (HU)", "+.1f"),
         ("deep_bias_truth", "mean error deeper in (HU)", "+.1f"),
         ("smooth_sd_truth", "SD of the smoothed error (HU)", ".1f"), ("noise_kept", "input noise kept", ".2f"))
RIM_PX = 2
DEEP_PX = 4
SMOOTH_PX = 2.0
MIN_INTERIOR_PX = 25   # fewer pixels inside than this (thin or small organs): no inside measures


def organ_regions(labels: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
  """organ -> (inside, interior, rim, deep) boolean masks of each of `ENHANCING_ORGANS` in `labels` (S, H, W): its
  label, that label `RIM_PX` pixels in from its edge (in plane), the rest of the label, and the label `DEEP_PX`
  pixels in from its edge (`align_bench.edge_bands`, which measures the training pairs' own error on the same
  bands)."""
  from benchmarks import align_bench  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ENHANCING_ORGANS:
    inside = labels == metrics.ORGAN_LABELS[name]
    near, deep = align_bench.edge_bands(inside, RIM_PX, DEEP_PX)
    interior = near | deep
    out[name] = (inside, interior, inside & ~interior, deep)
  return out


def error_parts(error: np.ndarray, regions: dict[str, tuple[np.ndarray, ...]],
                noise_in: np.ndarray | None = None) -> dict[str, float]:
  """Where an error against the truth without noise (S, H, W) sits, per organ of `regions` (`organ_regions`):
  "<organ>/mae_truth" (inside its label), "<organ>/interior_mae_truth" and "<organ>/rim_mae_truth" (the label
  `RIM_PX` pixels in from its edge, and that rim: partial volume, sub-pixel shifts), "<organ>/smooth_sd_truth"
  (the SD inside of the error smoothed in plane with a Gaussian of `SMOOTH_PX` pixels: patches painted brighter or
  darker, which smoothing keeps, where pixel noise averages out) and, with `noise_in` (the non-contrast slice's
  own noise, HU), "<organ>/noise_kept": the least-squares slope of the error on that noise inside (1: the input's
  noise passed on as it is, 0: removed). "<organ>/near_edge_bias_truth" and "<organ>/deep_bias_truth": the mean
  signed error from `RIM_PX` to `DEEP_PX` pixels in from the edge, and deeper: a halo (an organ painted brighter
  or darker near its edge than deep inside, as misaligned training pairs teach) shows as a difference of the two.
  nan where the organ has fewer than `MIN_INTERIOR_PX` pixels inside (a vessel, the kidney cortex), or deep
  inside."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  smooth = ndimage.gaussian_filter(error.astype(np.float32), sigma=(0.0, SMOOTH_PX, SMOOTH_PX))
  out = {}
  for name, (inside, interior, rim, deep) in regions.items():
    has = int(interior.sum()) >= MIN_INTERIOR_PX
    has_deep = int(deep.sum()) >= MIN_INTERIOR_PX
    out[f"{name}/mae_truth"] = float(np.abs(error[inside]).mean()) if inside.any() else math.nan
    out[f"{name}/interior_mae_truth"] = float(np.abs(error[interior]).mean()) if has else math.nan
    out[f"{name}/rim_mae_truth"] = float(np.abs(error[rim]).mean()) if rim.any() else math.nan
    out[f"{name}/smooth_sd_truth"] = float(smooth[interior].std()) if has else math.nan
    near = interior & ~deep
    out[f"{name}/near_edge_bias_truth"] = float(error[near].mean()) if has_deep and near.any() else math.nan
    out[f"{name}/deep_bias_truth"] = float(error[deep].mean()) if has_deep else math.nan
    if noise_in is not None:
      out[f"{name}/noise_kept"] = math.nan
      if has:
        n = noise_in[interior].astype(np.float64) - noise_in[interior].mean(dtype=np.float64)
        e = error[interior].astype(np.float64) - error[interior].mean(dtype=np.float64)
        if n.any():
          out[f"{name}/noise_kept"] = float((e * n).sum() / (n * n).sum())
  return out


def parts_table(scores: dict[str, dict[str, float]], phase: str | None = None) -> str:
  """Where the model's and identity's errors against the truth without noise sit (`error_parts`), organs as
  columns; empty without the truth."""
  if TRUTH not in scores:
    return ""
  organs = enhancing_organs(scores, phase)
  lines = ["| against the truth without noise | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
  for method in (m for m in (evaluate.MODEL, evaluate.IDENTITY) if m in scores):
    for key, label, fmt in PARTS:
      if any(f"{o}/{key}" in scores[method] for o in organs):
        cells = [format(scores[method].get(f"{o}/{key}", math.nan), fmt) for o in organs]
        lines.append(f"| {method}: {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def enhancing_organs(scores: dict[str, dict[str, float]], phase: str | None = None) -> list[str]:
  """The organs scored: `phase_organs(phase)` present in the split; without a phase (data that is not the
  phantom's), those whose mean real enhancement on these pairs is at least `MIN_ENHANCEMENT_HU`."""
  identity = scores[evaluate.IDENTITY]
  if phase is not None:
    return [o for o in phase_organs(phase) if math.isfinite(identity.get(f"{o}/mae", math.nan))]
  return [o for o in ENHANCING_ORGANS if abs(identity.get(f"{o}/enhancement", math.nan)) >= MIN_ENHANCEMENT_HU]


def goals(scores: dict[str, dict[str, float]], phase: str) -> dict[str, bool]:
  """The issue's goals for the model: name -> met."""
  model, identity = scores[evaluate.MODEL], scores[evaluate.IDENTITY]
  organs = enhancing_organs(scores, phase)
  out = {f"{o} MAE <= 0.5x identity": model[f"{o}/mae"] <= 0.5 * identity[f"{o}/mae"] for o in organs}
  for o in KEY_ORGANS.get(phase, ()):
    if o in organs:
      out[f"{o} pooled ratio >= 0.7"] = model[f"{o}/ratio_pooled"] >= 0.7
  out["whole-body MAE <= identity"] = model["hu/mae"] <= identity["hu/mae"]
  out["PSNR >= identity"] = model["hu/psnr"] >= identity["hu/psnr"]
  out["SSIM >= identity"] = model["hu/ssim"] >= identity["hu/ssim"]
  return out


def table(scores: dict[str, dict[str, float]], phase: str | None = None) -> str:
  """The markdown table of the module docstring."""
  methods = [m for m in (evaluate.MODEL, evaluate.IDENTITY, ORACLE, WINDOWED, TRUTH) if m in scores]
  rows = [("whole-body MAE (HU)", "hu/mae", ".1f"), ("PSNR (dB)", "hu/psnr", ".2f"), ("SSIM", "hu/ssim", ".3f")]
  organs = enhancing_organs(scores, phase)
  for o in organs:
    rows += [(f"{o} MAE (HU)", f"{o}/mae", ".1f"), (f"{o} enhancement ratio, mean of cases", f"{o}/ratio", ".2f"),
             (f"{o} enhancement ratio, pooled", f"{o}/ratio_pooled", ".2f")]
  if TRUTH in scores:
    rows += [("whole-body MAE against the truth without noise (HU)", "hu/mae_truth", ".1f")]
    rows += [(f"{o} MAE against the truth without noise (HU)", f"{o}/mae_truth", ".1f") for o in organs]
  gap = evaluate.MODEL in scores
  lines = ["| metric | " + " | ".join(methods) + (" | model - oracle |" if gap else " |"),
           "|---|" + "---|" * (len(methods) + gap)]
  for label, key, fmt in rows:
    cells = [format(scores[m].get(key, math.nan), fmt) for m in methods]
    if gap:
      cells.append(format(scores[evaluate.MODEL].get(key, math.nan) - scores[ORACLE].get(key, math.nan), "+" + fmt))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def heldout_dataset(config, seed: int, out_dir: str, cases: int = 0, slices: int = 0,
                    motion_scale: float = 1.0) -> str:
  """A held-out test set: `config.data.phantom`'s geometry with phantom seed `seed` (`cases` cases and `slices`
  slices, 0: the config's), converted at `config.data.image_size` with the paper's alignment and every case in the
  test split. `motion_scale` scales the phantom's motion between the scans (0: aligned pairs, which differ only by
  enhancement and noise, so that the scores measure the model and not the pairs). Made once: an `out_dir` whose
  `settings.json` matches is reused. Returns the conversion (`<out_dir>/converted`).
  """
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from data_prep import convert  # pylint: disable=g-import-not-at-top
  from data_prep import phantom  # pylint: disable=g-import-not-at-top
  from data_prep import phases  # pylint: disable=g-import-not-at-top
  from data_prep import prepare  # pylint: disable=g-import-not-at-top

  p = config.data.phantom
  geometry = dict(cases=int(cases or p.cases), seed=int(seed), size=int(p.size), slices=int(slices or p.slices),
                  slice_thickness=float(p.slice_thickness), pixel_spacing=float(p.pixel_spacing))
  settings = {"phantom": geometry, "image_size": int(config.data.image_size), "split_fractions": [0.0, 0.0, 1.0]}
  if motion_scale != 1.0:
    settings["motion_scale"] = float(motion_scale)
  converted, stamp = os.path.join(out_dir, "converted"), os.path.join(out_dir, "settings.json")
  if os.path.exists(stamp) and os.path.exists(os.path.join(converted, "manifest.json")):
    with open(stamp) as f:
      if json.load(f) == settings:
        return converted
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)
  dicom_dir = os.path.join(out_dir, "dicom")
  phantom.generate(dicom_dir, **geometry, motion_scale=float(motion_scale))
  key_file = prepare.write_phantom_key(os.path.join(out_dir, "phantom.hmac_key"), seed)
  convert.run(convert.Settings(input=dicom_dir, output=converted, phases=phases.CONTRAST_PHASES,
                               image_size=int(config.data.image_size), key_file=key_file,
                               split_fractions=(0.0, 0.0, 1.0), split_method="rank"))
  with open(stamp, "w") as f:
    json.dump(settings, f)
  return converted


def noise_free_truth(test_data_dir: str, phases: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]] | None:
  """phase -> case id -> (S, H, W) float32: the noise-free series of each of `phases` (contrast phases or
  'non_contrast'; each case rendered once for all of them) of each case of a held-out set made by
  `heldout_dataset` without motion (its `settings.json` and `phantom.hmac_key` beside
  `test_data_dir`), on the records' grid (`phantom.synthesize_case(..., motion_scale=0, noise=False)`, resized as
  the converter resizes HU). None for any other set: with motion, or not the phantom's, there is no truth on the
  non-contrast grid."""
  import json  # pylint: disable=g-import-not-at-top
  from data_prep import privacy  # pylint: disable=g-import-not-at-top
  from data_prep import slices  # pylint: disable=g-import-not-at-top
  from data_prep.phantom import cases as phantom_cases  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.normpath(test_data_dir))
  stamp, key_file = os.path.join(root, "settings.json"), os.path.join(root, "phantom.hmac_key")
  if not (os.path.basename(os.path.normpath(test_data_dir)) == "converted" and os.path.exists(stamp)
          and os.path.exists(key_file)):
    return None
  with open(stamp) as f:
    settings = json.load(f)
  if settings.get("motion_scale", 1.0) != 0.0:
    return None
  key, _ = privacy.load_or_create_key(test_data_dir, key_file)
  g = settings["phantom"]
  size = int(settings["image_size"])
  out = {phase: {} for phase in phases}
  for index in range(int(g["cases"])):
    case = phantom_cases.synthesize_case(index, int(g["seed"]), int(g["size"]), int(g["slices"]),
                                         float(g["slice_thickness"]), float(g["pixel_spacing"]), motion_scale=0.0,
                                         noise=False)
    who = case.identity
    case_id = privacy.case_id(key, privacy.patient_identity(who["PatientID"], who["PatientName"],
                                                            who["PatientBirthDate"], fallback=who["StudyInstanceUID"]))
    for phase in phases:
      out[phase][case_id] = slices.resize_square(case.hu[phase], size, False, slices.AIR_HU).astype(np.float32)
  return out


def _heldout_name(test_data_dir: str) -> str:
  """The held-out set's folder name (`heldout_41` for `.../heldout_41/converted`), which names its report."""
  path = os.path.normpath(test_data_dir)
  if os.path.basename(path) == "converted":
    path = os.path.dirname(path)
  return os.path.basename(path) or "heldout"


def run(config, workdir: str, split: str = "test", train: bool = True, test_data_dir: str = "") -> dict:
  """Trains `config` in `workdir` (unless `train` is False: an existing run), evaluates `split` through eval mode,
  and scores model, identity and oracle on the same records: those of the training data (`config.data.dir` or
  the phantom), or of `test_data_dir` (a held-out conversion, e.g. `heldout_dataset`) when given.

  Returns:
    {"scores": method -> key -> mean, "table": str, "goals": name -> bool, "eval": evaluate.run's result,
    "train_seconds": float, "data_dir": str (the training data), "test_data_dir": str (the scored records)}.
  """
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  from vcect_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vcect_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vcect_jax import runtime  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  if train:
    config.mode = "train"
    runtime.dispatch(config, workdir)
  seconds = time.perf_counter() - t0
  eval_config = config.copy_and_resolve_references()
  eval_config.mode = "eval"
  eval_config.eval.checkpoint = workdir
  eval_config.eval.split = split
  eval_config.eval.report_dir = os.path.join(workdir, f"report_{_heldout_name(test_data_dir)}_{split}"
                                             if test_data_dir else f"report_{split}")
  if test_data_dir:
    eval_config.data.dir = test_data_dir
  result = runtime.dispatch(eval_config, workdir)

  data_dir = config.data.dir or prepare.ensure_dataset(config, workdir)
  scored_dir = test_data_dir or data_dir
  loaded = checkpoint.load_generator(workdir)
  window = hu.Window.from_config(loaded.config.data.window)
  source = input_pipeline.load_source(scored_dir, config.phase, split)
  series = noise_free_truth(test_data_dir, (config.phase, "non_contrast")) if test_data_dir else None
  truth, pre_truth = (series[config.phase], series["non_contrast"]) if series else (None, None)
  scores = score_split(source, evaluate.make_predict_fn(loaded.generator), window,
                       batch_size=int(config.eval.batch_size), truth=truth, pre_truth=pre_truth)
  reported = result["overall"][evaluate.MODEL]["hu/mae"]["mean"]
  if not math.isclose(reported, scores[evaluate.MODEL]["hu/mae"], rel_tol=1e-3, abs_tol=1e-3):
    raise AssertionError(f"eval mode's model MAE {reported} differs from the benchmark's "
                         f"{scores[evaluate.MODEL]['hu/mae']}: the two read different records")
  return {"scores": scores, "table": table(scores, config.phase), "parts": parts_table(scores, config.phase),
          "goals": goals(scores, config.phase),
          "eval": result, "train_seconds": seconds, "data_dir": data_dir, "test_data_dir": scored_dir}


def _literal(text: str):
  """A Python literal (numbers, booleans, tuples), else the text itself (paths, names)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def build_config(phase: str, variant: str, seed: int, overrides: list[str], data_dir: str = ""):
  """`configs/<phase>.py:<variant>` with the phantom seed, `field=value` overrides and an optional data.dir."""
  config = importlib.import_module(f"configs.{phase}").get_config(variant or None)
  config.data.phantom.seed = int(seed)
  config.update_from_flattened_dict({k: _literal(v) for k, v in (a.split("=", 1) for a in overrides)})
  if data_dir:
    config.data.dir = data_dir
  return config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                   formatter_class=cli_help.HelpFormatter,
                                   epilog="example:\n  python -m benchmarks.quality --seed=7 --workdir=/tmp/quality_arterial")
  parser.add_argument("--phase", default="arterial", choices=("arterial", "portal", "delayed"),
                      help="contrast phase")
  parser.add_argument("--seed", type=int, required=True, help="phantom seed (one the config was not tuned on)")
  parser.add_argument("--workdir", required=True, help="work directory of the run")
  parser.add_argument("--variant", default="demo", help="run-size variant of configs/variants.py ('' = paper)")
  parser.add_argument("--split", default="test", help="split the model is evaluated on")
  parser.add_argument("--data_dir", default="", help="a conversion to use instead of the embedded phantom")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. --set train.steps=400 (repeatable)")
  parser.add_argument("--reuse", action="store_true", help="evaluate the run already in --workdir")
  parser.add_argument("--test_seed", type=int, default=None,
                      help="score on a held-out phantom of this seed (the config's phantom geometry, every case in "
                           "the test split), made once in --test_data_dir")
  parser.add_argument("--test_cases", type=int, default=0, help="cases of the --test_seed phantom (0: the config's)")
  parser.add_argument("--test_slices", type=int, default=0,
                      help="slices of the --test_seed phantom (0: the config's): a taller volume, the same anatomy "
                           "stretched over it")
  parser.add_argument("--test_motion_scale", type=float, default=1.0,
                      help="the --test_seed phantom's motion between the scans, scaled: 1 the phantom's, 0 aligned "
                           "pairs (the scores then measure the model, not the pairs' misalignment)")
  parser.add_argument("--test_data_dir", default="",
                      help="the held-out set's folder with --test_seed (default <workdir>/heldout_<seed>); alone: a "
                           "held-out conversion made before (or such a folder: its converted/), scored instead of "
                           "the training data's --split")
  args = parser.parse_args(argv)
  if args.test_seed is not None and args.test_seed == args.seed:
    parser.error("--test_seed must differ from --seed (the training phantom's)")
  if (args.test_cases or args.test_slices or args.test_motion_scale != 1.0) and args.test_seed is None:
    parser.error("--test_cases, --test_slices and --test_motion_scale shape the --test_seed phantom: give "
                 "--test_seed too")
  if not 0.0 <= args.test_motion_scale <= 1.0:
    parser.error(f"--test_motion_scale must be from 0 to 1, got {args.test_motion_scale}")
  config = build_config(args.phase, args.variant, args.seed, args.set, args.data_dir)
  test_data_dir = args.test_data_dir
  if test_data_dir and args.test_seed is None and os.path.exists(os.path.join(test_data_dir, "converted",
                                                                              "manifest.json")):
    test_data_dir = os.path.join(test_data_dir, "converted")  # a folder made with --test_seed
  if args.test_seed is not None:
    test_data_dir = heldout_dataset(config, args.test_seed,
                                    args.test_data_dir or os.path.join(args.workdir, f"heldout_{args.test_seed}"),
                                    args.test_cases, args.test_slices, args.test_motion_scale)
  out = run(config, args.workdir, args.split, train=not args.reuse, test_data_dir=test_data_dir)
  scored = f"held-out set {test_data_dir}" if test_data_dir else f"phantom seed {args.seed}"
  print(f"{args.phase}, trained on phantom seed {args.seed}, :{args.variant} {' '.join(args.set)}, {args.split} "
        f"split of the {scored} ({out['eval']['cases']} cases), training {out['train_seconds']:.0f} s")
  print(out["table"])
  if out["parts"]:
    print(out["parts"])
  for name, met in out["goals"].items():
    print(f"  {'met    ' if met else 'NOT met'}  {name}{_goal_detail(out['scores'], name)}")
  return out


def _goal_detail(scores: dict[str, dict[str, float]], goal: str) -> str:
  """' (model 0.52x, truth without noise 0.22x)' beside an organ's MAE goal: the multiples of identity's MAE."""
  if not goal.endswith(" MAE <= 0.5x identity"):
    return ""
  key = goal.split()[0] + "/mae"
  methods = [m for m in (evaluate.MODEL, TRUTH) if m in scores]
  return " (" + ", ".join(f"{m} {scores[m][key] / scores[evaluate.IDENTITY][key]:.2f}x" for m in methods) + ")"


if __name__ == "__main__":
  main()
