"""Command line: ``python -m data_prep.phantom --out DIR --cases N --seed S [options]``."""

import argparse
import sys
import time

from data_prep import cli_help
from data_prep import progress as progress_lib
from data_prep.phantom import cases as cases_lib

EXAMPLE = """examples:
  python -m data_prep.phantom --out phantom_out --cases 10 --seed 0 --preview
  python -m data_prep.phantom --out small --cases 4 --seed 1 --size 128 --slices 16 --pixel_spacing 3.0

Each case folder holds one DICOM series per phase (non_contrast, arterial, portal, delayed), organ labels
(labels/*.nii.gz, labels.json) and the applied motion (motion.json); docs/ describes the layout. The same
settings and seed give the same bytes; writing into a folder that holds a phantom made with other settings needs
--overwrite (its cases are then replaced, not mixed with the new ones).
"""


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
  return value


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be a non-negative integer, got {text}')
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0 or value != value or value == float('inf'):
    raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
  return value


def _unit_float(text: str) -> float:
  value = float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f'must be a number from 0 to 1, got {text}')
  return value


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m data_prep.phantom', epilog=EXAMPLE,
                                   formatter_class=cli_help.HelpFormatter,
                                   description='Write synthetic four-phase abdominal CT cases (DICOM + labels).')
  parser.add_argument('--out', required=True, help='output folder (case folders case_0000, ... are written inside it)')
  parser.add_argument('--cases', type=_positive_int, required=True, help='number of cases')
  parser.add_argument('--seed', type=_non_negative_int, required=True, help='random seed (same seed, same bytes)')
  parser.add_argument('--size', type=_positive_int, default=512, help='image rows and columns (default 512)')
  parser.add_argument('--slices', type=_positive_int, default=48, help='slices per series (default 48)')
  parser.add_argument('--slice_thickness', type=_positive_float, default=5.0, help='mm (default 5.0)')
  parser.add_argument('--pixel_spacing', type=_positive_float, default=0.75, help='mm (default 0.75)')
  parser.add_argument('--motion_scale', type=_unit_float, default=1.0,
                      help="the patient's motion between the scans, scaled: 1 (default) breathing, table and in-plane "
                           'motion; 0 contrast series aligned with the non-contrast one (pairs that differ only by '
                           'enhancement and noise)')
  parser.add_argument('--compress', action='store_true', help='write some cases as RLE / JPEG 2000 lossless')
  parser.add_argument('--preview', action='store_true', help='write DIR/preview.png of the first case')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the cases of a phantom made with other settings in --out')
  parser.add_argument('--quiet', action='store_true', help='no progress lines')
  args = parser.parse_args(argv)
  try:
    cases_lib.check_geometry(args.size, args.slices, args.slice_thickness, args.pixel_spacing)
  except ValueError as error:
    parser.error(str(error))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  try:
    progress = None if args.quiet else progress_lib.Progress(
        'phantom', args.cases, 'cases', emit=progress_lib.to_stderr).update
    folders = cases_lib.generate(args.out, args.cases, args.seed, args.size, args.slices, args.slice_thickness,
                                 args.pixel_spacing, args.compress, args.preview, overwrite=args.overwrite,
                                 progress=progress, motion_scale=args.motion_scale)
  except FileExistsError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  except OSError as error:
    print(f'error: cannot write to {args.out}: {error}', file=sys.stderr)
    return 1
  preview = f' and {args.out}/preview.png' if args.preview else ''
  print(f'wrote {len(folders)} phantom case(s) ({folders[0].name} .. {folders[-1].name}) to {args.out}{preview} '
        f'in {time.perf_counter() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
