"""Times the phantom: one 512x512 case with 48 slices (four series, DICOM + labels written), a few repetitions.

Run: ``.venv/bin/python benchmarks/phantom_bench.py [--repeats 5] [--size 512] [--slices 48]``. Prints the best and
the median wall time of ``data_prep.phantom.generate`` for one case, and of ``synthesize_case`` alone.
"""

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from data_prep import phantom  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--slices', type=int, default=48)
  parser.add_argument('--compress', action='store_true')
  args = parser.parse_args()
  full, memory = [], []
  for repeat in range(args.repeats):
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      phantom.generate(out, cases=1, seed=repeat, size=args.size, slices=args.slices, compress=args.compress)
      full.append(time.perf_counter() - start)
    start = time.perf_counter()
    phantom.synthesize_case(0, repeat, size=args.size, slices=args.slices)
    memory.append(time.perf_counter() - start)
  print(f'phantom {args.size}x{args.size}x{args.slices}, 4 series, {args.repeats} repeats')
  print(f'  generate (synthesize + write DICOM, labels, json): best {min(full):.2f} s, '
        f'median {statistics.median(full):.2f} s')
  print(f'  synthesize_case only (in memory):                 best {min(memory):.2f} s, '
        f'median {statistics.median(memory):.2f} s')


if __name__ == '__main__':
  main()
