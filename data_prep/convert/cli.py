"""Command line of the conversion: ``python -m data_prep.convert --input=DICOM_ROOT --output=OUT [...]``."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from data_prep import phases as phases_lib
from data_prep import records
from data_prep.convert import job
from data_prep.convert import shards
from data_prep.convert.plan import Settings


def parse_args(argv: list[str] | None) -> Settings:
  """The settings of the command line ``argv`` (``sys.argv[1:]`` when None); also sets up logging."""
  p = argparse.ArgumentParser(
      prog="python -m data_prep.convert",
      description="Offline conversion: DICOM studies -> paired, aligned 2.5D records in sharded TFDS format.")
  p.add_argument("--input", required=True, help="root folder of the DICOM studies (searched recursively)")
  p.add_argument("--output", required=True, help="output folder (manifest.json and one folder per phase)")
  p.add_argument("--phases", default=",".join(phases_lib.CONTRAST_PHASES))
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--file_format", choices=records.FILE_FORMATS, default="array_record")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--max_misalignment_px", type=float, default=6.0)
  rules = p.add_mutually_exclusive_group()
  rules.add_argument("--phase_rules", help="JSON file of phase regular expressions (see data_prep/phases.py)")
  rules.add_argument("--series_csv", help="CSV with columns study,series_uid,phase")
  p.add_argument("--key_file", help="HMAC key for case ids (default: OUT.hmac_key beside OUT, created if missing)")
  p.add_argument("--split_fractions", default="0.8,0.1,0.1", help="train,validation,test fractions by case")
  p.add_argument("--split_method", default="hash", choices=("hash", "rank"),
                 help="hash: stable per-patient splits as data grows; rank: exact fractions for small datasets")
  p.add_argument("--split_seed", type=int, default=0)
  p.add_argument("--fold", type=int, default=None, help="cross-validation fold used as the test split")
  p.add_argument("--num_folds", type=int, default=5)
  p.add_argument("--examples_per_shard", type=int, default=1000)
  p.add_argument("--no_align", dest="align", action="store_false",
                 help="skip the through-plane and ECC alignment (benchmarking only)")
  p.add_argument("--ecc_size", type=int, default=128, help="ECC runs on the body crop downsampled to this size")
  p.add_argument("--z_search_mm", type=float, default=40.0)
  p.add_argument("--through_plane", choices=("nearest", "resample"), default="nearest",
                 help="pair each non-contrast slice with the nearest contrast slice (the paper), or resample the "
                      "contrast volume linearly along z onto the corrected table positions")
  p.add_argument("--deformable", choices=("none", "bspline", "demons"), default="none",
                 help="3-D deformable registration (SimpleITK) of each contrast volume onto the non-contrast one "
                      "after the affine step: bspline (mutual information) or demons (on HU clipped to [-200, 60]); "
                      "the misalignment rule then tests the residual (benchmarks/RESULTS.md, issue 12: cost, effect)")
  p.add_argument("--verbose", action="store_true")
  a = p.parse_args(argv)
  fractions = tuple(float(x) for x in a.split_fractions.split(","))
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    p.error("--split_fractions needs three non-negative numbers summing to 1")
  if a.fold is not None and not 0 <= a.fold < a.num_folds:
    p.error("--fold must be in [0, --num_folds)")
  logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
  return Settings(input=a.input, output=a.output, phases=tuple(x.strip() for x in a.phases.split(",") if x.strip()),
                  image_size=a.image_size, file_format=a.file_format, workers=max(1, a.workers),
                  max_misalignment_px=a.max_misalignment_px, phase_rules=a.phase_rules, series_csv=a.series_csv,
                  key_file=a.key_file, split_fractions=fractions, split_seed=a.split_seed,
                  split_method=a.split_method, fold=a.fold,
                  num_folds=a.num_folds, examples_per_shard=a.examples_per_shard, align=a.align,
                  ecc_size=a.ecc_size, z_search_mm=a.z_search_mm, through_plane=a.through_plane,
                  deformable=a.deformable)


def main(argv: list[str] | None = None) -> int:
  """Runs the conversion of the command line; returns the exit status (2 with a message on bad input)."""
  settings = parse_args(argv)
  try:
    manifest = job.run(settings)
  except (ValueError, OSError) as e:
    print(f"data_prep.convert: error: {e}", file=sys.stderr)
    return 2
  for phase, p in manifest["phases"].items():
    counts = ", ".join(f"{s} {v['examples']} ({v['cases']} cases)" for s, v in p["splits"].items())
    print(f"{phase}: {counts}; {len(p['excluded_pairs'])} pairs excluded, {len(p['skipped_cases'])} cases skipped")
  print(f"{len(manifest['skipped_files'])} files and {len(manifest['skipped_series'])} series skipped; "
        f"see {pathlib.Path(settings.output) / shards.MANIFEST}")
  return 0
