"""Which contrast phase a CT series is: regular-expression rules on its descriptions, or a CSV.

Rules are tried in order; the first whose pattern matches SeriesDescription or ProtocolName (case-insensitive)
gives the phase. The defaults cover common English descriptions and the phantom's ("NON-CONTRAST", "ARTERIAL",
"PORTAL VENOUS", "DELAYED"). A series that no rule matches is unknown and is skipped with that reason.

A rules file (``--phase_rules=FILE``) is JSON: either ``[["phase", "regex"], ...]`` (ordered) or
``{"phase": ["regex", ...], ...}`` (tried in the file's order); its rules replace the defaults. An ``"ignore"``
phase marks series to leave out silently-but-recorded (scouts, dose reports).

A series CSV (``--series_csv=FILE``) has the header ``study,series_uid,phase``; ``study`` is informational (the
StudyInstanceUID or the study folder), the series UID decides. Series not in the CSV are unknown.
"""

import csv
import json
import os
import re
from collections.abc import Sequence

NON_CONTRAST = "non_contrast"
CONTRAST_PHASES = ("arterial", "portal", "delayed")
PHASES = (NON_CONTRAST,) + CONTRAST_PHASES
IGNORE = "ignore"

# Order matters: "pre-contrast" before anything mentioning a phase; "delayed venous" before "venous".
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (IGNORE, r"scout|topogram|locali[sz]er|surview|dose\s*(report|info)|\bmip\b|\bmpr\b|coronal|sagittal"),
    (NON_CONTRAST, r"non[-_ ]?contrast|non[-_ ]?con\b|un[-_ ]?enhanced|\bnative\b|pre[-_ ]?contrast|\bplain\b|"
                   r"without\s+contrast|\bw/?o\b|\bnon[-_ ]?enh|\bnc\b|\bpre\b|no\s+contrast|\bsans\b"),
    ("delayed", r"delay|excretory|urogra|equilibrium|\blate\s+phase|\bdp\b|\b(3|5|10)\s*min"),
    ("portal", r"portal|venous|\bpv\b|\bpvp\b|\bven\b|nephrographic|\b(60|70|80)\s*s(ec)?\b"),
    ("arterial", r"arterial|\bart\b|\bap\b|\bhap\b|angio|\bcta\b|\b(25|30|35|40)\s*s(ec)?\b"),
)


class PhaseRules:
  """Decides the phase of a series; construct with ``from_rules_file``, ``from_csv`` or the defaults."""

  def __init__(self, rules: Sequence[tuple[str, str]] = DEFAULT_RULES, by_series_uid: dict[str, str] | None = None):
    for phase, _ in rules:
      if phase not in PHASES + (IGNORE,):
        raise ValueError(f"unknown phase {phase!r} in phase rules; use one of {PHASES + (IGNORE,)}")
    self.rules = [(phase, re.compile(pattern, re.IGNORECASE)) for phase, pattern in rules]
    self.by_series_uid = by_series_uid

  @classmethod
  def from_rules_file(cls, path: str | os.PathLike) -> "PhaseRules":
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, dict):
      rules = [(phase, p) for phase, patterns in data.items()
               for p in ([patterns] if isinstance(patterns, str) else patterns)]
    else:
      rules = [(str(phase), str(p)) for phase, p in data]
    return cls(rules)

  @classmethod
  def from_csv(cls, path: str | os.PathLike) -> "PhaseRules":
    mapping = {}
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      missing = {"series_uid", "phase"} - set(reader.fieldnames or [])
      if missing:
        raise ValueError(f"{path}: the series CSV needs the columns study,series_uid,phase (missing {sorted(missing)})")
      for row in reader:
        phase = row["phase"].strip().lower()
        if phase not in PHASES + (IGNORE,):
          raise ValueError(f"{path}: unknown phase {phase!r}; use one of {PHASES + (IGNORE,)}")
        mapping[row["series_uid"].strip()] = phase
    return cls(rules=(), by_series_uid=mapping)

  def phase_of(self, series_uid: str, description: str, protocol_name: str) -> str | None:
    """The phase, ``IGNORE``, or None when unknown."""
    if self.by_series_uid is not None:
      return self.by_series_uid.get(series_uid)
    for phase, pattern in self.rules:
      for text in (description, protocol_name):
        if text and pattern.search(text):
          return phase
    return None
