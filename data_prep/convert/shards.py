"""The output side of a conversion: the per-case cache, the record shards, the TFDS metadata and the manifest.

A finished case leaves its serialized records (one framed file per phase) and a summary in
``OUT/.cache/<settings hash>/``, written under temporary names and renamed when complete. The shards are then cut
from the cache in a fixed order (cases sorted by id), each written under a temporary name and renamed, so that a
rerun of a killed job gives the same dataset.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import sys

import numpy as np

from data_prep import records
from data_prep.convert.plan import CasePlan
from data_prep.convert.plan import Settings

CACHE_DIR = ".cache"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def open_cache(out: pathlib.Path, settings: Settings, key: bytes) -> pathlib.Path:
  """The cache folder of these settings and key, without the debris of a killed run."""
  cache = out / CACHE_DIR / settings.fingerprint(key)
  cache.mkdir(parents=True, exist_ok=True)
  for p in cache.iterdir():  # leftovers of a killed run are not trusted
    if p.name.endswith(records.TMP_SUFFIX):
      p.unlink()
  return cache


def summary_path(cache: pathlib.Path, plan: CasePlan) -> pathlib.Path:
  """Where a finished case's summary lies (its presence marks the case done)."""
  return cache / f"{plan.name}.json"


def records_path(cache: pathlib.Path, plan: CasePlan, phase: str) -> pathlib.Path:
  """The framed file of a case's serialized records of one phase."""
  return cache / f"{plan.name}.{phase}.rec"


def finished_cases(cache: pathlib.Path, cases: list[CasePlan]) -> dict[str, dict]:
  """Case name -> summary, for the cases a previous run finished."""
  out = {}
  for plan in cases:
    done = summary_path(cache, plan)
    if done.exists():
      out[plan.name] = json.loads(done.read_text())
  return out


def mark_done(cache: pathlib.Path, plan: CasePlan, summary: dict) -> None:
  """Writes a case's summary atomically: the case counts as converted from then on."""
  done = summary_path(cache, plan)
  tmp = done.with_name(done.name + records.TMP_SUFFIX)
  tmp.write_text(json.dumps(summary))
  os.replace(tmp, done)


def _versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for pkg in ("numpy", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "python-gdcm", "pyjpegls",
              "opencv-python-headless", "tensorflow-datasets", "array-record", "tensorflow-cpu", "tensorflow", "grain",
              "nibabel"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


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


def write_shard(path: pathlib.Path, segments: list[tuple], file_format: str) -> tuple[int, int]:
  """Worker entry: one shard from segments of cached records; returns (records, bytes)."""
  stream = (r for cached, skip, take in segments for r in records.read_framed(cached, skip, take))
  return records.write_shard(path, stream, file_format)


def assemble(settings: Settings, out: pathlib.Path, cache: pathlib.Path, cases: list[CasePlan],
             summaries: dict[str, dict], skipped_files: list, skipped_series: list[dict], key_path: pathlib.Path,
             seconds: float, pool=None) -> dict:
  """Writes every phase's shards (in parallel on ``pool`` when given) and metadata from the cache, then the
  manifest; returns the manifest."""
  manifest = {
      "format_version": MANIFEST_VERSION,
      "settings": dict(dataclasses.asdict(settings).items()),
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
      sources = [(records_path(cache, p, phase), per_case[p.name]["examples"]) for p in members]
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
  written = run_all(write_shard, [t[2] for t in shard_tasks], [t[3] for t in shard_tasks],
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


def read_manifest(out: str | os.PathLike) -> dict:
  """The manifest of a converted dataset (``OUT/manifest.json``)."""
  return json.loads((pathlib.Path(out) / MANIFEST).read_text())


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, (pathlib.Path,)):
    return str(value)
  raise TypeError(type(value))


def nothing_converted(manifest: dict) -> str:
  """Why a conversion produced no record, for the error message: the main reasons and what to do about them."""
  where = pathlib.Path(manifest["settings"]["output"]) / MANIFEST
  reasons = {}
  for phase in manifest["phases"].values():
    for c in phase["skipped_cases"]:
      reasons[c["reason"]] = reasons.get(c["reason"], 0) + 1
    for p in phase["excluded_pairs"]:
      r = p["reason"].split(" ")[0]
      reasons[f"pairs excluded ({r})"] = reasons.get(f"pairs excluded ({r})", 0) + 1
  series = {}
  for s in manifest["skipped_series"]:
    series[s["reason"]] = series.get(s["reason"], 0) + 1
  unknown = sum(n for r, n in series.items() if r.startswith("unknown series description"))
  hint = ""
  if unknown:
    hint = (f"; {unknown} series had a description that no phase rule knows: name their phase with a "
            "--series_csv row (study,series_uid,phase) or a --phase_rules rule (data_prep/phases.py); the series "
            "are listed under skipped_series")
  if not any(phase["cases"] or phase["skipped_cases"] for phase in manifest["phases"].values()):
    files = len(manifest["skipped_files"])
    return (f"nothing converted: no CT study found under {manifest['settings']['input']} "
            f"({files} files skipped){hint}; see {where}")
  top = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:5])
  return f"nothing converted: no slice pair was kept ({top}){hint}; see {where}"
