"""Planning a conversion: the settings, the cases to convert, their pseudonymous ids and their splits.

Cheap and done once, in the launching process: the phase of every series, each case's id (a keyed hash of the
patient), its study tag and its split (hash splits, exact rank splits for small datasets, or k-fold).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib

import numpy as np

from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import privacy
from data_prep import records

log = logging.getLogger("data_prep.convert")


@dataclasses.dataclass
class Settings:
  """Everything that decides the output (``workers`` aside)."""

  input: str
  output: str
  phases: tuple[str, ...] = phases_lib.CONTRAST_PHASES
  image_size: int = 256
  file_format: str = "array_record"
  workers: int = 1
  max_misalignment_px: float = 6.0
  phase_rules: str | None = None
  series_csv: str | None = None
  key_file: str | None = None
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  split_seed: int = 0
  # 'hash': each patient's split follows from its hash alone (stable as a dataset grows);
  # 'rank': patients sorted by hash and cut at the fractions (exact proportions, for small datasets).
  split_method: str = "hash"
  fold: int | None = None
  num_folds: int = 5
  examples_per_shard: int = 1000
  align: bool = True
  ecc_size: int = 128
  z_search_mm: float = 40.0
  # Alignment options beyond the paper's pipeline (data_prep/register.py, issue 12): 'nearest' | 'resample' along
  # z, and 'none' | 'bspline' | 'demons' deformable registration after the per-slice affine step.
  through_plane: str = "nearest"
  deformable: str = "none"

  def fingerprint(self, key: bytes) -> str:
    """Hash of the settings that decide a case's records (and of the key), naming the cache."""
    d = dataclasses.asdict(self)
    for k in ("workers", "output", "file_format", "examples_per_shard", "split_fractions", "split_seed", "fold",
              "num_folds", "key_file"):
      d.pop(k)
    for k, default in (("through_plane", "nearest"), ("deformable", "none")):
      if d[k] == default:  # caches made before these options existed keep their names
        d.pop(k)
    d["rules"] = _file_digest(self.phase_rules) + _file_digest(self.series_csv)
    d["key"] = hashlib.sha256(key).hexdigest()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

  def check(self) -> None:
    """Raises ValueError, naming the flag, when the settings cannot be converted."""
    if not pathlib.Path(self.input).is_dir():
      raise ValueError(f"--input={self.input} is not a directory")
    unknown = set(self.phases) - set(phases_lib.CONTRAST_PHASES)
    if unknown or not self.phases:
      raise ValueError(f"--phases must be a subset of {','.join(phases_lib.CONTRAST_PHASES)}; got {self.phases}")
    if self.file_format not in records.FILE_FORMATS:
      raise ValueError(f"--file_format must be one of {records.FILE_FORMATS}")
    if self.phase_rules and self.series_csv:
      raise ValueError("give --phase_rules or --series_csv, not both")
    self.registration_options().check()
    if not self.align and not self.registration_options().is_paper:
      raise ValueError("--through_plane and --deformable need the alignment: drop --no_align")

  def registration_options(self):
    """The `data_prep.register.Options` of these settings."""
    from data_prep import register  # pylint: disable=import-outside-toplevel
    return register.Options(through_plane=self.through_plane, deformable=self.deformable, ecc_size=self.ecc_size)

  def phase_rules_of(self) -> phases_lib.PhaseRules:
    """The phase rules these settings name: a series CSV, a rules file, or the built-in rules."""
    if self.series_csv:
      return phases_lib.PhaseRules.from_csv(self.series_csv)
    if self.phase_rules:
      return phases_lib.PhaseRules.from_rules_file(self.phase_rules)
    return phases_lib.PhaseRules()


def _file_digest(path: str | None) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() if path else ""


@dataclasses.dataclass
class CasePlan:
  """One study to convert: its pseudonymous ids, split, and the series of each phase."""

  case_id: str
  study_tag: str  # keyed hash of the StudyInstanceUID (cache and manifest name; never the UID)
  split: str
  folder: str  # relative to the input root
  labels_dir: pathlib.Path | None
  series: dict[str, dicom_io.Series]

  @property
  def name(self) -> str:
    return f"{self.case_id}-{self.study_tag}"


def assign_split(case_id: str, settings: Settings) -> str:
  """train / validation / test from the case id alone (so all of a patient's slices share a split)."""
  u = privacy.split_fraction(case_id, settings.split_seed)
  train, val, _ = settings.split_fractions
  if settings.fold is not None:
    # K-fold: the fold's bucket is the test set; the rest is split train/validation in proportion.
    bucket = int(u * settings.num_folds)
    if bucket == settings.fold:
      return "test"
    v = privacy.split_fraction(case_id, settings.split_seed + 1)
    return "validation" if v < val / max(train + val, 1e-9) else "train"
  if u < train:
    return "train"
  return "validation" if u < train + val else "test"


