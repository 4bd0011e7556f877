r"""Converter throughput in slice pairs per second, against plain pydicom decoding of the same files.

  .venv/bin/python -m benchmarks.convert_bench [--cases=4] [--slices=48] [--size=512] [--image_size=256]
      [--encodings=native,jpeg2000] [--repeats=2]

Generates phantom cases, optionally transcodes every file to JPEG 2000 Lossless (the same pixels), then times on
the same files:
* plain decode: ``pydicom.dcmread(f).pixel_array`` of every file the conversion reads (non-contrast and the three
  contrast series), expressed as slice pairs per second (pairs = what the converter produces from those files);
* ``data_prep.convert.run`` of all three contrast phases, without and with alignment (through-plane + ECC), with
  1 and 2 workers.
Each timing is the best of ``--repeats`` runs; the ratio is converter pairs/s per worker over plain decode pairs/s.
"""

import argparse
import json
import pathlib
import shutil
import tempfile
import time

import pydicom
from pydicom.uid import JPEG2000Lossless

from data_prep import convert
from data_prep import phantom

PHASES = ("arterial", "portal", "delayed")


def transcode(root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """A copy of ``root`` with every DICOM file re-encoded as JPEG 2000 Lossless (other files copied)."""
  for src in sorted(root.rglob("*")):
    dst = out / src.relative_to(root)
    if src.is_dir():
      dst.mkdir(parents=True, exist_ok=True)
    elif src.suffix == ".dcm":
      ds = pydicom.dcmread(src)
      ds.compress(JPEG2000Lossless, ds.pixel_array)
      ds.save_as(dst)
    else:
      shutil.copy(src, dst)
  return out


def plain_decode(root: pathlib.Path) -> float:
  files = sorted(root.rglob("*.dcm"))
  t = time.perf_counter()
  for f in files:
    pydicom.dcmread(f).pixel_array  # pylint: disable=expression-not-assigned
  return time.perf_counter() - t


def converter(root: pathlib.Path, work: pathlib.Path, workers: int, align: bool, image_size: int) -> tuple[float, int]:
  out = work / f"out_{workers}_{int(align)}"
  shutil.rmtree(out, ignore_errors=True)
  settings = convert.Settings(input=str(root), output=str(out), phases=PHASES, image_size=image_size,
                              workers=workers, align=align, key_file=str(work / "key"))
  t = time.perf_counter()
  manifest = convert.run(settings)
  seconds = time.perf_counter() - t
  pairs = sum(c["pairs"] for p in PHASES for c in manifest["phases"][p]["cases"].values())
  return seconds, pairs


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--cases", type=int, default=4)
  p.add_argument("--slices", type=int, default=48)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--encodings", default="native,jpeg2000")
  p.add_argument("--repeats", type=int, default=2)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    (work / "key").write_text("00" * 32)
    phantom.generate(work / "native", cases=a.cases, seed=0, size=a.size, slices=a.slices)
    rows = {}
    for encoding in a.encodings.split(","):
      root = work / "native" if encoding == "native" else transcode(work / "native", work / encoding)
      decode = min(plain_decode(root) for _ in range(a.repeats))
      pairs = None
      for align in (False, True):
        for workers in (1, 2):
          seconds, pairs = min(converter(root, work, workers, align, a.image_size) for _ in range(a.repeats))
          rows[(encoding, f"convert, {'ECC on' if align else 'no alignment'}, {workers} worker(s)")] = (
              pairs / seconds, workers)
      rows[(encoding, "plain pydicom decode")] = (pairs / decode, 1)
    print(f"{a.cases} cases x {a.slices} slices, {a.size}x{a.size} -> {a.image_size}, phases {','.join(PHASES)}")
    print("| input | run | pairs/s | ms/pair | per worker vs plain decode |\n|---|---|---|---|---|")
    for (encoding, name), (rate, workers) in sorted(rows.items(), key=lambda kv: (kv[0][0], "plain" not in kv[0][1])):
      base = rows[(encoding, "plain pydicom decode")][0]
      print(f"| {encoding} | {name} | {rate:.1f} | {1e3 / rate:.2f} | {rate / workers / base:.2f}x |")
    print(json.dumps({f"{e}: {n}": round(v[0], 2) for (e, n), v in rows.items()}))


if __name__ == "__main__":
  main()
