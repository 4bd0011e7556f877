"""Does the model learn contrast? Trains the demo for a phase on a phantom seed, evaluates it, prints one table.

  python -m benchmarks.quality --phase=arterial --seed=11 --workdir=/tmp/quality_arterial_11
      [--variant=demo] [--split=test] [--set train.steps=400 ...] [--data_dir=CONVERTED] [--reuse]

Training is `vcect_jax.runtime.dispatch` (mode 'train') on `configs/<phase>.py:<variant>` with
`data.phantom.seed = --seed` (the phantom generated and converted under `<workdir>/data`, unless `--data_dir`
names a conversion); evaluation is `vcect_jax.evaluate.run` (mode 'eval') on `--split`, whose report lands in
`<workdir>/report_<split>`. The table compares three predictions of the contrast slice, on the same records:

  model:    the trained generator, mapped to HU by evaluation's rule (`evaluate.virtual_hu`);
  identity: the non-contrast slice itself (what doing nothing scores);
  oracle:   the real contrast slice with each organ of the *non-contrast* slice's labels filled with that organ's
            mean HU in the real contrast slice: a model that knows where every organ is and exactly how much it
            enhances, on these pairs (noise-free inside organs; misalignment of the pair still counts against it).

Rows: whole-body MAE (HU, inside the body), PSNR (dB) and SSIM (HU mode, `vcect_jax.metrics.hu_metrics`), then for
each enhancing organ of the phase (real minus non-contrast at least 10 HU) the MAE inside the organ's non-contrast
label (HU) and the enhancement ratio (virtual - non-contrast) / (real - non-contrast) of the organ means (1: all of
the enhancement, 0: none). Values are means over the split's cases. The goals of issue 12 are checked below the
table: organ MAE at most 0.5x identity's, the key organs' ratio at least 0.7, whole-body metrics no worse than
identity's.
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
ENHANCING_ORGANS = ("aorta", "portal_vein", "liver", "spleen", "kidney_cortex", "collecting_system", "bladder")
KEY_ORGANS = {"arterial": ("aorta", "kidney_cortex"), "portal": ("kidney_cortex",), "delayed": ("collecting_system",)}
MIN_ENHANCEMENT_HU = 10.0


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


def organ_mae(virtual: np.ndarray, case: evaluate.Case) -> dict[str, float]:
  """organ -> MAE (HU) of `virtual` against the real contrast volume inside the organ's non-contrast label."""
  real = case.post_hu.astype(np.float32)
  out = {}
  for name in ENHANCING_ORGANS:
    inside = case.labels == metrics.ORGAN_LABELS[name]
    out[name] = float(np.abs(virtual[inside] - real[inside]).mean()) if inside.any() else math.nan
  return out


def score_split(source, predict_fn, window: hu.Window, batch_size: int = 8) -> dict[str, dict[str, float]]:
  """method -> {"hu/mae", "hu/psnr", "hu/ssim", "<organ>/mae", "<organ>/ratio", "<organ>/enhancement"}: means
  over the cases of `source` (nan skipped). `predict_fn` None: identity and oracle only."""
  per_method: dict[str, list[dict[str, float]]] = {}
  for case in evaluate.iter_cases(source):
    virtuals = {}
    if predict_fn is not None:
      virtuals[evaluate.MODEL] = evaluate.virtual_hu(evaluate.predict_case(predict_fn, case, window, batch_size),
                                                     case.current_pre_hu, window)
    virtuals[evaluate.IDENTITY] = case.current_pre_hu.astype(np.float32)
    virtuals[ORACLE] = oracle_hu(case)
    pre, real = case.current_pre_hu.astype(np.float32), case.post_hu.astype(np.float32)
    for method, virtual in virtuals.items():
      row = {f"hu/{k}": float(v) for k, v in metrics.hu_metrics(virtual, real, case.body_mask).items()}
      organs = metrics.organ_enhancement(virtual, real, pre, case.labels, min_enhancement_hu=MIN_ENHANCEMENT_HU)
      for name, mae in organ_mae(virtual, case).items():
        row[f"{name}/mae"] = mae
        row[f"{name}/ratio"] = organs[name]["enhancement_ratio"]
        row[f"{name}/enhancement"] = organs[name]["real_mean"] - organs[name]["pre_mean"]
      per_method.setdefault(method, []).append(row)
  return {m: {k: v["mean"] for k, v in evaluate.summarize(rows).items()} for m, rows in per_method.items()}


