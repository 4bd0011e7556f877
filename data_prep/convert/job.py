"""The conversion job: plan, convert the cases in parallel (resuming from the cache), assemble the shards.

Worker processes come from a fork server that imports this module (never a ``__main__``), so the worker entries
(`run_case`, `shards.write_shard`) are functions of importable modules.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import time

from data_prep import dicom_io
from data_prep import phases as phases_lib
from data_prep import privacy
from data_prep import progress as progress_lib
from data_prep.convert import shards
from data_prep.convert.case import convert_case
from data_prep.convert.plan import CasePlan
from data_prep.convert.plan import Settings
from data_prep.convert.plan import plan_cases

log = logging.getLogger("data_prep.convert")


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


def run_case(plan: CasePlan, settings: Settings, cache: pathlib.Path) -> dict:
  """Worker entry: converts a case and marks it done; data problems become reasons, never tracebacks."""
  try:
    summary = convert_case(plan, settings, cache)
  except Exception as e:  # pylint: disable=broad-except  # one bad case must not stop the job
    summary = {"case_id": plan.case_id, "study": plan.study_tag, "split": plan.split, "folder": plan.folder,
               "skipped_series": [], "phases": {p: {"skipped": f"conversion failed ({type(e).__name__}: "
                                                           f"{str(e)[:200]})"} for p in settings.phases}}
  shards.mark_done(cache, plan, summary)
  return summary


def check_output(settings: Settings, overwrite: bool = False) -> None:
  """Refuses an output folder that holds something else than this conversion (or the debris of a killed run of
  it); with ``overwrite``, removes an earlier conversion made with other settings (only what a conversion writes).

  Raises:
    FileExistsError: the folder holds another conversion (without ``overwrite``) or files that no conversion
      writes (the message says what to do).
  """
  out = pathlib.Path(settings.output).resolve()
  if not out.exists():
    return
  if not out.is_dir():
    raise FileExistsError(f"--output={settings.output} is a file: choose a folder")
  if pathlib.Path(settings.input).resolve() == out:
    raise FileExistsError(f"--output={settings.output} is the input folder: choose another one")
  manifest_path = out / shards.MANIFEST
  old = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
  ours = {shards.MANIFEST, shards.MANIFEST + ".tmp", shards.CACHE_DIR, *phases_lib.CONTRAST_PHASES}
  foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
  if foreign:
    raise FileExistsError(
        f"--output={settings.output} already holds files that are not a conversion ({', '.join(foreign[:3])}"
        f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder")
  if old is None:
    return  # empty, or a killed run: the cache lets this run resume
  differ = _differing_settings(old.get("settings", {}), settings)
  if not differ:
    return  # the same conversion again: rewritten identically
  if not overwrite:
    raise FileExistsError(
        f"--output={settings.output} holds a conversion made with other settings ({'; '.join(differ[:4])}): "
        "pass --overwrite to replace it, or choose another --output")
  log.warning("--overwrite: replacing the conversion in %s (%s)", out, "; ".join(differ))
  for name in (shards.MANIFEST, shards.CACHE_DIR, *phases_lib.CONTRAST_PHASES):
    path = out / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()


def _differing_settings(old: dict, settings: Settings) -> list[str]:
  """`name: old -> new` for every setting (`workers` aside) that differs from an earlier manifest's."""
  new = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
  out = []
  for name in ("input", "key_file", "phase_rules", "series_csv"):  # the same file however it is spelt
    for d in (old, new):
      if d.get(name):
        d[name] = os.path.realpath(d[name])
  for name in sorted(set(old) | set(new)):
    if name not in ("workers", "output") and old.get(name) != new.get(name):
      out.append(f"{name}: {old.get(name)} -> {new.get(name)}")
  return out


