"""`--help` the same way for every command line: the description's and examples' own line breaks, and each
option's help ending with its default (or `required`), so that no option goes unexplained."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """RawDescriptionHelpFormatter that appends `(default: ...)` / `(required)` to every option's help."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (text == argparse.SUPPRESS or not action.option_strings or isinstance(action, argparse._HelpAction)  # pylint: disable=protected-access
        or "default" in text or "required" in text):
      return text
    if action.required:
      return f"{text} (required)"
    if action.nargs == 0:  # a switch (store_true / store_false): not given unless asked for
      return f"{text} (default: off)"
    if action.default is None or action.default in ("", []):
      return f"{text} (default: none)"
    return f"{text} (default: %(default)s)"


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
  """The options of `parser` without a help text (for tests)."""
  return [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions  # pylint: disable=protected-access
          if not a.help and not isinstance(a, argparse._HelpAction)]  # pylint: disable=protected-access
