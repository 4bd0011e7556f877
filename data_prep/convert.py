r"""Offline conversion: DICOM studies -> paired, aligned 2.5D records in sharded TFDS format (paper section 4.2).

  python -m data_prep.convert --input=DICOM_ROOT --output=OUT \
      [--phases=arterial,portal,delayed] [--image_size=256] [--file_format=array_record|tfrecord] [--workers=N] \
      [--max_misalignment_px=6] [--phase_rules=FILE | --series_csv=FILE] [--key_file=FILE]

Writes ``OUT/<phase>/`` (a TFDS dataset directory, read with ``data_prep.records.load_split``) and
``OUT/manifest.json``. The HMAC key for case ids is ``--key_file`` or ``OUT.hmac_key`` beside ``OUT``.

How a run is organised, so that a killed run can be rerun to the same result:
1. scan the input, decide phases, assign each case its id and split (cheap, in this process);
2. convert cases in parallel (``--workers`` processes, one case at a time each); a finished case leaves its
   serialized records and a summary in ``OUT/.cache/<settings hash>/``, written under temporary names and renamed
   when complete, so a rerun reuses finished cases and redoes the rest;
3. write every shard from the cache in a fixed order (temporary name, then rename), the TFDS metadata, and the
   manifest; then delete the cache.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import time

import cv2
import numpy as np

from data_prep import align
from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import privacy
from data_prep import records

log = logging.getLogger("data_prep.convert")

CACHE_DIR = ".cache"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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

  def fingerprint(self, key: bytes) -> str:
    """Hash of the settings that decide a case's records (and of the key), naming the cache."""
    d = dataclasses.asdict(self)
    for k in ("workers", "output", "file_format", "examples_per_shard", "split_fractions", "split_seed", "fold",
              "num_folds", "key_file"):
      d.pop(k)
    d["rules"] = _file_digest(self.phase_rules) + _file_digest(self.series_csv)
    d["key"] = hashlib.sha256(key).hexdigest()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------- planning


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


def balance_splits(cases: list["CasePlan"], settings: Settings) -> None:
  """Gives every split with a non-zero fraction at least one patient, when there are enough patients.

  Hash splits are stable as a dataset grows, but on a handful of patients they can leave a split empty. Each empty
  split then takes, from the split with the most patients, the patient whose hash fraction lies nearest to the
  empty split's interval. Deterministic for a given set of patients; a no-op for k-fold splits.
  """
  if settings.fold is not None:
    return
  names = ("train", "validation", "test")
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


def _rank_splits(cases: list["CasePlan"], settings: Settings, names) -> None:
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


# ---------------------------------------------------------------------------------------------- one case


def _load_labels(labels_dir: pathlib.Path | None, shape: tuple[int, int, int]) -> np.ndarray | None:
  """uint8 (S, H, W) non-contrast labels (slice 0 cranial) if the case has them (phantom), else None."""
  # Assumes the label volume covers the series slice for slice, as the phantom writes it.
  if labels_dir is None:
    return None
  path = labels_dir / f"{phases_lib.NON_CONTRAST}.nii.gz"
  if not path.exists():
    return None
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  # The phantom writes labels with SimpleITK in increasing table position (caudal slice first).
  data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[::-1]
  if data.shape == shape:
    return np.ascontiguousarray(data).astype(np.uint8)
  log.warning("labels of shape %s do not match the series %s; ignored", data.shape, shape)
  return None


def _square(img: np.ndarray, fill) -> np.ndarray:
  h, w = img.shape[-2:]
  if h == w:
    return img
  n = max(h, w)
  out = np.full(img.shape[:-2] + (n, n), fill, img.dtype)
  y, x = (n - h) // 2, (n - w) // 2
  out[..., y:y + h, x:x + w] = img
  return out


def resize_square(img: np.ndarray, size: int, nearest: bool, fill) -> np.ndarray:
  """(..., H, W) -> (..., size, size): HU by area averaging (rounded), masks and labels by nearest neighbour."""
  img = _square(img, fill)
  if img.shape[-1] == size:
    return img
  if img.ndim == 3:
    return np.stack([resize_square(x, size, nearest, fill) for x in img])
  if nearest:
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)
  out = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
  return np.clip(np.rint(out), -32768, 32767).astype(img.dtype)


