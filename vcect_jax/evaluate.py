"""Evaluation mode: whole cases of a split through a trained generator, metrics in both modes, a report.

    python -m vcect_jax.main --config=configs/arterial.py --config.mode=eval --config.eval.checkpoint=PATH \
        [--config.eval.split=test] [--config.eval.max_cases=N]

`run(config, workdir)` restores the generator of a checkpoint (`checkpoint.load_generator`: a training work
directory, its `checkpoints/` folder or one step folder; the checkpoint carries its config), reads the records of
one split case by case (slices in table order), predicts every slice, and scores each case twice: the model and
the identity baseline (the non-contrast input used as the prediction, which every table carries because gains over
it can be tiny). The report (`vcect_jax.report`) goes to `config.eval.report_dir` or `<workdir>/report`.

From model output to HU (the rule every HU metric uses, the same as inference's, so that the numbers describe the
series a user gets):
  The generator sees and produces the W400/L30 window only. The virtual image in HU is the prediction clipped to
  the window and mapped back to HU wherever the current non-contrast slice lies well inside the window; outside it
  (air, lung, bone, metal: tissue that contrast does not change and the window cannot express) and wherever the
  non-contrast slice is 150 HU or more (bone, calcium: `hu.BONE_HU`) it is the non-contrast HU, with smooth
  transitions (`vcect_jax.hu.keep_input_outside_window`). See `virtual_hu`.

What a case's numbers are (the definitions of each metric are in `vcect_jax.metrics`):
  paper:          paper mode per slice (8-bit windowed images), averaged over the case's slices;
  hu:             HU mode on the whole volume (every body voxel of the case pooled), and per slice in the JSON;
  organs:         per-organ means and enhancement ratios on the whole volume, in HU and clipped to the window;
  snu_roi:        ROI-based non-uniformity inside the liver, on the slice where the most ROIs fit;
  through_plane:  slice-to-slice flicker of the virtual series minus that of the real series.
The report's figures show the first cases; with the pretext encoder of the training run at hand (its
`perceptual.pretext_checkpoint`), also the perceptual heatmaps of their middle slices (paper Figure 5).
Overall values are the mean and standard deviation over cases (nan values skipped, their count reported), like
the paper's mean +- std.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
from absl import logging
from etils import epath

from data_prep import progress as progress_lib

from vcect_jax import hu
from vcect_jax import metrics

MODEL = "model"
IDENTITY = "identity"
SNU_ORGAN = "liver"        # the homogeneous organ of the ROI-based SNU
SNU_ROI_MM = 10.0          # side of each ROI square, mm (at least 2 px)
FIGURE_CASES = 6           # cases shown in the Figure-7-style figures (the first ones of the split)

PredictFn = Callable[[np.ndarray], np.ndarray]  # (B, H, W, 3) model space -> (B, H, W, 1) model space


class EvaluationError(ValueError):
  """An evaluation that cannot run as configured; the message says what to change."""


# ------------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Case:
  """The records of one case, slices in table order (increasing `slice_index`)."""

  case_id: str
  slice_index: np.ndarray   # (S,) int32
  pre_hu: np.ndarray        # (S, 3, H, W) int16: previous, current, next non-contrast slices
  post_hu: np.ndarray       # (S, H, W) int16: the real contrast slice
  body_mask: np.ndarray     # (S, H, W) uint8
  labels: np.ndarray        # (S, H, W) uint8 organ labels (zeros without label volumes)
  pixel_spacing_mm: float
  slice_spacing_mm: float   # median table step between the case's slices (nan with one slice)

  @property
  def current_pre_hu(self) -> np.ndarray:
    """(S, H, W) the non-contrast slice the model predicts from (the middle channel)."""
    return self.pre_hu[:, 1]


def case_index(source) -> dict[str, list[int]]:
  """case_id -> record indices of a random-access record source, in slice order; cases in order of appearance."""
  cases: dict[str, list[tuple[int, int]]] = collections.OrderedDict()
  for i in range(len(source)):
    example = source[i]
    cases.setdefault(_text(example["case_id"]), []).append((int(example["slice_index"]), i))
  return collections.OrderedDict((c, [i for _, i in sorted(v)]) for c, v in cases.items())


def read_case(source, case_id: str, indices: list[int]) -> Case:
  """The records `indices` of `source` (one case, in slice order) stacked into volumes."""
  examples = [source[i] for i in indices]
  stack = lambda key, dtype: np.stack([np.asarray(e[key], dtype) for e in examples])  # noqa: E731
  table_z = np.array([float(e.get("table_z_mm", np.nan)) for e in examples])
  steps = np.abs(np.diff(table_z))
  return Case(case_id=case_id, slice_index=stack("slice_index", np.int32), pre_hu=stack("pre", np.int16),
              post_hu=stack("post", np.int16), body_mask=stack("body_mask", np.uint8),
              labels=stack("labels", np.uint8), pixel_spacing_mm=float(examples[0]["pixel_spacing_mm"]),
              slice_spacing_mm=float(np.median(steps)) if len(steps) else math.nan)


def iter_cases(source, max_cases: int = 0, index: dict[str, list[int]] | None = None) -> Iterator[Case]:
  """The cases of a record source one by one (at most `max_cases` when > 0), each read when it is needed.

  `index` (from `case_index`) saves reading the records' ids again.
  """
  index = case_index(source) if index is None else index
  for n, (case_id, indices) in enumerate(index.items()):
    if max_cases and n >= max_cases:
      return
    yield read_case(source, case_id, indices)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------------ prediction
def make_predict_fn(generator) -> PredictFn:
  """A jitted host function around an nnx generator in eval mode: numpy in, numpy out."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(generator)

  @jax.jit
  def apply(state, pre):
    return nnx.merge(graphdef, state)(pre)

  return lambda pre: np.asarray(apply(state, pre))


