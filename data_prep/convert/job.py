"""The conversion job: plan, convert the cases in parallel (resuming from the cache), assemble the shards.

Worker processes come from a fork server that imports this module (never a ``__main__``), so the worker entries
(`run_case`, `shards.write_shard`) are functions of importable modules.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import pathlib
import shutil
import time

from data_prep import dicom_io
from data_prep import privacy
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


def run(settings: Settings) -> dict:
  """Runs the whole conversion; returns the manifest (also written to OUT/manifest.json).

  Raises:
    ValueError: bad settings or nothing converted (the message says why).
  """
  settings.check()
  root = pathlib.Path(settings.input).resolve()
  out = pathlib.Path(settings.output).resolve()
  rules = settings.phase_rules_of()
  out.mkdir(parents=True, exist_ok=True)
  key, key_path = privacy.load_or_create_key(out, settings.key_file)
  t0 = time.time()

  log.info("scanning %s", root)
  studies, skipped_files = dicom_io.scan(root)
  cases, skipped_series = plan_cases(studies, rules, root, key, settings)
  log.info("%d studies, %d files skipped", len(cases), len(skipped_files))
  for s in skipped_files:
    log.info("skipped file %s: %s", s.what, s.reason)

  cache = shards.open_cache(out, settings, key)
  summaries = shards.finished_cases(cache, cases)
  todo = [plan for plan in cases if plan.name not in summaries]
  if summaries:
    log.info("resuming: %d cases already converted, %d to go", len(summaries), len(todo))
  with _pool(settings.workers) as pool:
    if pool is not None and len(todo) > 1:
      futures = {pool.submit(run_case, plan, settings, cache): plan for plan in todo}
      for f in concurrent.futures.as_completed(futures):
        plan = futures[f]
        summaries[plan.name] = f.result()
        _log_case(summaries[plan.name])
    else:
      for plan in todo:
        summaries[plan.name] = run_case(plan, settings, cache)
        _log_case(summaries[plan.name])
    manifest = shards.assemble(settings, out, cache, cases, summaries, skipped_files, skipped_series, key_path,
                               time.time() - t0, pool)
  total = sum(p["splits"][s]["examples"] for p in manifest["phases"].values() for s in p["splits"])
  if total == 0:
    raise ValueError(shards.nothing_converted(manifest))
  shutil.rmtree(out / shards.CACHE_DIR, ignore_errors=True)
  return manifest


def _log_case(summary: dict) -> None:
  for phase, stats in summary["phases"].items():
    if "skipped" in stats:
      log.info("case %s %s: skipped: %s", summary["case_id"], phase, stats["skipped"])
    else:
      log.info("case %s %s: %d records, %d pairs excluded, z offset %.2f mm", summary["case_id"], phase,
               stats["examples"], len(stats["excluded_pairs"]), stats["z_offset_mm"])