def convert_case(plan: CasePlan, settings: Settings, cache: pathlib.Path | None, sink=None) -> dict:
  """Converts one study for every requested phase; returns its summary.

  Records go to ``cache`` (serialized, one framed file per phase), or, when ``sink`` is given, to
  ``sink(phase, example_dict)`` (the TFDS builder).
  """
  summary = {"case_id": plan.case_id, "study": plan.study_tag, "split": plan.split, "folder": plan.folder,
             "phases": {}, "skipped_series": []}
  pending = [p for p in settings.phases]
  if phases_lib.NON_CONTRAST not in plan.series:
    for phase in pending:
      summary["phases"][phase] = {"skipped": "study has no non-contrast series"}
    return summary
  pre_series = plan.series[phases_lib.NON_CONTRAST]
  try:
    pre_geometry = dicom_io.check_geometry(pre_series)
    pre = dicom_io.read_volume(pre_geometry)
  except dicom_io.SeriesRejected as e:
    summary["skipped_series"].append({"phase": phases_lib.NON_CONTRAST, "reason": str(e)})
    for phase in pending:
      summary["phases"][phase] = {"skipped": f"non-contrast series rejected: {e}"}
    return summary
  labels = _load_labels(plan.labels_dir, pre.hu.shape)
  spacing = pre_geometry.pixel_spacing_mm[1] * max(pre.hu.shape[1:]) / settings.image_size
  features = records.features(settings.image_size)
  masks = [align.body_mask(s, None if pre.padding is None else pre.padding[i]) for i, s in enumerate(pre.hu)]
  # Every phase's records share the non-contrast slices, masks and labels: resize them once per case.
  size = settings.image_size
  shared = _SharedSlices(
      pre=resize_square(pre.hu, size, False, -1024),
      masks=resize_square(np.stack(masks), size, True, 0),
      labels=resize_square(labels, size, True, 0) if labels is not None else np.zeros((len(masks), size, size),
                                                                                      np.uint8))
  for phase in pending:
    if phase not in plan.series:
      summary["phases"][phase] = {"skipped": f"study has no {phase} series"}
      continue
    try:
      geometry = dicom_io.check_geometry(plan.series[phase], normal=pre_geometry.normal)
      post = dicom_io.read_volume(geometry)
      if geometry.shape != pre_geometry.shape or not np.allclose(geometry.pixel_spacing_mm,
                                                                  pre_geometry.pixel_spacing_mm, atol=1e-3):
        raise dicom_io.SeriesRejected("image matrix or pixel spacing differs from the non-contrast series")
    except dicom_io.SeriesRejected as e:
      summary["skipped_series"].append({"phase": phase, "reason": str(e)})
      summary["phases"][phase] = {"skipped": f"{phase} series rejected: {e}"}
      continue
    summary["phases"][phase] = _convert_pair(
        plan, settings, pre, masks, shared, post, spacing, features,
        None if cache is None else cache / f"{plan.name}.{phase}.rec",
        None if sink is None else (lambda example, phase=phase: sink(phase, example)))
    del post
  return summary


def case_examples(plan: CasePlan, settings: Settings) -> list[tuple[str, dict]]:
  """(unique key, example) for every record of a case (one phase in ``settings.phases``): the TFDS builder's unit
  of work, also as a Beam transform."""
  out = []
  convert_case(plan, settings, None, sink=lambda _, example: out.append(example))
  return [(f"{plan.name}-{int(example['slice_index']):05d}", example) for example in out]


@dataclasses.dataclass
class _SharedSlices:
  """A case's non-contrast data at the output size, shared by its phases (``image_size`` square)."""

  pre: np.ndarray  # int16 (S, size, size) HU
  masks: np.ndarray  # uint8 (S, size, size)
  labels: np.ndarray  # uint8 (S, size, size); zeros without label volumes


