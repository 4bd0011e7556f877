r"""Converter throughput in slice pairs per second, against plain pydicom decoding of the same files.

  .venv/bin/python -m benchmarks.convert_bench [--cases=3] [--slices=24] [--size=512] [--image_size=256]

Generates phantom cases (one contrast phase converted: arterial), then times, on the same files:
* plain decode: ``pydicom.dcmread(f).pixel_array`` of the non-contrast and arterial files, as pairs/s
  (two files per pair);
* ``data_prep.convert.run`` without alignment and with alignment (through-plane + ECC), 1 and 2 workers.
Each timing is the best of ``--repeats`` runs; the ratio is converter pairs/s per worker over plain decode pairs/s.
"""

import argparse
import json
import pathlib
import shutil
import tempfile
import time

import pydicom

from data_prep import convert
from data_prep import phantom


def plain_decode(root: pathlib.Path) -> tuple[float, int]:
  files = sorted(p for p in root.rglob("*.dcm") if p.parent.name in ("non_contrast", "arterial"))
  t = time.perf_counter()
  for f in files:
    pydicom.dcmread(f).pixel_array  # pylint: disable=expression-not-assigned
  return time.perf_counter() - t, len(files) // 2


def converter(root: pathlib.Path, work: pathlib.Path, workers: int, align: bool, image_size: int) -> tuple[float, int]:
  out = work / f"out_{workers}_{int(align)}"
  shutil.rmtree(out, ignore_errors=True)
  settings = convert.Settings(input=str(root), output=str(out), phases=("arterial",), image_size=image_size,
                              workers=workers, align=align, key_file=str(work / "key"))
  t = time.perf_counter()
  manifest = convert.run(settings)
  seconds = time.perf_counter() - t
  pairs = sum(c["pairs"] for c in manifest["phases"]["arterial"]["cases"].values())
  return seconds, pairs


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--cases", type=int, default=3)
  p.add_argument("--slices", type=int, default=24)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=2)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    (work / "key").write_text("00" * 32)
    phantom.generate(work / "in", cases=a.cases, seed=0, size=a.size, slices=a.slices)
    results = {}
    seconds, pairs = min(plain_decode(work / "in") for _ in range(a.repeats))
    results["plain pydicom decode"] = (pairs / seconds, 1)
    for align in (False, True):
      for workers in (1, 2):
        seconds, pairs = min(converter(work / "in", work, workers, align, a.image_size) for _ in range(a.repeats))
        results[f"convert, {'ECC on' if align else 'no alignment'}, {workers} worker(s)"] = (pairs / seconds, workers)
    base = results["plain pydicom decode"][0]
    print(f"{a.cases} cases x {a.slices} slices, {a.size}x{a.size} -> {a.image_size}, phase arterial")
    print(f"| run | pairs/s | per worker vs plain decode |\n|---|---|---|")
    for name, (rate, workers) in results.items():
      print(f"| {name} | {rate:.1f} | {rate / workers / base:.2f}x |")
    print(json.dumps({k: round(v[0], 2) for k, v in results.items()}))


if __name__ == "__main__":
  main()
