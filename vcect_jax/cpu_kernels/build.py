"""Compiles the oneDNN convolution handlers: `python -m vcect_jax.cpu_kernels.build [--if_possible] [--force]`.

Needs a C++17 compiler (`c++`, or `$CXX`) and oneDNN 2.x's headers and library (Debian / Ubuntu: `apt install
libdnnl-dev`; another prefix: `DNNL_ROOT=/opt/dnnl`). The result goes to `vcect_jax/cpu_kernels/_build/`, named
for this source and the installed jaxlib (`vcect_jax.cpu_kernels.library_path()`); it is loaded the next time a
process imports the networks on CPU. `--if_possible` (used by `make venv`) prints why it cannot build and exits 0
instead of failing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax

from vcect_jax import cpu_kernels


def _dnnl_prefix() -> pathlib.Path | None:
  candidates = [os.environ.get("DNNL_ROOT", ""), "/usr", "/usr/local", os.environ.get("CONDA_PREFIX", "")]
  for prefix in candidates:
    if prefix and (pathlib.Path(prefix) / "include" / "dnnl.hpp").exists():
      return pathlib.Path(prefix)
  return None


def _dnnl_major(prefix: pathlib.Path) -> int | None:
  for header in (prefix / "include" / "oneapi" / "dnnl" / "dnnl_version.h", prefix / "include" / "dnnl_version.h"):
    if header.exists():
      for line in header.read_text().splitlines():
        if line.startswith("#define DNNL_VERSION_MAJOR"):
          return int(line.split()[-1])
  return None


def build(force: bool = False) -> pathlib.Path:
  """Compiles the library if it is not there yet; returns its path. Raises RuntimeError with what to fix."""
  target = cpu_kernels.library_path()
  if target.exists() and not force:
    return target
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not compiler:
    raise RuntimeError("no C++ compiler found: install g++ (or set CXX)")
  prefix = _dnnl_prefix()
  if prefix is None:
    raise RuntimeError("oneDNN's headers (dnnl.hpp) were not found: `apt install libdnnl-dev` (Debian / Ubuntu), "
                       "or set DNNL_ROOT to the prefix of a oneDNN 2.x installation")
  major = _dnnl_major(prefix)
  if major is not None and major != 2:
    raise RuntimeError(f"oneDNN {major}.x found under {prefix}; the handlers are written for oneDNN 2.x "
                       "(Debian 12's libdnnl-dev 2.6)")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = pathlib.Path(tmp) / target.name
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-I{jax.ffi.include_dir()}",
               f"-I{prefix / 'include'}", str(cpu_kernels.SOURCE), f"-L{prefix / 'lib'}",
               f"-Wl,-rpath,{prefix / 'lib'}", "-ldnnl", "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {cpu_kernels.SOURCE.name} failed:\n{' '.join(command)}\n{result.stderr[-4000:]}")
    os.replace(partial, target)  # atomic: a concurrent loader never sees half a library
  return target


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--if_possible", action="store_true", help="say why it cannot build, and exit 0")
  parser.add_argument("--force", action="store_true", help="rebuild even if the library exists")
  args = parser.parse_args(argv)
  try:
    path = build(force=args.force)
  except RuntimeError as e:
    print(f"oneDNN CPU convolutions not built: {e}", file=sys.stderr)
    print("(optional: the networks then run XLA's own convolutions, slower on CPU)", file=sys.stderr)
    return 0 if args.if_possible else 1
  print(f"oneDNN CPU convolutions: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
