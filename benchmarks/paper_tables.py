"""The paper's Tables 1 and 2 on the phantom: train and evaluate the proposed model, its ablations and the baselines.

  python -m benchmarks.paper_tables --workdir=workdir/paper_tables [--variant=demo]
      [--phases=arterial,portal,delayed]
      [--rows=proposed,no_discriminator,no_perceptual,no_dual_path,pix2pix,cyclegan,cut]
      [--split=test] [--folds=5] [--set train.steps=400 ...] [--dry_run]

For every phase and row it trains `configs/<phase>.py:<variant>` (row `proposed`),
`configs/ablations/<row>.py:<phase>,<variant>` (the ablations) or `configs/baselines/<row>.py:<phase>,<variant>`
(the baselines pix2pix, CycleGAN and CUT), then evaluates the last checkpoint on `--split` with
`vcect_jax.evaluate` (which adds the identity baseline: the non-contrast input used as the prediction). Then:

  <workdir>/report/table1.md    per phase: proposed, the baselines and identity (the paper's Table 1 columns, plus
                                MAE in HU)
  <workdir>/report/table2.md    per phase: each ablation, proposed and identity (Table 2)
  <workdir>/report/tables.json  every overall number of every run

Layout: `<workdir>/data` (the phantom, shared by all runs), `<workdir>/pretrain` (one pretext encoder, shared; one
more under `<workdir>/window_W<width>_L<level>/` for each other CT window of the phases: the arterial and delayed `:demo`),
`<workdir>/<phase>/<row>/` (checkpoints, logs and `report/` of one run). A rerun skips the training of runs that
finished (`done.json`) and evaluates again; a finished run trained on other data than the work directory holds now
(the phantom is made again when the variant's settings change), or with other settings than its row's config now
(e.g. a `:demo` recipe changed since), stops the rerun with what to do. `--dry_run`
checks the machinery: the smoke variant, 2 steps per run.

Cross-validation (paper section 4.3.2): `--folds=K` runs everything once per fold (`data.fold=k`, the phantom
converted with fold k as the test split) under `<workdir>/fold_<k>/`, then writes the tables of each fold there and
`<workdir>/report/table1.md`, `table2.md` with mean ± std over the K folds of the per-fold means.

The phantom is not the paper's data: its contrast is a deterministic function of labels, its noise synthetic, its
cases few. Tables from it say whether the method learns the phantom's enhancement and how the ablations order,
not how it would do on patients; `benchmarks/RESULTS.md` carries the commentary with each recorded run.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import os
import sys
import time

from data_prep import cli_help

ABLATION_ROWS = ("no_discriminator", "no_perceptual", "no_dual_path")
BASELINE_ROWS = ("pix2pix", "cyclegan", "cut")  # configs/baselines/, Table 1 only
ROWS = ("proposed",) + ABLATION_ROWS + BASELINE_ROWS
ROW_NAMES = {"proposed": "Proposed", "no_discriminator": "w/o Discr.", "no_perceptual": "w/o Perc.",
             "no_dual_path": "w/o Dual", "pix2pix": "pix2pix", "cyclegan": "CycleGAN", "cut": "CUT",
             "identity": "Identity"}
PHASES = ("arterial", "portal", "delayed")
ABBREVIATIONS = {"arterial": "AP", "portal": "PP", "delayed": "DP"}
COLUMNS = (("paper/psnr", "PSNR ↑", 2), ("paper/ssim", "SSIM ↑", 3), ("paper/mse", "MSE ↓", 0),
           ("paper/snu", "SNU ↓", 2), ("hu/mae", "MAE (HU) ↓", 1), ("organ/aorta/enhancement_ratio_window",
                                                                      "aorta ratio ↑", 2))
# The paper's Table 1 (proposed; real patients, per-slice min-max 8-bit images): for orientation only.
PAPER_TABLE1 = {"arterial": ("19.09 ± 1.88", "0.63 ± 0.05", "194 ± 19", "0.25 ± 0.09"),
                "portal": ("19.79 ± 1.17", "0.65 ± 0.05", "226 ± 29", "0.34 ± 0.16"),
                "delayed": ("17.23 ± 1.59", "0.65 ± 0.05", "244 ± 22", "0.46 ± 0.14")}


def row_config(row: str, phase: str, variant: str):
  """The config of one table row: the phase config, an ablation of it, or a baseline on its data."""
  if row == "proposed":
    return importlib.import_module(f"configs.{phase}").get_config(variant or None)
  if row in BASELINE_ROWS:
    return importlib.import_module(f"configs.baselines.{row}").get_config(f"{phase},{variant}")
  from configs import ablations  # pylint: disable=g-import-not-at-top

  return ablations.get_config(row, f"{phase},{variant}")


def _override(config, assignments: list[str]) -> None:
  for item in assignments:
    field, value = item.split("=", 1)
    *sections, name = field.split(".")
    target = config
    for section in sections:
      target = target[section]
    try:
      target[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      target[name] = value


def shared_inputs(args) -> tuple[str, dict]:
  """(data.dir, {phase: pretext checkpoint}) made once under the work directory for every run: one pretext encoder
  per CT window (`pretrain.pretext_per_window`; the arterial and delayed `:demo` have their own windows)."""
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top
  from vcect_jax import runtime  # pylint: disable=g-import-not-at-top

  config = row_config("proposed", args.phases[0], args.variant)
  _override(config, args.set)
  data_dir = prepare.ensure_dataset(config.copy_and_resolve_references(), args.workdir)
  pretexts, made = {}, {}
  for phase in args.phases:
    config = row_config("proposed", phase, args.variant)
    _override(config, args.set)
    with config.unlocked():
      config.data.dir = data_dir
    pretexts[phase] = (pretrain.pretext_per_window(config, args.workdir, made) if runtime.pretrains_first(config)
                       else config.perceptual.pretext_checkpoint)
  return data_dir, pretexts


def trained_on(config, data_dir: str) -> dict:
  """What a run's training data was: the records' folder and the settings that made them (the phantom's, as the
  data's `settings.json` stamp has them), kept in the run's `done.json`."""
  from data_prep import prepare  # pylint: disable=g-import-not-at-top

  return {"dir": os.path.abspath(data_dir), "settings": prepare.phantom_settings(config)}


# Settings that do not change what a run trains (where it is written, how often it logs, how it is evaluated):
# a rerun may differ in them and still reuse the run.
_NOT_RECIPE = ("mode", "eval", "distributed", "data.dir", "perceptual.pretext_checkpoint", "input.worker_count",
               "train.log_every", "train.image_every", "train.eval_every", "train.eval_examples",
               "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoints")


def recipe(config) -> dict:
  """The settings a run was trained with, flattened to dotted keys (JSON values, as a checkpoint keeps its config),
  kept in the run's `done.json`."""
  from vcect_jax import checkpoint  # pylint: disable=g-import-not-at-top

  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if name in _NOT_RECIPE:
        continue
      if isinstance(value, dict):
        walk(name + ".", value)
      else:
        flat[name] = value

  walk("", checkpoint.config_to_json(config))
  return flat


def check_reusable(done: str, data: dict, settings: dict | None = None) -> None:
  """Refuses to reuse a finished run that was trained on other data than the work directory's now (the phantom is
  made again when the variant's settings change, e.g. its number of cases): its test split could hold the run's own
  training cases, and its row would not be comparable with the others. With `settings` (the row's `recipe` now),
  refuses a run trained with other settings too (e.g. a `:demo` recipe changed since), naming them; settings that
  the run's record lacks (options added since) are not compared, and a run recorded before the recipe was kept is
  reused with a warning."""
  with open(done) as f:
    record = json.load(f)
  recorded = record.get("data")
  run_dir = os.path.dirname(done)
  if recorded != data:
    was = "not recorded (a run from before this check)" if recorded is None else json.dumps(recorded["settings"])
    raise SystemExit(f"paper_tables: {run_dir} finished on other training data than this work directory's now "
                     f"(its data: {was}; now: {json.dumps(data['settings'])} in {data['dir']}). Delete that run "
                     "folder to train it again on the current data, or use a fresh --workdir.")
  if settings is None:
    return
  trained = record.get("recipe")
  if trained is None:
    print(f"paper_tables: {run_dir} does not record the settings it was trained with (a run from before this "
          "check): reused as it is; delete that run folder if its config has changed since.", file=sys.stderr)
    return
  changed = sorted(key for key in settings.keys() & trained.keys() if settings[key] != trained[key])
  if changed:
    shown = "; ".join(f"{key}: {json.dumps(trained[key])} -> {json.dumps(settings[key])}" for key in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise SystemExit(f"paper_tables: {run_dir} was trained with other settings than its row's config now ({shown}"
                     f"{more}). Delete that run folder to train it again with the current config, or use a fresh "
                     "--workdir.")


def run_one(row: str, phase: str, args, data_dir: str, pretext: str) -> dict:
  """Trains (unless done) and evaluates one row of one phase; returns the evaluation's overall numbers."""
  from vcect_jax import evaluate  # pylint: disable=g-import-not-at-top
  from vcect_jax import hu  # pylint: disable=g-import-not-at-top
  from vcect_jax import train  # pylint: disable=g-import-not-at-top

  config = row_config(row, phase, args.variant)
  _override(config, args.set)
  config.data.dir = data_dir
  config.perceptual.pretext_checkpoint = pretext
  run_dir = os.path.join(args.workdir, phase, row)
  done = os.path.join(run_dir, "done.json")
  data = trained_on(config, data_dir)
  settings = recipe(config)
  timings = {}
  if os.path.exists(done):
    check_reusable(done, data, settings)
  else:
    start = time.time()
    train.train_and_evaluate(config, run_dir)
    timings["train_s"] = time.time() - start
    with open(done, "w") as f:
      json.dump({**timings, "data": data, "recipe": settings}, f)
  config.mode = "eval"
  config.eval.checkpoint = run_dir
  config.eval.split = args.split
  config.eval.report_dir = os.path.join(run_dir, "report")
  start = time.time()
  result = evaluate.run(config, run_dir)
  timings["eval_s"] = time.time() - start
  window = hu.Window.from_config(config.data.window).label
  return {"overall": result["overall"], "cases": result["cases"], "step": result["step"], "timings": timings,
          "window": window}


def _cell(stats: dict | None, decimals: int) -> str:
  if not stats or not stats.get("n"):
    return "–"
  mean, std = stats["mean"], stats["std"]
  if math.isinf(mean):
    return "inf"
  return f"{mean:.{decimals}f}" if stats["n"] < 2 or math.isnan(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _rows_markdown(phase: str, rows: list[str], results: dict) -> list[str]:
  lines = []
  for row in rows:
    if row not in results[phase]:
      continue
    overall = results[phase][row]["overall"]["model"]
    lines.append(f"| {ROW_NAMES[row]}-{ABBREVIATIONS[phase]} | "
                 + " | ".join(_cell(overall.get(k), d) for k, _, d in COLUMNS) + " |")
  any_run = next((r for r in results[phase].values()), None)
  if any_run:
    overall = any_run["overall"]["identity"]
    lines.append(f"| Identity-{ABBREVIATIONS[phase]} | "
                 + " | ".join(_cell(overall.get(k), d) for k, _, d in COLUMNS) + " |")
  return lines


def write_tables(results: dict, args) -> list[str]:
  """table1.md, table2.md and tables.json under <workdir>/report."""
  out_dir = os.path.join(args.workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  header = ["| Method | " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
  cases = {p: next(iter(r.values()))["cases"] for p, r in results.items() if r}
  if getattr(args, "folds", 0) > 1:
    spread = f"{args.folds}-fold cross-validation; mean ± std over the folds of each fold's mean over its cases"
  else:
    spread = f"{', '.join(f'{p}: {n} cases' for p, n in cases.items())}; mean ± std over cases"
  windows = {p: sorted({run.get("window") or "W400/L30" for run in r.values()}) for p, r in results.items() if r}
  windows = ", ".join(f"{p} {' and '.join(w)}" for p, w in windows.items())
  setting = (f"Phantom, variant `{args.variant or 'paper'}`, `{args.split}` split "
             f"({spread}). Paper-mode "
             f"columns on 8-bit images through each phase's CT window ({windows}); MAE in HU inside the body; "
             "aorta ratio = enhancement ratio of the aorta within the window (1: learned, 0: none). Definitions: "
             "vcect_jax/metrics.py.")
  table1 = ["# Table 1 analogue: proposed model, baselines and identity per phase", "", setting, ""] + header
  for phase in results:
    table1 += _rows_markdown(phase, ["proposed", *BASELINE_ROWS], results)
  table1 += ["", "The paper's Table 1 (proposed; real patients, per-slice min-max 8-bit images), for orientation "
             "only:", "", "| Phase | PSNR | SSIM | MSE | SNU |", "|---|---|---|---|---|"]
  table1 += [f"| {ABBREVIATIONS[p]} | " + " | ".join(PAPER_TABLE1[p]) + " |" for p in results]
  table2 = ["# Table 2 analogue: ablations per phase", "", setting, ""] + header
  for phase in results:
    table2 += _rows_markdown(phase, list(ABLATION_ROWS) + ["proposed"], results)
  paths = [os.path.join(out_dir, "table1.md"), os.path.join(out_dir, "table2.md"),
           os.path.join(out_dir, "tables.json")]
  for path, lines in zip(paths[:2], (table1, table2)):
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")
  from vcect_jax import report  # pylint: disable=g-import-not-at-top

  with open(paths[2], "w") as f:
    json.dump(report.jsonable({p: {r: {k: v for k, v in run.items()} for r, run in rows.items()}
                               for p, rows in results.items()}), f, indent=1)
  return paths


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_tables", description=__doc__,
                                   formatter_class=cli_help.HelpFormatter,
                                   epilog="example:\n  python -m benchmarks.paper_tables --workdir=workdir/paper_tables "
                                          "--variant=demo --phases=arterial --rows=proposed,pix2pix")
  parser.add_argument("--workdir", required=True, help="root of every run, the shared data and the tables")
  parser.add_argument("--variant", default="demo", help="run-size variant of configs/variants.py ('' = paper)")
  parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated contrast phases")
  parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated table rows (models) to train")
  parser.add_argument("--split", default="test", help="split every run is evaluated on")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override for every run, e.g. --set train.steps=400 (repeatable)")
  parser.add_argument("--folds", type=int, default=0,
                      help="K > 1: K-fold cross-validation, every run once per fold; tables of mean ± std over folds")
  parser.add_argument("--dry_run", action="store_true", help="smoke variant, 2 steps per run: machinery only")
  parser.add_argument("--finished_only", action="store_true",
                      help="train nothing: evaluate the runs that finished and write their tables")
  args = parser.parse_args()
  args.phases = [p for p in args.phases.split(",") if p]
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = sorted(set(args.phases) - set(PHASES)) + sorted(set(args.rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown phases or rows: {unknown}; phases {PHASES}, rows {ROWS}")
  if args.dry_run:
    args.variant = "smoke"
    args.set = ["train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "train.image_every=2",
                "train.log_every=2"] + args.set

  from vcect_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.quiet_library_logs()
  start = time.time()
  if args.folds > 1:
    per_fold = []
    for fold in range(args.folds):
      fold_args = argparse.Namespace(**vars(args))
      fold_args.workdir, fold_args.folds = os.path.join(args.workdir, f"fold_{fold}"), 0
      fold_args.set = args.set + [f"data.fold={fold}", f"data.num_folds={args.folds}"]
      print(f"[{time.time() - start:7.0f} s] fold {fold + 1}/{args.folds}", flush=True)
      per_fold.append(run_tables(fold_args, start))
    results = across_folds(per_fold)
  else:
    results = run_tables(args, start)
  for path in write_tables(results, args):
    print("wrote", path)
  print(f"total {time.time() - start:.0f} s")


def run_tables(args, start: float) -> dict:
  """Trains and evaluates every (phase, row) of `args`; writes the tables under `args.workdir/report`."""
  data_dir, pretexts = shared_inputs(args)
  results = {}
  for phase in args.phases:
    results[phase] = {}
    for row in args.rows:
      if args.finished_only and not os.path.exists(os.path.join(args.workdir, phase, row, "done.json")):
        continue
      print(f"[{time.time() - start:7.0f} s] {phase} / {row}", flush=True)
      results[phase][row] = run_one(row, phase, args, data_dir, pretexts[phase])
      mae = results[phase][row]["overall"]
      print(f"    MAE {mae['model']['hu/mae']['mean']:.1f} HU (identity {mae['identity']['hu/mae']['mean']:.1f}); "
            f"{results[phase][row]['timings']}", flush=True)
    write_tables(results, args)  # after every phase, so that a long run shows its tables as it goes
  return results


def across_folds(per_fold: list[dict]) -> dict:
  """Mean ± std over folds of each fold's mean (n = folds), in the layout `write_tables` reads."""
  out = {}
  for phase, rows in per_fold[0].items():
    out[phase] = {}
    for row, first in rows.items():
      overall = {}
      for who in ("model", "identity"):
        overall[who] = {}
        for key in first["overall"][who]:
          means = [f[phase][row]["overall"][who].get(key, {}).get("mean") for f in per_fold]
          means = [m for m in means if m is not None and not math.isnan(m)]
          if means:
            overall[who][key] = {"mean": float(sum(means) / len(means)), "n": len(means),
                                 "std": float(math.sqrt(sum((m - sum(means) / len(means)) ** 2 for m in means)
                                                        / max(len(means) - 1, 1))) if len(means) > 1 else
                                 float("nan")}
      out[phase][row] = {"overall": overall, "cases": f"{len(per_fold)} folds",
                         "step": first["step"], "timings": [f[phase][row]["timings"] for f in per_fold]}
  return out


if __name__ == "__main__":
  main()