def predict_case(predict_fn: PredictFn, case: Case, window: hu.Window, batch_size: int) -> np.ndarray:
  """(S, H, W) float32 model-space predictions of a case's slices, in batches of `batch_size`.

  The last batch is padded (with copies of its last slice) to `batch_size`, so that every call has the same shape
  and the jitted generator compiles once.
  """
  pre = np.moveaxis(hu.hu_to_model(case.pre_hu.astype(np.float32), window), 1, -1).astype(np.float32)
  out = []
  for start in range(0, len(pre), batch_size):
    batch = pre[start:start + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(predict_fn(batch))[:n, ..., 0])
  return np.concatenate(out).astype(np.float32)


def virtual_hu(prediction: np.ndarray, pre_hu: np.ndarray, window: hu.Window) -> np.ndarray:
  """The virtual image in HU from model-space predictions, by inference's HU rule (the module docstring).

  Args:
    prediction: (..., H, W) model space ([-1, 1] over the window).
    pre_hu: (..., H, W) the current non-contrast slices in HU.
    window: the window the model was trained with.

  Returns:
    float32 HU: `pre + w * (virtual - pre)`, with `virtual` the prediction clipped to the window and mapped to HU,
    and `w = hu.blend_weight(pre_hu, window)` (0 outside the window and on bone, 1 well inside it).
  """
  return hu.keep_input_outside_window(hu.model_to_hu(np.asarray(prediction, np.float32), window), pre_hu, window)


# ------------------------------------------------------------------------------------------------ metrics
def case_metrics(case: Case, virtual: np.ndarray, window: hu.Window) -> dict:
  """Every metric of one case for one virtual volume (S, H, W) in HU; the module docstring lists the sections."""
  real = case.post_hu.astype(np.float32)
  pre = case.current_pre_hu.astype(np.float32)
  slices = []
  for s in range(len(real)):
    slices.append({"slice_index": int(case.slice_index[s]),
                   "paper": metrics.paper_metrics(virtual[s], real[s], window),
                   "hu": metrics.hu_metrics(virtual[s], real[s], case.body_mask[s])})
  paper = {k: float(np.mean([s["paper"][k] for s in slices])) for k in slices[0]["paper"]}
  organs = metrics.organ_enhancement(virtual, real, pre, case.labels)
  windowed = metrics.organ_enhancement(virtual, real, pre, case.labels, window=window)
  for name, values in organs.items():
    values["enhancement_ratio_window"] = windowed[name]["enhancement_ratio"]
  return {
      "paper": paper,
      "hu": metrics.hu_metrics(virtual, real, case.body_mask),
      "organs": organs,
      "snu_roi": _roi_snu(case, virtual, real),
      "through_plane": metrics.through_plane(virtual, real, case.body_mask, case.slice_index, window=window),
      "slices": slices,
  }


