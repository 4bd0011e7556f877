"""Command line: ``python -m data_prep.phantom --out DIR --cases N --seed S [options]``."""

import argparse
import sys
import time

from data_prep.phantom import cases as cases_lib


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


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m data_prep.phantom',
                                   description='Write synthetic four-phase abdominal CT cases (DICOM + labels).')
  parser.add_argument('--out', required=True, help='output folder (case folders are written inside it)')
  parser.add_argument('--cases', type=_positive_int, required=True, help='number of cases')
  parser.add_argument('--seed', type=_non_negative_int, required=True, help='random seed (same seed, same bytes)')
  parser.add_argument('--size', type=_positive_int, default=512, help='image rows and columns (default 512)')
  parser.add_argument('--slices', type=_positive_int, default=48, help='slices per series (default 48)')
  parser.add_argument('--slice_thickness', type=_positive_float, default=5.0, help='mm (default 5.0)')
  parser.add_argument('--pixel_spacing', type=_positive_float, default=0.75, help='mm (default 0.75)')
  parser.add_argument('--compress', action='store_true', help='write some cases as RLE / JPEG 2000 lossless')
  parser.add_argument('--preview', action='store_true', help='write DIR/preview.png of the first case')
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
    folders = cases_lib.generate(args.out, args.cases, args.seed, args.size, args.slices, args.slice_thickness,
                                 args.pixel_spacing, args.compress, args.preview)
  except OSError as error:
    print(f'error: cannot write to {args.out}: {error}', file=sys.stderr)
    return 1
  print(f'wrote {len(folders)} case(s) to {args.out} in {time.perf_counter() - start:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
