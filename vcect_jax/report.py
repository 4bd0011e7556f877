"""The evaluation report: metrics as JSON and CSV, a Markdown table like the paper's Table 1, and figures.

`write_report(results, report_dir)` takes the dict of `evaluate.evaluate_source` (plus `phase`, `split`, `step`,
`checkpoint`, `window` added by `evaluate.run`) and writes, for phase P:

  metrics_P.json   everything: per case (and per slice) and overall, both modes, per organ. nan (not defined: an
                   empty mask, an absent organ) is written as null, inf (identical images) as the string "inf".
  metrics_P.csv    one row per (method, case, metric): columns method, case, metric, value, std, n; the overall
                   rows have case "overall", the mean in `value`, the standard deviation over cases in `std` and
                   the number of cases that had a value in `n`.
  table_P.md       mean +- std over cases: paper mode (Table 1's columns), HU mode, enhancement per organ; every
                   table with the identity row.
  figure7_P_axial.png, figure7_P_coronal.png
                   non-contrast | real | virtual | |virtual - real| (one row per case, W400/L30 and a colour bar),
                   the middle axial slice and a coronal reformat through the body's centre (through-plane flicker
                   shows there).
  enhancement_P.png
                   enhancement ratio per organ (mean +- std over cases), in HU and clipped to the window.

Figures need matplotlib (in requirements.txt); without it they are skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
from absl import logging
from etils import epath

from vcect_jax import metrics

PHASE_ABBREVIATIONS = {"arterial": "AP", "portal": "PP", "delayed": "DP"}
METHOD_NAMES = {"model": "Proposed", "identity": "Identity"}

# (flat key, column title, decimals): the paper's Table 1, then the HU-mode table.
PAPER_COLUMNS = (("paper/psnr", "PSNR (dB) ↑", 2), ("paper/ssim", "SSIM ↑", 3), ("paper/mse", "MSE ↓", 0),
                 ("paper/snu", "SNU ↓", 2))
HU_COLUMNS = (("hu/mae", "MAE (HU) ↓", 1), ("hu/psnr", "PSNR (dB) ↑", 2), ("hu/ssim", "SSIM ↑", 3),
              ("snu_roi/error", "ROI SNU error (HU) ↓", 1), ("through_plane/excess", "through-plane excess (HU) ↓",
                                                             1))
ORGAN_FIELDS = (("pre_mean", "non-contrast (HU)", 1), ("real_mean", "real (HU)", 1),
                ("virtual_mean", "virtual (HU)", 1), ("error", "error (HU)", 1),
                ("enhancement_ratio", "enhancement ratio", 2),
                ("enhancement_ratio_window", "ratio in window", 2))
DIFFERENCE_MAX_HU = 200.0  # top of the |virtual - real| colour scale


def write_report(results: dict, report_dir: str) -> list[str]:
  """Writes every report file for one phase; returns their paths."""
  epath.Path(report_dir).mkdir(parents=True, exist_ok=True)  # a local or gs:// path
  phase = results.get("phase", "unknown")
  files = [write_json(results, os.path.join(report_dir, f"metrics_{phase}.json")),
           write_csv(results, os.path.join(report_dir, f"metrics_{phase}.csv")),
           write_table(results, os.path.join(report_dir, f"table_{phase}.md"))]
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    logging.warning("matplotlib is not installed: no figures (pip install matplotlib)")
    return files
  window = _window(results)
  if results.get("figures"):
    for view in ("axial", "coronal"):
      files.append(figure_cases(results["figures"], os.path.join(report_dir, f"figure7_{phase}_{view}.png"),
                                view=view, window=window, title=_title(results)))
    if all("heatmaps" in case for case in results["figures"]):
      files.append(figure_perceptual(results["figures"], os.path.join(report_dir, f"figure5_{phase}.png"),
                                     window=window, title=_title(results)))
  if "model" in results["overall"]:
    files.append(figure_enhancement(results["overall"]["model"],
                                    os.path.join(report_dir, f"enhancement_{phase}.png"), title=_title(results)))
  return files


# ------------------------------------------------------------------------------------------------ numbers
def jsonable(tree):
  """Nested dicts/lists of numbers -> JSON-ready: numpy scalars to Python, nan to None, inf to "inf"."""
  if isinstance(tree, dict):
    return {str(k): jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [jsonable(v) for v in tree]
  if isinstance(tree, (np.integer, np.bool_)):
    return tree.item()
  if isinstance(tree, (float, np.floating)):
    value = float(tree)
    if math.isnan(value):
      return None
    if math.isinf(value):
      return "inf" if value > 0 else "-inf"
    return value
  return tree


def _save(fig, path: str) -> None:
  """A figure as PNG at a local or gs:// path."""
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", bbox_inches="tight")


