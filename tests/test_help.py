"""`--help` of every command line a user runs: exit status 0, every option explained with its default (or marked
required), and an example. (`python -m vcect_jax.main --help`: tests/test_main.py.)"""

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from data_prep import cli_help

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# module -> the function that parses the command line (called without arguments)
ENTRY_POINTS = {
    "data_prep.convert.cli": "main",
    "data_prep.phantom.__main__": "main",
    "vcect_jax.infer": "main",
    "benchmarks.paper_tables": "main",
    "benchmarks.demo_run": "main",
    "benchmarks.quality": "main",
}


class _Parsed(Exception):
  pass


def _parser_of(module_name: str, function: str, monkeypatch) -> argparse.ArgumentParser:
  """The ArgumentParser that `module.function()` builds, caught when it starts parsing."""
  seen = []

  def capture(self, *args, **kwargs):
    seen.append(self)
    raise _Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
  with pytest.raises(_Parsed):
    getattr(importlib.import_module(module_name), function)()
  return seen[0]


@pytest.mark.parametrize("module_name", sorted(ENTRY_POINTS))
def test_every_option_has_help_with_its_default_and_an_example(module_name, monkeypatch):
  parser = _parser_of(module_name, ENTRY_POINTS[module_name], monkeypatch)
  assert not cli_help.undocumented(parser), f"options without help: {cli_help.undocumented(parser)}"
  formatter = parser._get_formatter()  # pylint: disable=protected-access
  for action in parser._actions:  # pylint: disable=protected-access
    if action.option_strings and not isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      text = formatter._get_help_string(action)  # pylint: disable=protected-access
      assert "default" in text or "required" in text, f"{action.option_strings[0]}: {text!r} names no default"
  assert "example" in (parser.epilog or "") + (parser.description or "")


@pytest.mark.parametrize("module_name", ["data_prep.convert", "data_prep.phantom"])
def test_help_exits_zero(module_name):
  proc = subprocess.run([sys.executable, "-m", module_name, "--help"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "example" in proc.stdout and "(default: " in proc.stdout