def enhancing_organs(scores: dict[str, dict[str, float]]) -> list[str]:
  """The organs of `ENHANCING_ORGANS` whose mean real enhancement is at least `MIN_ENHANCEMENT_HU`."""
  identity = scores[evaluate.IDENTITY]
  return [o for o in ENHANCING_ORGANS if abs(identity.get(f"{o}/enhancement", math.nan)) >= MIN_ENHANCEMENT_HU]


def goals(scores: dict[str, dict[str, float]], phase: str) -> dict[str, bool]:
  """The issue's goals for the model: name -> met."""
  model, identity = scores[evaluate.MODEL], scores[evaluate.IDENTITY]
  organs = enhancing_organs(scores)
  out = {f"{o} MAE <= 0.5x identity": model[f"{o}/mae"] <= 0.5 * identity[f"{o}/mae"] for o in organs}
  for o in KEY_ORGANS.get(phase, ()):
    if o in organs:
      out[f"{o} ratio >= 0.7"] = model[f"{o}/ratio"] >= 0.7
  out["whole-body MAE <= identity"] = model["hu/mae"] <= identity["hu/mae"]
  out["PSNR >= identity"] = model["hu/psnr"] >= identity["hu/psnr"]
  out["SSIM >= identity"] = model["hu/ssim"] >= identity["hu/ssim"]
  return out


def table(scores: dict[str, dict[str, float]]) -> str:
  """The markdown table of the module docstring."""
  methods = [m for m in (evaluate.MODEL, evaluate.IDENTITY, ORACLE) if m in scores]
  rows = [("whole-body MAE (HU)", "hu/mae", ".1f"), ("PSNR (dB)", "hu/psnr", ".2f"), ("SSIM", "hu/ssim", ".3f")]
  for o in enhancing_organs(scores):
    rows += [(f"{o} MAE (HU)", f"{o}/mae", ".1f"), (f"{o} enhancement ratio", f"{o}/ratio", ".2f")]
  gap = evaluate.MODEL in scores
  lines = ["| metric | " + " | ".join(methods) + (" | model - oracle |" if gap else " |"),
           "|---|" + "---|" * (len(methods) + gap)]
  for label, key, fmt in rows:
    cells = [format(scores[m].get(key, math.nan), fmt) for m in methods]
    if gap:
      cells.append(format(scores[evaluate.MODEL].get(key, math.nan) - scores[ORACLE].get(key, math.nan), "+" + fmt))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run(config, workdir: str, split: str = "test", train: bool = True) -> dict:
  """Trains `config` in `workdir` (unless `train` is False: an existing run), evaluates `split` through eval mode,
  and scores model, identity and oracle on the same records.

  Returns:
    {"scores": method -> key -> mean, "table": str, "goals": name -> bool, "eval": evaluate.run's result,
    "train_seconds": float, "data_dir": str}.
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
  eval_config.eval.report_dir = os.path.join(workdir, f"report_{split}")
  result = runtime.dispatch(eval_config, workdir)

  data_dir = config.data.dir or prepare.ensure_dataset(config, workdir)
  loaded = checkpoint.load_generator(workdir)
  window = hu.Window.from_config(loaded.config.data.window)
  source = input_pipeline.load_source(data_dir, config.phase, split)
  scores = score_split(source, evaluate.make_predict_fn(loaded.generator), window,
                       batch_size=int(config.eval.batch_size))
  reported = result["overall"][evaluate.MODEL]["hu/mae"]["mean"]
  if not math.isclose(reported, scores[evaluate.MODEL]["hu/mae"], rel_tol=1e-3, abs_tol=1e-3):
    raise AssertionError(f"eval mode's model MAE {reported} differs from the benchmark's "
                         f"{scores[evaluate.MODEL]['hu/mae']}: the two read different records")
  return {"scores": scores, "table": table(scores), "goals": goals(scores, config.phase), "eval": result,
          "train_seconds": seconds, "data_dir": data_dir}


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
  args = parser.parse_args(argv)
  config = build_config(args.phase, args.variant, args.seed, args.set, args.data_dir)
  out = run(config, args.workdir, args.split, train=not args.reuse)
  print(f"{args.phase}, phantom seed {args.seed}, :{args.variant} {' '.join(args.set)}, {args.split} split "
        f"({out['eval']['cases']} cases), training {out['train_seconds']:.0f} s")
  print(out["table"])
  for name, met in out["goals"].items():
    print(f"  {'met    ' if met else 'NOT met'}  {name}")
  return out


if __name__ == "__main__":
  main()