def balance_splits(cases: list[CasePlan], settings: Settings) -> None:
  """Gives every split with a non-zero fraction at least one patient, when there are enough patients.

  Hash splits are stable as a dataset grows, but on a handful of patients they can leave a split empty. Each empty
  split then takes, from the split with the most patients, the patient whose hash fraction lies nearest to the
  empty split's interval. Deterministic for a given set of patients. K-fold splits are left as hashed, except
  with `split_method='rank'`, where the folds are dealt round-robin in hash order (every fold gets a test patient
  once there are `num_folds` patients).
  """
  names = ("train", "validation", "test")
  if settings.fold is not None:
    if settings.split_method == "rank":
      _rank_folds(cases, settings, names)
    return
  if settings.split_method == "rank":
    _rank_splits(cases, settings, names)
    return
  bounds = np.cumsum((0.0,) + tuple(settings.split_fractions))
  wanted = [n for n, f in zip(names, settings.split_fractions) if f > 0]
  split_of = {c.case_id: c.split for c in cases}
  if len(split_of) < len(wanted):
    return
  for i, name in enumerate(names):
    if name not in wanted or name in split_of.values():
      continue
    donor = max(wanted, key=lambda n: (sum(v == n for v in split_of.values()), -names.index(n)))
    lo, hi = bounds[i], bounds[i + 1]

    def distance(cid):
      u = privacy.split_fraction(cid, settings.split_seed)
      return (max(lo - u, u - hi, 0.0), cid)

    moved = min((cid for cid, sp in split_of.items() if sp == donor), key=distance)
    split_of[moved] = name
    log.info("split %s was empty: one case moved there from %s", name, donor)
  for c in cases:
    c.split = split_of[c.case_id]


def _rank_splits(cases: list[CasePlan], settings: Settings, names) -> None:
  """Patients sorted by hash fraction, cut so that each split gets round(fraction * n), at least one if > 0."""
  ids = sorted({c.case_id for c in cases}, key=lambda cid: (privacy.split_fraction(cid, settings.split_seed), cid))
  n = len(ids)
  f_train, f_val, f_test = settings.split_fractions
  n_val = max(1 if f_val > 0 and n >= 2 else 0, round(f_val * n))
  n_test = max(1 if f_test > 0 and n >= 3 else 0, round(f_test * n))
  n_train = max(n - n_val - n_test, 0)
  split_of = {cid: names[0] if i < n_train else names[1] if i < n_train + n_val else names[2]
              for i, cid in enumerate(ids)}
  for c in cases:
    c.split = split_of[c.case_id]


def _rank_folds(cases: list[CasePlan], settings: Settings, names) -> None:
  """K-fold by rank: patient i (in hash order) is in fold i mod K; fold `settings.fold` is the test split, and the
  rest is cut train / validation in the proportion of the split fractions (at least one validation patient)."""
  ids = sorted({c.case_id for c in cases}, key=lambda cid: (privacy.split_fraction(cid, settings.split_seed), cid))
  test = [cid for i, cid in enumerate(ids) if i % settings.num_folds == settings.fold]
  rest = [cid for cid in ids if cid not in test]
  f_train, f_val, _ = settings.split_fractions
  n_val = min(len(rest) - 1, max(1, round(f_val / max(f_train + f_val, 1e-9) * len(rest)))) if len(rest) > 1 else 0
  split_of = {cid: names[2] for cid in test}
  split_of.update({cid: names[1] if i < n_val else names[0] for i, cid in enumerate(rest)})
  for c in cases:
    c.split = split_of[c.case_id]


def plan_cases(studies: list[dicom_io.Study], rules: phases_lib.PhaseRules, root: pathlib.Path, key: bytes,
               settings: Settings) -> tuple[list[CasePlan], list[dict]]:
  """Decides the phase of every series; returns the cases and the series left out (with reasons)."""
  cases, skipped = [], []
  for study in studies:
    cid = privacy.case_id(key, privacy.patient_identity(*study.identity, fallback=study.uid))
    tag = privacy.keyed_hash(key, "study:" + study.uid, 8)
    chosen: dict[str, dicom_io.Series] = {}
    for s in study.series:
      where = {"case_id": cid, "series": _rel(s.folder, root), "description": s.description, "files": len(s.slices)}
      phase = rules.phase_of(s.uid, s.description, s.protocol_name)
      if phase is None:
        skipped.append({**where, "reason": "unknown series description (add a --phase_rules rule or a "
                                           "--series_csv row)"})
      elif phase == phases_lib.IGNORE:
        skipped.append({**where, "reason": "ignored by the phase rules"})
      elif phase in chosen:
        keep, drop = sorted([chosen[phase], s], key=lambda x: -len(x.slices))
        chosen[phase] = keep
        skipped.append({"case_id": cid, "series": _rel(drop.folder, root), "description": drop.description,
                        "files": len(drop.slices), "reason": f"another {phase} series of this study was used"})
      else:
        chosen[phase] = s
    labels = study.folder / "labels"
    cases.append(CasePlan(cid, tag, assign_split(cid, settings), _rel(study.folder, root),
                          labels if labels.is_dir() else None, chosen))
  balance_splits(cases, settings)
  return cases, skipped


def _rel(path: pathlib.Path, root: pathlib.Path) -> str:
  try:
    return str(pathlib.Path(path).relative_to(root)) or "."
  except ValueError:
    return pathlib.Path(path).name