def write_json(results: dict, path: str) -> str:
  out = {k: v for k, v in results.items() if k != "figures"}
  out["conventions"] = {
      "null": "not defined (empty body mask, organ absent, no enhancement to learn, fewer than two ROIs)",
      "inf": "identical images (PSNR)",
      "overall": "mean, std and n over cases of each case's value; nan values skipped",
      "definitions": "see the docstrings of vcect_jax/metrics.py and vcect_jax/evaluate.py",
  }
  with epath.Path(path).open("w") as f:
    json.dump(jsonable(out), f, indent=1)
  return path


def write_csv(results: dict, path: str) -> str:
  from vcect_jax import evaluate  # pylint: disable=g-import-not-at-top

  f = io.StringIO(newline="")  # epath's open() (gs://) takes no newline argument
  writer = csv.writer(f)
  writer.writerow(["method", "case", "metric", "value", "std", "n"])
  for method in results["methods"]:
    for case_id, case in results["cases"].items():
      for key, value in evaluate.flatten(case["methods"][method]).items():
        writer.writerow([method, case_id, key, _csv_number(value), "", ""])
    for key, stats in results["overall"][method].items():
      writer.writerow([method, "overall", key, _csv_number(stats["mean"]), _csv_number(stats["std"]),
                       stats["n"]])
  epath.Path(path).write_text(f.getvalue())
  return path


def _csv_number(value: float) -> str:
  return "nan" if math.isnan(value) else repr(float(value))


def _mean_std(stats: dict | None, decimals: int) -> str:
  if not stats or not stats["n"]:
    return "–"
  mean, std = stats["mean"], stats["std"]
  if math.isinf(mean):
    return "inf"
  text = f"{mean:.{decimals}f}"
  return text if math.isnan(std) or stats["n"] < 2 else f"{text} ± {std:.{decimals}f}"


def _row_name(method: str, results: dict) -> str:
  abbreviation = PHASE_ABBREVIATIONS.get(results.get("phase", ""), results.get("phase", ""))
  name = f"{METHOD_NAMES.get(method, method)}-{abbreviation}"
  if method == "model" and "step" in results:
    name += f" (step {results['step']})"
  return name


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_table(results: dict, path: str) -> str:
  """table_P.md: mean +- std over cases, with the identity row (see the module docstring)."""
  n_cases = len(results["cases"])
  window = _window(results)
  lines = [f"# {_title(results)}", "",
           f"{n_cases} cases of the `{results.get('split', '?')}` split; mean ± std over cases. Checkpoint: "
           f"`{results.get('checkpoint', '-')}`. Identity = the non-contrast input used as the prediction.", "",
           f"## Paper mode (8-bit images, window {window.label}; the paper's Table 1)", ""]
  rows = [[_row_name(m, results)] + [_mean_std(results["overall"][m].get(k), d) for k, _, d in PAPER_COLUMNS]
          for m in results["methods"]]
  lines += _table(["Method"] + [t for _, t, _ in PAPER_COLUMNS], rows)
  lines += ["", f"## HU mode (clipped to [{metrics.HU_CLIP[0]:g}, {metrics.HU_CLIP[1]:g}] HU, inside the body; "
            f"PSNR range {metrics.HU_DATA_RANGE:g} HU)", ""]
  rows = [[_row_name(m, results)] + [_mean_std(results["overall"][m].get(k), d) for k, _, d in HU_COLUMNS]
          for m in results["methods"]]
  lines += _table(["Method"] + [t for _, t, _ in HU_COLUMNS], rows)
  lines += ["", "## Enhancement per organ", "",
            "Enhancement ratio = (virtual − non-contrast) / (real − non-contrast) of the organ's mean HU: 1 = the "
            "enhancement is learned, 0 = none (the identity). 'ratio in window': all three clipped to the window "
            "first, i.e. against what the model can express.", ""]
  rows = []
  for method in results["methods"]:
    overall = results["overall"][method]
    for organ in metrics.ORGAN_LABELS:
      if not overall.get(f"organ/{organ}/voxels", {}).get("mean"):
        continue
      rows.append([_row_name(method, results), organ]
                  + [_mean_std(overall.get(f"organ/{organ}/{field}"), d) for field, _, d in ORGAN_FIELDS]
                  + [str(overall[f"organ/{organ}/virtual_mean"]["n"])])
  if rows:
    lines += _table(["Method", "Organ"] + [t for _, t, _ in ORGAN_FIELDS] + ["cases"], rows)
  else:
    lines.append("No organ labels in these records.")
  lines.append("")
  with epath.Path(path).open("w") as f:
    f.write("\n".join(lines))
  return path