def run(settings: Settings, overwrite: bool = False, emit_progress=None) -> dict:
  """Runs the whole conversion; returns the manifest (also written to OUT/manifest.json).

  Args:
    settings: what to convert and how.
    overwrite: replace an earlier conversion in the output folder made with other settings (else refused).
    emit_progress: where the progress lines (cases done, ETA) go; default: this module's logger at INFO.

  Raises:
    ValueError: bad settings or nothing converted (the message says why).
    FileExistsError: the output folder holds something else (`check_output`).
  """
  settings.check()
  check_output(settings, overwrite)
  root = pathlib.Path(settings.input).resolve()
  out = pathlib.Path(settings.output).resolve()
  rules = settings.phase_rules_of()
  out.mkdir(parents=True, exist_ok=True)
  new_key = not settings.key_file and not privacy.default_key_path(out).exists()
  key, key_path = privacy.load_or_create_key(out, settings.key_file)
  t0 = time.time()

  log.info("scanning %s", root)
  studies, skipped_files = dicom_io.scan(root)
  cases, skipped_series = plan_cases(studies, rules, root, key, settings)
  log.info("%d studies; %s", len(cases), skip_summary([s.reason for s in skipped_files], "files"))
  for s in skipped_files:
    log.debug("skipped file %s: %s", s.what, s.reason)

  cache = shards.open_cache(out, settings, key)
  summaries = shards.finished_cases(cache, cases)
  todo = [plan for plan in cases if plan.name not in summaries]
  if summaries:
    log.info("resuming: %d cases already converted, %d to go", len(summaries), len(todo))
  progress = progress_lib.Progress("converting", len(todo), "cases", emit=emit_progress or log.info)
  with _pool(settings.workers) as pool:
    if pool is not None and len(todo) > 1:
      futures = {pool.submit(run_case, plan, settings, cache): plan for plan in todo}
      for done, f in enumerate(concurrent.futures.as_completed(futures), 1):
        plan = futures[f]
        summaries[plan.name] = f.result()
        _log_case(summaries[plan.name])
        progress.update(done)
    else:
      for done, plan in enumerate(todo, 1):
        summaries[plan.name] = run_case(plan, settings, cache)
        _log_case(summaries[plan.name])
        progress.update(done)
    manifest = shards.assemble(settings, out, cache, cases, summaries, skipped_files, skipped_series, key_path,
                               time.time() - t0, pool)
  total = sum(p["splits"][s]["examples"] for p in manifest["phases"].values() for s in p["splits"])
  shutil.rmtree(out / shards.CACHE_DIR, ignore_errors=True)
  if total == 0:
    for phase in settings.phases:  # empty shards and metadata: nothing a reader could use
      shutil.rmtree(out / phase, ignore_errors=True)
    if new_key:  # a key made for this run pseudonymised nothing
      key_path.unlink(missing_ok=True)
    raise ValueError(shards.nothing_converted(manifest))
  return manifest


def skip_summary(reasons: list[str], what: str) -> str:
  """One line for many skipped items: `98 files skipped (80 x not a DICOM file, 18 x ...)`; the details (which
  item, why) stay in the manifest."""
  if not reasons:
    return f"no {what} skipped"
  counts = collections.Counter(reasons)
  kinds = ", ".join(f"{n} x {reason}" for reason, n in counts.most_common(4))
  more = f", {len(counts) - 4} more kinds" if len(counts) > 4 else ""
  return f"{len(reasons)} {what} skipped ({kinds}{more}; listed in {shards.MANIFEST})"


def _log_case(summary: dict) -> None:
  """One line per case: each phase's records, exclusions and z offset, or why the phase was skipped."""
  parts = []
  for phase, stats in summary["phases"].items():
    if "skipped" in stats:
      parts.append(f"{phase} skipped ({stats['skipped']})")
    else:
      parts.append(f"{phase} {stats['examples']} records ({len(stats['excluded_pairs'])} pairs excluded, "
                   f"z offset {stats['z_offset_mm']:.2f} mm)")
  log.info("case %s: %s", summary["case_id"], "; ".join(parts))
