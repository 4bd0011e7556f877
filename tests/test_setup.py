"""The set-up: requirements.txt (ranges), constraints.txt (the pins CI installs), pyproject.toml, Makefile, CI."""

import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(name):
  with open(os.path.join(REPO, name)) as f:
    return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def test_constraints_pin_every_requirement_inside_its_range():
  pins = {}
  for line in _lines("constraints.txt"):
    name, _, version = line.partition("==")
    assert version and "@" not in line, f"constraints.txt pins with ==, not {line!r}"
    pins[canonicalize_name(name)] = version
  for line in _lines("requirements.txt"):
    req = Requirement(line)
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} of requirements.txt is not pinned in constraints.txt"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {req.name}=={pins[name]}, outside requirements.txt's {req.specifier}")


def test_pyproject_packages_and_entry_points_exist():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  for package in ("vcect_jax", "data_prep", "configs", "benchmarks"):
    assert any(package.startswith(p.rstrip("*")) for p in project["tool"]["setuptools"]["packages"]["find"]["include"])
  import importlib
  for script, target in project["project"]["scripts"].items():
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function)), script


def test_makefile_and_ci_run_the_readme_commands():
  with open(os.path.join(REPO, "Makefile")) as f:
    makefile = f.read()
  assert re.search(r"^demo: .*\n\t\$\(BIN\)/python -m vcect_jax\.main --config=configs/arterial\.py:demo "
                   r"--workdir=workdir/demo_arterial$", makefile, re.M)
  assert re.search(r"^test: .*\n\t\$\(BIN\)/python -m pytest -q$", makefile, re.M)
  assert "-r requirements.txt -c constraints.txt" in makefile
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read()
  assert "make test VENV=.ci-venv" in ci and "dciodvfy" in ci