def _title(results: dict) -> str:
  return f"{results.get('phase', '?')} phase, {results.get('split', '?')} split, step {results.get('step', '?')}"


def _window(results: dict):
  from vcect_jax import hu  # pylint: disable=g-import-not-at-top

  w = results.get("window") or {}
  return hu.Window(level=w.get("level", hu.DEFAULT_LEVEL), width=w.get("width", hu.DEFAULT_WIDTH))


# ------------------------------------------------------------------------------------------------ figures
def _figure(width_in: float, height_in: float):
  """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(width_in, height_in), dpi=110)
  FigureCanvasAgg(fig)
  return fig


def _view(volume: np.ndarray, view: str, row: int) -> np.ndarray:
  """(S, H, W) -> the middle axial slice (H, W) or the coronal reformat at `row` (S, W)."""
  return volume[len(volume) // 2] if view == "axial" else volume[:, row, :]


def figure_cases(figures: list[dict], path: str, view: str = "axial", window=None, title: str = "") -> str:
  """Figure-7-style grid: one row per case, columns non-contrast | real | virtual | |virtual - real|.

  Args:
    figures: per case {"case_id", "pre", "real", "virtual" (S, H, W) HU, "body_mask", "pixel_spacing_mm",
      "slice_spacing_mm"} (from `evaluate`).
    view: "axial" (the middle slice) or "coronal" (a reformat through the row at the body's centre of mass,
      drawn at its true aspect ratio).
    window: the display window of the first three columns (default W400/L30).
  """
  from vcect_jax import hu  # pylint: disable=g-import-not-at-top

  window = window or hu.Window()
  n = len(figures)
  panels = []  # per case: the three images of the view, and the aspect they are drawn at
  for case in figures:
    mask = np.asarray(case["body_mask"])
    rows = np.nonzero(mask.any(axis=(0, 2)))[0]
    row = int(np.round(np.average(np.arange(mask.shape[1]), weights=mask.sum(axis=(0, 2))))) if len(rows) else (
        mask.shape[1] // 2)
    aspect = 1.0
    if view == "coronal" and case["pixel_spacing_mm"] > 0 and np.isfinite(case["slice_spacing_mm"]):
      aspect = case["slice_spacing_mm"] / case["pixel_spacing_mm"]
    panels.append(([_view(np.asarray(case[k]), view, row) for k in ("pre", "real", "virtual")], aspect))
  # Rows as tall as their images are drawn (a coronal reformat of a short scan is a strip, not a square).
  heights = [min(1.0, image[0].shape[0] * aspect / max(image[0].shape[1], 1)) for image, aspect in panels]
  height = sum(0.45 + 2.15 * h for h in heights) + 0.6
  fig = _figure(11.0, height)
  # Margins in inches, not fractions of the height: a tall grid of many cases keeps the title next to it.
  fig.subplots_adjust(wspace=0.3, top=1.0 - 0.7 / height, bottom=0.35 / height)
  axes = fig.subplots(n, 4, squeeze=False, gridspec_kw={"height_ratios": heights})
  columns = ("non-contrast", "real", "virtual", "|virtual − real| (HU)")
  for i, (case, (images, aspect)) in enumerate(zip(figures, panels)):
    for j, image in enumerate(images):
      grey = axes[i, j].imshow(image, cmap="gray", vmin=window.low, vmax=window.high, aspect=aspect,
                               interpolation="nearest")
    diff = axes[i, 3].imshow(np.abs(images[2] - images[1]), cmap="magma", vmin=0, vmax=DIFFERENCE_MAX_HU,
                             aspect=aspect, interpolation="nearest")
    for j, image in ((2, grey), (3, diff)):  # colour bars in inset axes: the panels keep their size
      bar = fig.colorbar(image, cax=axes[i, j].inset_axes([1.03, 0.0, 0.05, 1.0]))
      bar.ax.tick_params(labelsize=7)
    axes[i, 0].set_ylabel(case["case_id"][:10], fontsize=8)
    for j in range(4):
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
      if i == 0:
        axes[i, j].set_title(columns[j], fontsize=9)
  fig.suptitle(f"{title} — {view}, {window.label}", fontsize=10)
  _save(fig, path)
  return path


def figure_enhancement(overall: dict, path: str, title: str = "") -> str:
  """Bar chart of the enhancement ratio per organ (mean ± std over cases), in HU and within the window."""
  organs = [o for o in metrics.ORGAN_LABELS
            if overall.get(f"organ/{o}/enhancement_ratio", {}).get("n")
            or overall.get(f"organ/{o}/enhancement_ratio_window", {}).get("n")]
  fig = _figure(max(5.0, 0.75 * len(organs) + 2), 3.8)
  ax = fig.subplots()
  if not organs:
    ax.text(0.5, 0.5, "no organ with labels and enhancement", ha="center", va="center")
    ax.set_axis_off()
  else:
    x = np.arange(len(organs))
    for offset, field, label, colour in ((-0.2, "enhancement_ratio", "HU", "tab:blue"),
                                         (0.2, "enhancement_ratio_window", "within the window", "tab:orange")):
      stats = [overall.get(f"organ/{o}/{field}", {"mean": math.nan, "std": math.nan}) for o in organs]
      means = np.array([s["mean"] for s in stats], float)
      stds = np.nan_to_num(np.array([s["std"] for s in stats], float))
      ax.bar(x + offset, np.nan_to_num(means), 0.4, yerr=stds, label=label, color=colour, capsize=2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([o.replace("_", " ") for o in organs], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("(virtual − pre) / (real − pre)")
    ax.legend(fontsize=8, loc="best")
    ax.text(0.01, 0.97, "1: enhancement learned; 0: none (identity)", transform=ax.transAxes, fontsize=7,
            va="top")
  ax.set_title(f"Enhancement ratio per organ — {title}", fontsize=10)
  _save(fig, path)
  return path


def figure_perceptual(figures: list[dict], path: str, window=None, title: str = "") -> str:
  """Figure-5-style grid: one row per case, virtual | real | heatmaps of encoder blocks /2, /4, /8, /16.

  Each heatmap has its own colour scale (the blocks' feature magnitudes differ by orders of magnitude).
  """
  from vcect_jax import hu  # pylint: disable=g-import-not-at-top

  window = window or hu.Window()
  n = len(figures)
  fig = _figure(14.0, 2.4 * n + 0.6)
  fig.subplots_adjust(wspace=0.35)
  axes = fig.subplots(n, 6, squeeze=False)
  columns = ("virtual", "real", "block /2", "block /4", "block /8", "block /16")
  for i, case in enumerate(figures):
    middle = len(case["real"]) // 2
    for j, key in enumerate(("virtual", "real")):
      axes[i, j].imshow(case[key][middle], cmap="gray", vmin=window.low, vmax=window.high, interpolation="nearest")
    for k, heat in enumerate(case["heatmaps"]):
      image = axes[i, 2 + k].imshow(heat, cmap="jet", interpolation="bilinear")
      bar = fig.colorbar(image, cax=axes[i, 2 + k].inset_axes([1.03, 0.0, 0.05, 1.0]))
      bar.ax.tick_params(labelsize=6)
    axes[i, 0].set_ylabel(case["case_id"][:10], fontsize=8)
    for j in range(6):
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
      if i == 0:
        axes[i, j].set_title(columns[j], fontsize=9)
  fig.suptitle(f"{title} — perceptual heatmaps (squared feature differences, channel mean)", fontsize=10)
  _save(fig, path)
  return path