def _roi_snu(case: Case, virtual: np.ndarray, real: np.ndarray) -> dict:
  """ROI-based SNU (HU) of the virtual and real images inside `SNU_ORGAN`, on the slice where most ROIs fit;
  `error` = |virtual - real|. nan values when fewer than two ROIs fit on any slice (or no such organ)."""
  size = max(2, int(round(SNU_ROI_MM / case.pixel_spacing_mm))) if case.pixel_spacing_mm > 0 else 2
  organ = case.labels == metrics.ORGAN_LABELS[SNU_ORGAN]
  best, best_rois = -1, []
  for s in np.argsort(-organ.sum(axis=(1, 2)), kind="stable")[:8]:  # the largest sections of the organ
    rois = metrics.homogeneous_rois(organ[s], size)
    if len(rois) > len(best_rois):
      best, best_rois = int(s), rois
  if len(best_rois) < 2:
    return {"virtual": math.nan, "real": math.nan, "error": math.nan, "rois": len(best_rois), "roi_px": size,
            "slice_index": -1}
  v, r = metrics.roi_snu(virtual[best], best_rois), metrics.roi_snu(real[best], best_rois)
  return {"virtual": v, "real": r, "error": abs(v - r), "rois": len(best_rois), "roi_px": size,
          "slice_index": int(case.slice_index[best])}


def flatten(case_result: dict) -> dict[str, float]:
  """One case's metrics as `section/name` -> value (organs: `organ/<name>/<field>`), without per-slice lists."""
  flat = {}
  for section in ("paper", "hu", "snu_roi", "through_plane"):
    for name, value in case_result[section].items():
      flat[f"{section}/{name}"] = float(value)
  for organ, values in case_result["organs"].items():
    for name, value in values.items():
      flat[f"organ/{organ}/{name}"] = float(value)
  return flat