def _convert_pair(plan, settings, pre, masks, shared, post, spacing, features, out_path, sink) -> dict:
  """Pairs, aligns and serializes one (non-contrast, contrast) series pair; returns the phase's case stats."""
  pre_z, post_z = pre.geometry.table_z_mm, post.geometry.table_z_mm
  if settings.align:
    offset, z_score = align.estimate_z_offset(pre.hu, pre_z, post.hu, post_z, search_mm=settings.z_search_mm)
  else:
    offset, z_score = 0.0, float("nan")
  pairs = align.pair_slices(pre_z, post_z, offset)
  size, n = settings.image_size, len(pre.hu)
  serialized, excluded, shifts, mis, eccs, worst = [], [], [], [], [], []
  for i, j in enumerate(pairs):
    where = {"case_id": plan.case_id, "slice_index": i, "table_z_mm": round(float(pre_z[i]), 3)}
    if j is None:
      excluded.append({**where, "reason": "no contrast slice within half a slice of the corrected table position"})
      continue
    if settings.align:
      try:
        result = align.align_slice(pre.hu[i], post.hu[j], masks[i], ecc_size=settings.ecc_size)
      except align.AlignmentFailed as e:
        excluded.append({**where, "reason": str(e)})
        continue
      if result.misalignment_px > settings.max_misalignment_px:
        excluded.append({**where, "reason": f"misalignment {result.misalignment_px:.2f} px > "
                                            f"{settings.max_misalignment_px:g} px",
                         "misalignment_px": round(result.misalignment_px, 3)})
        continue
      post_hu, m, cc = result.post_hu, result.misalignment_px, result.ecc_score
      shifts.append(result.shift_px)
      worst.append(result.max_displacement_px)
    else:
      post_hu, m, cc = post.hu[j], 0.0, float("nan")
    mis.append(m)
    eccs.append(cc)
    example = {
        "pre": shared.pre[[max(i - 1, 0), i, min(i + 1, n - 1)]],
        "post": resize_square(post_hu, size, False, -1024),
        "body_mask": shared.masks[i],
        "labels": shared.labels[i],
        "case_id": plan.case_id,
        "slice_index": i,
        "table_z_mm": float(pre_z[i]),
        "pixel_spacing_mm": spacing,
        "misalignment_px": m,
        "ecc_score": cc,
    }
    if sink is not None:
      sink(example)
    else:
      serialized.append(features.serialize_example(example))
  if out_path is not None:
    records.write_framed(out_path, serialized)
  shift = np.mean(shifts, axis=0) if shifts else (float("nan"), float("nan"))
  return {
      "examples": len(mis),
      "pairs": sum(j is not None for j in pairs),
      "z_offset_mm": round(offset, 3),
      "z_score": round(z_score, 4),
      "shift_px_mean": [round(float(v), 3) for v in shift],
      "misalignment_px_mean": round(float(np.mean(mis)), 3) if mis else None,
      "misalignment_px_max": round(float(np.max(mis)), 3) if mis else None,
      "max_displacement_px_max": round(float(np.max(worst)), 3) if worst else None,
      "ecc_score_mean": round(float(np.mean(eccs)), 4) if eccs else None,
      "ecc_score_min": round(float(np.min(eccs)), 4) if eccs else None,
      "excluded_pairs": excluded,
  }


@contextlib.contextmanager
def _pool(workers: int):
  """A process pool of ``workers`` (None for one worker: everything runs in this process)."""
  if workers <= 1:
    yield None
    return
  # Not "fork": this process may already run threads (ArrayRecord's writer pool after an earlier conversion,
  # TensorFlow's), and a forked child inherits their locks; that crashes or hangs the worker. The fork server is
  # a clean process with this module imported once, so workers still start in milliseconds.
  if "forkserver" in multiprocessing.get_all_start_methods():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
  else:
    ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    yield pool


def _run_case(plan: CasePlan, settings: Settings, cache: pathlib.Path) -> dict:
  """Worker entry: converts a case and marks it done; data problems become reasons, never tracebacks."""
  done = cache / f"{plan.name}.json"
  try:
    summary = convert_case(plan, settings, cache)
  except Exception as e:  # pylint: disable=broad-except  # one bad case must not stop the job
    summary = {"case_id": plan.case_id, "study": plan.study_tag, "split": plan.split, "folder": plan.folder,
               "skipped_series": [], "phases": {p: {"skipped": f"conversion failed ({type(e).__name__}: "
                                                           f"{str(e)[:200]})"} for p in settings.phases}}
  tmp = done.with_name(done.name + records.TMP_SUFFIX)
  tmp.write_text(json.dumps(summary))
  os.replace(tmp, done)
  return summary


# ---------------------------------------------------------------------------------------------- the job


