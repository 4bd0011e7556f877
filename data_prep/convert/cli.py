"""Command line of the conversion: ``python -m data_prep.convert --input=DICOM_ROOT --output=OUT [...]``."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from data_prep import cli_help
from data_prep import phases as phases_lib
from data_prep import progress as progress_lib
from data_prep import records
from data_prep.convert import job
from data_prep.convert import shards
from data_prep.convert.plan import Settings


EXAMPLE = """examples:
  python -m data_prep.convert --input=/data/dicom --output=/data/converted --workers=4
  python -m data_prep.convert --input=phantom_out --output=converted --image_size=64 --phases=arterial \\
      --split_method=rank --series_csv=series.csv

The input: one folder per study anywhere under --input (any depth, any file names); a study's series are told
apart by SeriesInstanceUID and their phase by the series description (data_prep/phases.py lists the built-in
rules; --phase_rules or --series_csv for other names). The output: OUT/<phase>/ (records), OUT/manifest.json
(counts, exclusions, skipped files and series, with reasons); the pseudonymisation key is OUT.hmac_key beside OUT.
A killed run resumes when rerun with the same settings; other settings into an existing output need --overwrite.
"""


def build_parser() -> argparse.ArgumentParser:
  """The command line's parser (every option with its help and default)."""
  p = argparse.ArgumentParser(
      prog="python -m data_prep.convert", epilog=EXAMPLE, formatter_class=cli_help.HelpFormatter,
      description="Offline conversion: DICOM studies -> paired, aligned 2.5D records in sharded TFDS format, one "
                  "dataset per contrast phase, and a manifest.")
  p.add_argument("--input", required=True, help="root folder of the DICOM studies (searched recursively)")
  p.add_argument("--output", required=True, help="output folder (manifest.json and one folder per phase)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing conversion in --output made with other settings")
  p.add_argument("--phases", default=",".join(phases_lib.CONTRAST_PHASES),
                 help="comma-separated contrast phases to pair with the non-contrast series")
  p.add_argument("--image_size", type=int, default=256, help="side in pixels of the records (the paper: 256)")
  p.add_argument("--file_format", choices=records.FILE_FORMATS, default="array_record",
                 help="array_record (random access, what training reads) or tfrecord")
  p.add_argument("--workers", type=int, default=1, help="cases converted in parallel, one process each")
  p.add_argument("--max_misalignment_px", type=float, default=6.0,
                 help="slice pairs whose residual misalignment after alignment exceeds this are excluded")
  rules = p.add_mutually_exclusive_group()
  rules.add_argument("--phase_rules",
                     help="JSON file of phase regular expressions on the series description (data_prep/phases.py); "
                          "default: the built-in rules")
  rules.add_argument("--series_csv",
                     help="CSV with columns study,series_uid,phase naming each series' phase; default: the rules")
  p.add_argument("--key_file", help="HMAC key for the pseudonymous case ids (default: OUT.hmac_key beside OUT, "
                                    "created if missing)")
  p.add_argument("--split_fractions", default="0.8,0.1,0.1", help="train,validation,test fractions by patient")
  p.add_argument("--split_method", default="hash", choices=("hash", "rank"),
                 help="hash: stable per-patient splits as data grows; rank: exact fractions for small datasets")
  p.add_argument("--split_seed", type=int, default=0, help="seed of the patient hash that decides the splits")
  p.add_argument("--fold", type=int, default=None,
                 help="cross-validation fold used as the test split (default: none, --split_fractions)")
  p.add_argument("--num_folds", type=int, default=5, help="number of cross-validation folds (with --fold)")
  p.add_argument("--examples_per_shard", type=int, default=1000, help="records per shard file")
  p.add_argument("--no_align", dest="align", action="store_false",
                 help="skip the through-plane and ECC alignment (benchmarking only; default: align)")
  p.add_argument("--ecc_size", type=int, default=128, help="ECC runs on the body crop downsampled to this size")
  p.add_argument("--z_search_mm", type=float, default=40.0,
                 help="range of the through-plane offset search, in mm either side")
  p.add_argument("--through_plane", choices=("nearest", "resample", "local"), default="nearest",
                 help="pair each non-contrast slice with the nearest contrast slice (the paper), resample the "
                      "contrast volume linearly along z onto the corrected table positions, or (local) let each "
                      "region of the slice take the contrast slice within 10 mm of the nearest one that matches it "
                      "best, which undoes each organ's own breathing shift (benchmarks/RESULTS.md, issue 12)")
  p.add_argument("--deformable", choices=("none", "bspline", "demons"), default="none",
                 help="3-D deformable registration (SimpleITK) of each contrast volume onto the non-contrast one "
                      "after the affine step: bspline (mutual information) or demons (on HU clipped to [-200, 60]); "
                      "the misalignment rule then tests the residual (benchmarks/RESULTS.md, issue 12: cost, effect)")
  p.add_argument("--verbose", action="store_true", help="log every case (and with it what was skipped, by kind)")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  return p


def parse_args(argv: list[str] | None) -> Settings:
  """The settings of the command line ``argv`` (``sys.argv[1:]`` when None); also sets up logging."""
  return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
  p = build_parser()
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
                  deformable=a.deformable), a


def main(argv: list[str] | None = None) -> int:
  """Runs the conversion of the command line; returns the exit status (2 with a message on bad input)."""
  settings, args = _parse(argv)
  t0 = time.perf_counter()
  try:
    manifest = job.run(settings, overwrite=args.overwrite,
                       emit_progress=(lambda _: None) if args.quiet else progress_lib.to_stderr)
  except (ValueError, OSError) as e:
    print(f"data_prep.convert: error: {e}", file=sys.stderr)
    return 2
  for phase, p in manifest["phases"].items():
    counts = ", ".join(f"{s} {v['examples']} ({v['cases']} cases)" for s, v in p["splits"].items())
    print(f"{phase}: {counts}; {len(p['excluded_pairs'])} pairs excluded, {len(p['skipped_cases'])} cases skipped")
  print(f"{job.skip_summary([s['reason'] for s in manifest['skipped_files']], 'files')}; "
        f"{len(manifest['skipped_series'])} series skipped")
  out = pathlib.Path(settings.output)
  print(f"wrote the records of {', '.join(manifest['phases'])} to {out}/<phase>/ and the manifest to "
        f"{out / shards.MANIFEST} in {time.perf_counter() - t0:.1f} s")
  return 0