def summarize(flat_cases: list[dict[str, float]]) -> dict[str, dict[str, float]]:
  """key -> {mean, std, n} over cases; nan values are skipped (n counts the others). inf stays inf."""
  keys = list(dict.fromkeys(k for case in flat_cases for k in case))
  out = {}
  for key in keys:
    values = np.array([case.get(key, math.nan) for case in flat_cases], np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
      out[key] = {"mean": math.nan, "std": math.nan, "n": 0}
    elif np.isinf(values).any():
      out[key] = {"mean": float(np.mean(values)), "std": math.nan, "n": int(len(values))}
    else:
      out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": int(len(values))}
  return out


# ------------------------------------------------------------------------------------------------ one split
def evaluate_source(source, predict_fn: PredictFn | None, window: hu.Window, batch_size: int = 8,
                    max_cases: int = 0, figure_cases: int = FIGURE_CASES) -> dict:
  """Scores the cases of a record source with a model (`predict_fn`; None: the identity baseline only).

  Returns:
    {"cases": {case_id: {"slices": S, "methods": {method: case_metrics(...)}}}, "overall": {method:
    summarize(...)}, "methods": [...], "figures": [figure data of the first `figure_cases` cases]}. The figure
    data holds arrays (for `report`), everything else is JSON-ready.
  """
  if len(source) == 0:
    raise EvaluationError("the split has no examples")
  methods = ([MODEL] if predict_fn is not None else []) + [IDENTITY]
  cases, flat, figures = collections.OrderedDict(), {m: [] for m in methods}, []
  index = case_index(source)
  n_cases = min(len(index), max_cases) if max_cases else len(index)
  progress = progress_lib.Progress("evaluating", n_cases, "cases", emit=logging.info)
  for n, case in enumerate(iter_cases(source, max_cases, index)):
    virtuals = {}
    if predict_fn is not None:
      virtuals[MODEL] = virtual_hu(predict_case(predict_fn, case, window, batch_size), case.current_pre_hu,
                                   window)
    virtuals[IDENTITY] = case.current_pre_hu.astype(np.float32)
    results = {m: case_metrics(case, virtuals[m], window) for m in methods}
    cases[case.case_id] = {"slices": len(case.slice_index), "methods": results}
    for m in methods:
      flat[m].append(flatten(results[m]))
    if n < figure_cases:
      figures.append(_figure_data(case, virtuals[methods[0]]))
    logging.info("case %d/%d %s (%d slices): %s", n + 1, n_cases, case.case_id[:12], len(case.slice_index),
                 ", ".join(f"{m} MAE {results[m]['hu']['mae']:.1f} HU" for m in methods))
    progress.update(n + 1)
  return {"methods": methods, "cases": cases, "overall": {m: summarize(flat[m]) for m in methods},
          "figures": figures}


def _figure_data(case: Case, virtual: np.ndarray) -> dict:
  """What the Figure-7-style views need: the volumes of one case (HU) and its voxel spacing."""
  return {"case_id": case.case_id, "pre": case.current_pre_hu.astype(np.float32),
          "real": case.post_hu.astype(np.float32), "virtual": virtual, "body_mask": case.body_mask,
          "pixel_spacing_mm": case.pixel_spacing_mm, "slice_spacing_mm": case.slice_spacing_mm}


# ------------------------------------------------------------------------------------------------ eval mode
def run(config, workdir: str) -> dict:
  """Evaluation mode: the generator of `config.eval.checkpoint` on the cases of `config.eval.split`.

  Reads `config.eval.{checkpoint, split, batch_size, max_cases, report_dir}`, `config.phase` (must be the
  checkpoint's phase) and `config.data.dir`. The data are `config.data.dir`, else the checkpoint's own
  `data.dir`, else the embedded phantom made with the checkpoint's phantom settings under `workdir/data` (the
  same cases as in training, so its test split is held out).

  Returns:
    {"report_dir", "files" (written paths), "phase", "split", "step", "checkpoint", "cases" (count), "overall"
    (method -> key -> {mean, std, n})}.

  Raises:
    EvaluationError: no checkpoint configured or found, a phase mismatch, a split without examples, or records of
      another image size than the model's.
  """
  from vcect_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vcect_jax import report  # pylint: disable=g-import-not-at-top

  ev = config.eval
  if not ev.checkpoint:
    raise EvaluationError("set --config.eval.checkpoint to a training work directory, its checkpoints/ folder "
                          "or one step folder (checkpoints/<step>)")
  if not epath.Path(ev.checkpoint).exists():  # local or gs://
    raise EvaluationError(f"config.eval.checkpoint={ev.checkpoint!r} does not exist")
  try:  # the config first (cheap): a wrong phase or data fails before the generator is built
    checkpoint_dir, step = checkpoint.resolve(ev.checkpoint)
    model_config = checkpoint.read_config(checkpoint_dir, step)
  except FileNotFoundError as e:
    raise EvaluationError(str(e)) from e
  phase = model_config.phase
  if config.phase != phase:
    raise EvaluationError(
        f"the checkpoint {ev.checkpoint} was trained for the {phase} phase, but the config asks for "
        f"{config.phase}: evaluate it with --config=configs/{phase}.py, or give a {config.phase} checkpoint")
  window = hu.Window.from_config(model_config.data.window)

  data_dir = _data_dir(config, model_config, workdir)
  source = _load_split(data_dir, phase, ev.split)
  size = np.asarray(source[0]["post"]).shape[-1]
  if size != int(model_config.data.image_size):
    raise EvaluationError(
        f"the {phase} records in {data_dir} are {size} px, the model was trained on "
        f"{model_config.data.image_size} px: convert the data at that size (--image_size) or give matching data")
  loaded = checkpoint.load_generator(ev.checkpoint)

  logging.info("Evaluating %s (step %d, %s phase) on the %s split of %s (%d slices)", loaded.path, loaded.step,
               phase, ev.split, data_dir, len(source))
  results = evaluate_source(source, make_predict_fn(loaded.generator), window, batch_size=int(ev.batch_size),
                            max_cases=int(ev.max_cases))
  encoder = _pretext_encoder(model_config)
  if encoder is not None:
    add_perceptual_heatmaps(results["figures"], encoder, window)
  results.update({"phase": phase, "split": ev.split, "step": loaded.step, "checkpoint": loaded.path,
                  "data_dir": checkpoint.absolute(data_dir),
                  "window": {"level": window.level, "width": window.width},
                  "method": model_config.get("method", "dual_path_gan")})
  report_dir = ev.report_dir or os.path.join(workdir, "report")
  files = report.write_report(results, report_dir)
  logging.info("Report written to %s", report_dir)
  return {"report_dir": report_dir, "files": files, "phase": phase, "split": ev.split, "step": loaded.step,
          "checkpoint": loaded.path, "cases": len(results["cases"]), "overall": results["overall"]}


def add_perceptual_heatmaps(figures: list[dict], encoder, window: hu.Window) -> None:
  """Adds `heatmaps` (4, H, W) to each figure case: the perceptual heatmaps (paper Figure 5) of its middle slice.

  A heatmap is the channel mean of the squared difference between the frozen pretext encoder's features of the
  virtual and the real slice, per encoder block (/2, /4, /8, /16), resized to the image
  (`models.perceptual.heatmaps`): where the perceptual loss still sees the virtual image differ.
  """
  from vcect_jax.models import perceptual  # pylint: disable=g-import-not-at-top

  for case in figures:
    middle = len(case["real"]) // 2
    virtual = hu.hu_to_model(case["virtual"][middle], window)[None, ..., None].astype(np.float32)
    real = hu.hu_to_model(case["real"][middle], window)[None, ..., None].astype(np.float32)
    case["heatmaps"] = np.moveaxis(np.asarray(perceptual.heatmaps(encoder, virtual, real))[0], -1, 0)


def _pretext_encoder(model_config):
  """The frozen pretext encoder the model was trained with, or None (no perceptual loss, or not found)."""
  path = model_config.perceptual.get("pretext_checkpoint", "")
  if not model_config.loss.use_perceptual or not path or not epath.Path(path).is_dir():  # local or gs://
    logging.info("No pretext encoder (%r): no perceptual heatmaps in the report", path)
    return None
  from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

  try:
    return pretrain.load_pretext_encoder(path, model_config)
  except (FileNotFoundError, ValueError) as e:
    logging.warning("The pretext encoder in %s cannot be loaded (%s): no perceptual heatmaps", path, e)
    return None


def _data_dir(config, model_config, workdir: str) -> str:
  """The converted dataset to evaluate on (see `run`)."""
  for candidate, what in ((config.data.dir, "config.data.dir"), (model_config.data.dir, "the checkpoint's data.dir")):
    if candidate:
      if not epath.Path(candidate).is_dir():  # local or cloud (gs://) path
        raise EvaluationError(f"{what}={candidate!r} does not exist: give the --output folder of "
                              "`python -m data_prep.convert`")
      return candidate
  from data_prep import prepare  # pylint: disable=g-import-not-at-top

  return prepare.ensure_dataset(model_config, workdir)


def _load_split(data_dir: str, phase: str, split: str):
  from vcect_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  try:
    source = input_pipeline.load_source(data_dir, phase, split)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise EvaluationError(f"cannot read the {split} split of the {phase} records in {data_dir}: {e}") from e
  if len(source) == 0:
    raise EvaluationError(f"the {split} split of the {phase} records in {data_dir} has no examples: choose "
                          "another --config.eval.split, or convert more cases")
  return source