def _versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for pkg in ("numpy", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "python-gdcm", "pyjpegls", "opencv-python-headless",
              "tensorflow-datasets", "array-record", "tensorflow-cpu", "tensorflow", "grain", "nibabel"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def run(settings: Settings) -> dict:
  """Runs the whole conversion; returns the manifest (also written to OUT/manifest.json).

  Raises:
    ValueError: bad settings or nothing converted (the message says why).
  """
  root = pathlib.Path(settings.input).resolve()
  out = pathlib.Path(settings.output).resolve()
  if not root.is_dir():
    raise ValueError(f"--input={settings.input} is not a directory")
  unknown = set(settings.phases) - set(phases_lib.CONTRAST_PHASES)
  if unknown or not settings.phases:
    raise ValueError(f"--phases must be a subset of {','.join(phases_lib.CONTRAST_PHASES)}; got {settings.phases}")
  if settings.file_format not in records.FILE_FORMATS:
    raise ValueError(f"--file_format must be one of {records.FILE_FORMATS}")
  if settings.phase_rules and settings.series_csv:
    raise ValueError("give --phase_rules or --series_csv, not both")
  rules = (phases_lib.PhaseRules.from_csv(settings.series_csv) if settings.series_csv else
           phases_lib.PhaseRules.from_rules_file(settings.phase_rules) if settings.phase_rules else
           phases_lib.PhaseRules())
  out.mkdir(parents=True, exist_ok=True)
  key, key_path = privacy.load_or_create_key(out, settings.key_file)
  t0 = time.time()

  log.info("scanning %s", root)
  studies, skipped_files = dicom_io.scan(root)
  cases, skipped_series = plan_cases(studies, rules, root, key, settings)
  log.info("%d studies, %d files skipped", len(cases), len(skipped_files))
  for s in skipped_files:
    log.info("skipped file %s: %s", s.what, s.reason)

  cache = out / CACHE_DIR / settings.fingerprint(key)
  cache.mkdir(parents=True, exist_ok=True)
  for p in cache.iterdir():  # leftovers of a killed run are not trusted
    if p.name.endswith(records.TMP_SUFFIX):
      p.unlink()
  summaries: dict[str, dict] = {}
  todo = []
  for plan in cases:
    done = cache / f"{plan.name}.json"
    if done.exists():
      summaries[plan.name] = json.loads(done.read_text())
    else:
      todo.append(plan)
  if summaries:
    log.info("resuming: %d cases already converted, %d to go", len(summaries), len(todo))
  with _pool(settings.workers) as pool:
    if pool is not None and len(todo) > 1:
      futures = {pool.submit(_run_case, plan, settings, cache): plan for plan in todo}
      for f in concurrent.futures.as_completed(futures):
        plan = futures[f]
        summaries[plan.name] = f.result()
        _log_case(summaries[plan.name])
    else:
      for plan in todo:
        summaries[plan.name] = _run_case(plan, settings, cache)
        _log_case(summaries[plan.name])
    manifest = _assemble(settings, out, cache, cases, summaries, skipped_files, skipped_series, key_path,
                         time.time() - t0, pool)
  total = sum(p["splits"][s]["examples"] for p in manifest["phases"].values() for s in p["splits"])
  if total == 0:
    raise ValueError(_nothing_converted(manifest))
  shutil.rmtree(out / CACHE_DIR, ignore_errors=True)
  return manifest


def _log_case(summary: dict) -> None:
  for phase, stats in summary["phases"].items():
    if "skipped" in stats:
      log.info("case %s %s: skipped: %s", summary["case_id"], phase, stats["skipped"])
    else:
      log.info("case %s %s: %d records, %d pairs excluded, z offset %.2f mm", summary["case_id"], phase,
               stats["examples"], len(stats["excluded_pairs"]), stats["z_offset_mm"])


def _shard_segments(sources: list[tuple[pathlib.Path, int]], lengths: list[int]) -> list[list[tuple]]:
  """Cuts the concatenation of ``sources`` ((framed cache file, record count), in order) into shards of
  ``lengths``; each shard is a list of (file, skip, take)."""
  shards, queue = [], [(path, 0, n) for path, n in sources if n]
  for length in lengths:
    shard = []
    while length:
      path, start, n = queue[0]
      take = min(length, n - start)
      shard.append((path, start, take))
      length -= take
      queue[0] = (path, start + take, n)
      if start + take == n:
        queue.pop(0)
    shards.append(shard)
  return shards


def _write_shard(path: pathlib.Path, segments: list[tuple], file_format: str) -> tuple[int, int]:
  """Worker entry: one shard from segments of cached records."""
  stream = (r for cached, skip, take in segments for r in records.read_framed(cached, skip, take))
  return records.write_shard(path, stream, file_format)


def _assemble(settings, out, cache, cases, summaries, skipped_files, skipped_series, key_path, seconds,
              pool=None) -> dict:
  """Writes every phase's shards (in parallel on ``pool`` when given) and metadata from the cache, then the
  manifest."""
  manifest = {
      "format_version": MANIFEST_VERSION,
      "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
      "hmac_key_file": str(key_path),
      "package_versions": _versions(),
      "seconds": round(seconds, 1),
      "skipped_files": [{"path": s.what, "reason": s.reason} for s in skipped_files],
      "skipped_series": skipped_series + [{"case_id": s["case_id"], "folder": s["folder"], **x}
                                          for s in summaries.values() for x in s["skipped_series"]],
      "phases": {},
  }
  ordered = sorted(cases, key=lambda c: (c.case_id, c.study_tag))
  shard_tasks = []  # (phase, split, shard path, segments)
  for phase in settings.phases:
    phase_dir = out / phase
    phase_dir.mkdir(parents=True, exist_ok=True)
    records.remove_shards(phase_dir)
    per_case, excluded, skipped_cases = {}, [], []
    for plan in ordered:
      stats = summaries[plan.name]["phases"].get(phase, {"skipped": "not converted"})
      if "skipped" in stats:
        skipped_cases.append({"case_id": plan.case_id, "folder": plan.folder, "reason": stats["skipped"]})
        continue
      excluded.extend(stats["excluded_pairs"])
      per_case[plan.name] = {"case_id": plan.case_id, "folder": plan.folder, "split": plan.split,
                             **{k: v for k, v in stats.items() if k != "excluded_pairs"},
                             "excluded": len(stats["excluded_pairs"])}
    split_counts = {}
    for split in records.SPLITS:
      members = [p for p in ordered if p.name in per_case and p.split == split]
      count = sum(per_case[p.name]["examples"] for p in members)
      lengths = records.shard_lengths(count, settings.examples_per_shard)
      sources = [(cache / f"{p.name}.{phase}.rec", per_case[p.name]["examples"]) for p in members]
      for index, segments in enumerate(_shard_segments(sources, lengths)):
        name = records.shard_name(split, settings.file_format, index, len(lengths))
        shard_tasks.append((phase, split, phase_dir / name, segments))
      split_counts[split] = {"examples": count,
                             "cases": len({p.case_id for p in members if per_case[p.name]["examples"]}),
                             "shards": len(lengths)}
    manifest["phases"][phase] = {
        "path": phase,
        "file_format": settings.file_format,
        "splits": split_counts,
        "cases": per_case,
        "excluded_pairs": excluded,
        "skipped_cases": skipped_cases,
    }
  run_all = map if pool is None else pool.map
  written = run_all(_write_shard, [t[2] for t in shard_tasks], [t[3] for t in shard_tasks],
                    [settings.file_format] * len(shard_tasks))
  split_lengths = {phase: {} for phase in settings.phases}  # phase -> split -> (shard lengths, bytes)
  for (phase, split, _, _), (n, nbytes) in zip(shard_tasks, written):
    lengths, total = split_lengths[phase].get(split, ([], 0))
    split_lengths[phase][split] = (lengths + [n], total + nbytes)
  for phase in settings.phases:
    records.write_metadata(out / phase, settings.image_size, settings.file_format, split_lengths[phase],
                           description=f"vcect-jax paired non-contrast / {phase} CT slices (data_prep.convert)")
  tmp = out / (MANIFEST + records.TMP_SUFFIX)
  tmp.write_text(json.dumps(manifest, indent=1, default=_json_default))
  os.replace(tmp, out / MANIFEST)
  return manifest


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, (pathlib.Path,)):
    return str(value)
  raise TypeError(type(value))


