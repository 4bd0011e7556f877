"""How well each converter alignment option pairs contrast slices with non-contrast slices, on the phantom (issue 12).

  python -m benchmarks.align_bench [--cases 4] [--seed 7] [--size 128] [--slices 16] [--pixel_spacing 3.0]
      [--options paper,resample,local,bspline,demons]

The phantom knows the truth: every phase has its own organ labels, rendered with that phase's motion (rigid
in-plane, table shift, breathing shift of liver, spleen and kidneys, bowel deformation; `motion.json`). Each
contrast phase's organ masks travel through exactly the transforms the converter applies to its HU volume
(`data_prep.register.align_volume`), and are compared with the non-contrast labels on the slices the option pairs:
  dice:         per organ, volume Dice of the warped contrast mask against the non-contrast mask;
  residual_mm:  per organ, 3-D distance between the two masks' centroids (mm);
  kept:         slices that pass the 6 px rule (the residual with the deformable step);
  s/case:       alignment time per case and phase (offset estimate + pairing + ECC + deformable step);
  enhancement kept: per phase and enhancing organ, the enhancement the aligned pairs keep: over the non-contrast organ
                mask of the paired slices, sum(paired contrast HU - non-contrast HU) / sum(the same with the
                contrast series the phantom renders without motion). 1 when the pairs show each organ's true
                enhancement where the non-contrast slice has the organ; a model trained on the pairs learns from
                that share (the rest of the organ's pixels teach it "no enhancement"). With `--record_size N`
                it is measured on the N-pixel slices the converter writes (HU area-averaged, labels nearest, as
                `data_prep.slices.resize_square` does): what a model of that size learns from (the demo's 96 px).
  pair error:   per phase and enhancing organ, what the pairs' misalignment adds to the target a model learns: the
                phantom rendered without noise (the same motion) travels through the same transforms, and over the
                non-contrast organ mask of the paired slices its mean absolute difference from the contrast series
                rendered without noise and without motion is reported (HU; at `--record_size`), with the share of
                pixels off by more than 50 HU and, for scale, the organ's mean true enhancement there. 0 for
                perfect pairs: noise is not part of it.
  pair halo:    the same error signed, 2-4 px in from each organ's edge and deeper in (`edge_bands`): pairs that
                cut a breathing organ at another level are off near its edge more than deep inside, and a model
                learns that halo (benchmarks/RESULTS.md, issue 12, round 16). 0 / 0 for perfect pairs.
The input is `data_prep.phantom.synthesize_case` in memory (the same arrays the DICOM files hold).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from data_prep import align
from data_prep import register
from data_prep import slices
from data_prep.phantom import anatomy
from data_prep.phantom import cases as phantom_cases

ORGANS = ("aorta", "portal_vein", "liver", "spleen", "kidney_cortex", "collecting_system", "bladder", "pancreas",
          "bowel_wall")
OPTIONS = {
    "paper": register.Options(),
    "resample": register.Options(through_plane="resample"),
    "local": register.Options(through_plane="local"),
    "local5": register.Options(through_plane="local", local_reach_mm=5.0),
    "local_margin1": register.Options(through_plane="local", local_margin_hu=1.0),
    "local_sigma3": register.Options(through_plane="local", local_sigma_mm=3.0),
    "local_sigma8": register.Options(through_plane="local", local_sigma_mm=8.0),
    "local_shift3": register.Options(through_plane="local", local_shift_mm=3.0),
    "local_shift0": register.Options(through_plane="local", local_shift_mm=0.0),
    "local_clip30": register.Options(through_plane="local", local_clip_hu=(-200.0, 30.0)),
    "local+demons": register.Options(through_plane="local", deformable="demons", grid_mm=20.0, deformable_size=128),
    "bspline": register.Options(deformable="bspline"),
    "demons": register.Options(deformable="demons"),
    "resample+bspline": register.Options(through_plane="resample", deformable="bspline"),
    "resample+demons": register.Options(through_plane="resample", deformable="demons"),
}
DEFAULT_OPTIONS = ("paper", "resample", "local", "bspline", "demons")
PHASES = ("arterial", "portal", "delayed")


def organ_scores(warped: np.ndarray, reference: np.ndarray, slices: np.ndarray, pixel_spacing_mm: float,
                 slice_spacing_mm: float) -> tuple[float, float]:
  """(Dice, centroid distance in mm) of a warped soft mask (thresholded at 0.5) and a reference binary mask, over
  the paired `slices`; (nan, nan) when the organ is on none of them."""
  a, b = warped[slices] > 0.5, reference[slices] > 0
  if not b.any():
    return float("nan"), float("nan")
  dice = 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
  if not a.any():
    return float(dice), float("nan")
  scale = np.array([slice_spacing_mm, pixel_spacing_mm, pixel_spacing_mm])
  ca = np.array([c.mean() for c in np.nonzero(a)]) * scale
  cb = np.array([c.mean() for c in np.nonzero(b)]) * scale
  return float(dice), float(np.linalg.norm(ca - cb))


KEPT_ORGANS = ("aorta", "portal_vein", "liver", "spleen", "kidney_cortex", "collecting_system")


def measure_case(case, option: register.Options, max_misalignment_px: float = 6.0, still=None,
                 record_size: int = 0, truth=None) -> dict:
  """Per phase: organ -> (dice, residual_mm), kept slices, seconds; with `still` (the same case without motion)
  also organ -> (sum of the pairs' enhancement, sum of the true enhancement) over the non-contrast organ mask, on
  slices resized to `record_size` pixels as the converter writes them (0: the phantom's own size); with `truth`
  (the same case without noise, and without noise and motion) also organ -> (sum of |pair error|, pixels, pixels
  off by > 50 HU, sum of the true enhancement) (module docstring, "pair error")."""
  pre = case.hu["non_contrast"]
  masks = [align.body_mask(s) for s in pre]
  pre_labels = case.labels["non_contrast"]
  dz = case.slice_thickness
  out = {}
  for phase in PHASES:
    post, post_labels = case.hu[phase], case.labels[phase]
    t0 = time.perf_counter()
    offset, _ = align.estimate_z_offset(pre, case.slice_z["non_contrast"], post, case.slice_z[phase])
    carry = [(post_labels == anatomy.LABEL_IDS[o]).astype(np.float32) for o in ORGANS]
    result = register.align_volume(pre, case.slice_z["non_contrast"], post, case.slice_z[phase], masks, offset,
                                   case.pixel_spacing, option, carry=carry,
                                   carry_images=[] if truth is None else [truth[0].hu[phase].astype(np.float32)])
    seconds = time.perf_counter() - t0
    kept = np.array([p.index for p in result.pairs if p.excluded is None and p.rule_px <= max_misalignment_px],
                    int)
    paired = np.array([p.index for p in result.pairs if p.excluded is None], int)
    organs = {}
    for name, warped in zip(ORGANS, result.carried):
      organs[name] = organ_scores(warped, pre_labels == anatomy.LABEL_IDS[name], paired, case.pixel_spacing, dz)
    out[phase] = {"organs": organs, "kept": len(kept), "paired": len(paired), "slices": len(pre),
                  "seconds": seconds, "deformable_seconds": result.deformable_seconds}
    size = lambda image, nearest=False: (slices.resize_square(image, record_size, nearest, 0)  # noqa: E731
                                         if record_size else image)
    enhancement = {name: [0.0, 0.0] for name in KEPT_ORGANS}
    error = {name: [0.0, 0, 0, 0.0] for name in KEPT_ORGANS}
    halo = {name: [0.0, 0, 0.0, 0] for name in KEPT_ORGANS}
    for p in result.pairs if still is not None or truth is not None else ():
      if p.excluded is not None:
        continue
      labels = size(pre_labels[p.index], nearest=True)
      masks_by_organ = {name: labels == anatomy.LABEL_IDS[name] for name in KEPT_ORGANS}
      if still is not None:
        base_hu = size(pre[p.index].astype(np.float32))
        paired, true = size(p.post_hu.astype(np.float32)), size(still.hu[phase][p.index].astype(np.float32))
        for name, m in masks_by_organ.items():
          base = base_hu[m].astype(np.float64)
          enhancement[name][0] += float(np.sum(paired[m] - base))
          enhancement[name][1] += float(np.sum(true[m] - base))
      if truth is not None:
        paired = size(result.carried[-1][p.index])
        true = size(truth[1].hu[phase][p.index].astype(np.float32))
        base = size(truth[1].hu["non_contrast"][p.index].astype(np.float32))
        for name, m in masks_by_organ.items():
          e = np.abs(paired[m] - true[m]).astype(np.float64)
          error[name][0] += float(e.sum())
          error[name][1] += int(m.sum())
          error[name][2] += int(np.sum(e > 50.0))
          error[name][3] += float(np.sum(true[m] - base[m]))
          near, deep = edge_bands(m)
          halo[name][0] += float(np.sum(paired[near] - true[near]))
          halo[name][1] += int(near.sum())
          halo[name][2] += float(np.sum(paired[deep] - true[deep]))
          halo[name][3] += int(deep.sum())
    if still is not None:
      out[phase]["enhancement"] = enhancement
    if truth is not None:
      out[phase]["pair_error"] = error
      out[phase]["pair_halo"] = halo
  return out


def edge_bands(mask: np.ndarray, near_px: int = 2, deep_px: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """An organ mask's pixels (`(..., H, W)`, eroded in plane only) from `near_px` to `deep_px` pixels in from its
  edge, and deeper (square erosion; `benchmarks.quality.organ_regions` scores the model's error on the same bands)."""
  square = np.ones((1,) * (mask.ndim - 2) + (3, 3), bool)
  interior = ndimage.binary_erosion(mask, structure=square, iterations=near_px)
  deep = ndimage.binary_erosion(interior, structure=square, iterations=deep_px - near_px)
  return interior & ~deep, deep


def identity_case(case) -> dict:
  """The same scores without any alignment (slice i with slice i): how much motion there was to undo."""
  out = {}
  n = min(len(case.hu["non_contrast"]), *(len(case.hu[p]) for p in PHASES))
  for phase in PHASES:
    organs = {}
    for name in ORGANS:
      lab = anatomy.LABEL_IDS[name]
      organs[name] = organ_scores((case.labels[phase][:n] == lab).astype(np.float32),
                                  case.labels["non_contrast"][:n] == lab, np.arange(n), case.pixel_spacing,
                                  case.slice_thickness)
    out[phase] = {"organs": organs, "kept": n, "paired": n, "slices": n, "seconds": 0.0, "deformable_seconds": 0.0}
  return out


def summarize(results: list[dict]) -> dict:
  """Means over cases and phases: per organ (dice, residual_mm), kept fraction, seconds per case and phase."""
  rows = [r[p] for r in results for p in PHASES]
  organs = {}
  for name in ORGANS:
    d = np.array([r["organs"][name][0] for r in rows], float)
    m = np.array([r["organs"][name][1] for r in rows], float)
    organs[name] = (float(np.nanmean(d)) if np.isfinite(d).any() else float("nan"),
                    float(np.nanmean(m)) if np.isfinite(m).any() else float("nan"))
  return {"organs": organs, "kept": sum(r["kept"] for r in rows) / max(sum(r["slices"] for r in rows), 1),
          "seconds": float(np.mean([r["seconds"] for r in rows])),
          "deformable_seconds": float(np.mean([r["deformable_seconds"] for r in rows]))}


def table(summaries: dict[str, dict]) -> str:
  """One markdown table: an option per row; mean Dice and residual (mm) per organ, kept slices, seconds."""
  head = "| option | " + " | ".join(ORGANS) + " | mean Dice | mean residual mm | kept | s per phase |"
  lines = [head, "|" + "---|" * (len(ORGANS) + 5)]
  for name, s in summaries.items():
    dice = [s["organs"][o][0] for o in ORGANS]
    res = [s["organs"][o][1] for o in ORGANS]
    cells = [f"{d:.3f} / {r:.1f}" for d, r in zip(dice, res)]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.nanmean(dice):.3f} | {np.nanmean(res):.2f} | "
                 f"{s['kept']:.0%} | {s['seconds']:.2f} |")
  return "\n".join(lines)


def _organ_table(results: dict[str, list[dict]], key: str, cell) -> str:
  """One markdown table, a row per option and phase, a column per organ of `KEPT_ORGANS`: `cell(sums)` of the
  per-case lists `r[phase][key][organ]` summed over the cases (options without `key` are left out)."""
  lines = ["| option | phase | " + " | ".join(KEPT_ORGANS) + " |", "|" + "---|" * (len(KEPT_ORGANS) + 2)]
  for name, rows in results.items():
    if not rows or key not in rows[0][PHASES[0]]:
      continue
    for phase in PHASES:
      sums = [[sum(v) for v in zip(*(r[phase][key][organ] for r in rows))] for organ in KEPT_ORGANS]
      lines.append(f"| {name} | {phase} | " + " | ".join(cell(*s) for s in sums) + " |")
  return "\n".join(lines)


def kept_table(results: dict[str, list[dict]]) -> str:
  """Per option and phase, the enhancement the pairs keep per organ (pooled over cases)."""
  return _organ_table(results, "enhancement", lambda kept, true: f"{kept / true:.2f}" if abs(true) > 0 else "-")


def pair_error_table(results: dict[str, list[dict]]) -> str:
  """Per option and phase, the pairs' error per organ (pooled over cases): mean |error| HU, share of pixels off by
  > 50 HU, and the organ's mean true enhancement."""
  return _organ_table(results, "pair_error", lambda total, n, off, enhancement: (
      f"{total / n:.1f}, {off / n:.0%} ({enhancement / n:.0f})" if n else "-"))


def pair_halo_table(results: dict[str, list[dict]]) -> str:
  """Per option and phase, the pairs' mean signed error (HU, pooled over cases) 2-4 px in from each organ's edge and
  deeper: a positive difference is a halo the pairs teach (the organ brighter near its edge than its truth)."""
  return _organ_table(results, "pair_halo", lambda near, n_near, deep, n_deep: (
      f"{near / n_near:+.1f} / {deep / n_deep:+.1f}" if n_near and n_deep else "-"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", type=int, default=4)
  parser.add_argument("--first_case", type=int, default=0)
  parser.add_argument("--seed", type=int, default=7)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--slices", type=int, default=16)
  parser.add_argument("--slice_thickness", type=float, default=5.0)
  parser.add_argument("--pixel_spacing", type=float, default=3.0)
  parser.add_argument("--options", default=",".join(DEFAULT_OPTIONS), help=f"any of {','.join(OPTIONS)}")
  parser.add_argument("--record_size", type=int, default=0,
                      help="measure the enhancement kept on slices resized to this size, as the converter writes "
                           "them (0: the phantom's size)")
  args = parser.parse_args(argv)
  names = [o for o in args.options.split(",") if o]
  results = {"none (slice i with slice i)": [], **{n: [] for n in names}}
  for index in range(args.first_case, args.first_case + args.cases):
    geometry = (args.size, args.slices, args.slice_thickness, args.pixel_spacing)
    case = phantom_cases.synthesize_case(index, args.seed, *geometry)
    still = phantom_cases.synthesize_case(index, args.seed, *geometry, motion_scale=0.0)
    truth = (phantom_cases.synthesize_case(index, args.seed, *geometry, noise=False),
             phantom_cases.synthesize_case(index, args.seed, *geometry, motion_scale=0.0, noise=False))
    results["none (slice i with slice i)"].append(identity_case(case))
    for name in names:
      results[name].append(measure_case(case, OPTIONS[name], still=still, record_size=args.record_size,
                                        truth=truth))
    print(f"case {index} done", flush=True)
  print(f"phantom seed {args.seed}, cases {args.first_case}..{args.first_case + args.cases - 1}, {args.size} px x "
        f"{args.slices} slices, {args.pixel_spacing} mm x {args.slice_thickness} mm; cells: Dice / centroid residual "
        "(mm), mean over cases and the three contrast phases")
  print(table({n: summarize(r) for n, r in results.items()}))
  where = f" at {args.record_size} px (the records)" if args.record_size else ""
  print(f"\nenhancement kept by the pairs{where} (1 = each organ's true enhancement where the non-contrast slice has "
        "it), pooled over the cases:")
  print(kept_table(results))
  print(f"\npair error{where}: mean |paired - true| HU over the non-contrast organ mask without noise, share of "
        "pixels off by > 50 HU (the organ's mean true enhancement there, HU), pooled over the cases:")
  print(pair_error_table(results))
  print(f"\npair halo{where}: mean (paired - true) HU without noise 2-4 px in from the organ's edge / deeper in, "
        "pooled over the cases:")
  print(pair_halo_table(results))


if __name__ == "__main__":
  main()