def _nothing_converted(manifest: dict) -> str:
  reasons = {}
  for phase in manifest["phases"].values():
    for c in phase["skipped_cases"]:
      reasons[c["reason"]] = reasons.get(c["reason"], 0) + 1
    for p in phase["excluded_pairs"]:
      r = p["reason"].split(" ")[0]
      reasons[f"pairs excluded ({r})"] = reasons.get(f"pairs excluded ({r})", 0) + 1
  if not manifest["phases"] or not any(phase["cases"] or phase["skipped_cases"] for phase in manifest["phases"].values()):
    files = len(manifest["skipped_files"])
    return (f"nothing converted: no CT study found under {manifest['settings']['input']} "
            f"({files} files skipped; see {MANIFEST})")
  top = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:5])
  return f"nothing converted: no slice pair was kept ({top}); see {MANIFEST}"


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> Settings:
  p = argparse.ArgumentParser(prog="python -m data_prep.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="root folder of the DICOM studies (searched recursively)")
  p.add_argument("--output", required=True, help="output folder (manifest.json and one folder per phase)")
  p.add_argument("--phases", default=",".join(phases_lib.CONTRAST_PHASES))
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--file_format", choices=records.FILE_FORMATS, default="array_record")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--max_misalignment_px", type=float, default=6.0)
  rules = p.add_mutually_exclusive_group()
  rules.add_argument("--phase_rules", help="JSON file of phase regular expressions (see data_prep/phases.py)")
  rules.add_argument("--series_csv", help="CSV with columns study,series_uid,phase")
  p.add_argument("--key_file", help="HMAC key for case ids (default: OUT.hmac_key beside OUT, created if missing)")
  p.add_argument("--split_fractions", default="0.8,0.1,0.1", help="train,validation,test fractions by case")
  p.add_argument("--split_method", default="hash", choices=("hash", "rank"),
                 help="hash: stable per-patient splits as data grows; rank: exact fractions for small datasets")
  p.add_argument("--split_seed", type=int, default=0)
  p.add_argument("--fold", type=int, default=None, help="cross-validation fold used as the test split")
  p.add_argument("--num_folds", type=int, default=5)
  p.add_argument("--examples_per_shard", type=int, default=1000)
  p.add_argument("--no_align", dest="align", action="store_false",
                 help="skip the through-plane and ECC alignment (benchmarking only)")
  p.add_argument("--ecc_size", type=int, default=128, help="ECC runs on the body crop downsampled to this size")
  p.add_argument("--z_search_mm", type=float, default=40.0)
  p.add_argument("--verbose", action="store_true")
  a = p.parse_args(argv)
  fractions = tuple(float(x) for x in a.split_fractions.split(","))
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    p.error("--split_fractions needs three non-negative numbers summing to 1")
  if a.fold is not None and not 0 <= a.fold < a.num_folds:
    p.error("--fold must be in [0, --num_folds)")
  logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
  return Settings(input=a.input, output=a.output, phases=tuple(x.strip() for x in a.phases.split(",") if x.strip()),
                  image_size=a.image_size, file_format=a.file_format, workers=max(1, a.workers),
                  max_misalignment_px=a.max_misalignment_px, phase_rules=a.phase_rules, series_csv=a.series_csv,
                  key_file=a.key_file, split_fractions=fractions, split_seed=a.split_seed,
                  split_method=a.split_method, fold=a.fold,
                  num_folds=a.num_folds, examples_per_shard=a.examples_per_shard, align=a.align,
                  ecc_size=a.ecc_size, z_search_mm=a.z_search_mm)


def main(argv: list[str] | None = None) -> int:
  settings = parse_args(argv)
  try:
    manifest = run(settings)
  except (ValueError, OSError) as e:
    print(f"data_prep.convert: error: {e}", file=sys.stderr)
    return 2
  for phase, p in manifest["phases"].items():
    counts = ", ".join(f"{s} {v['examples']} ({v['cases']} cases)" for s, v in p["splits"].items())
    print(f"{phase}: {counts}; {len(p['excluded_pairs'])} pairs excluded, {len(p['skipped_cases'])} cases skipped")
  print(f"{len(manifest['skipped_files'])} files and {len(manifest['skipped_series'])} series skipped; "
        f"see {pathlib.Path(settings.output) / MANIFEST}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
