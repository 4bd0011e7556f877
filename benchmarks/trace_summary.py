"""Where a jitted function's time goes: XLA operation time per operation from a `jax.profiler` trace.

    python -m benchmarks.trace_summary TRACE_DIR [--top 30] [--json out.json]

Reads the newest `*.xplane.pb` under TRACE_DIR (what `jax.profiler.trace(TRACE_DIR)` writes) with JAX's own
reader (`jax.profiler.ProfileData`: no TensorBoard, no xprof) and sums the duration of every XLA operation:
  * on a GPU (a `/device:GPU:N` plane): the events of its "XLA Ops" line, i.e. the HLO instructions as the device ran
    them (cuDNN convolutions are custom calls there, fusions are named by kind), grouped by the `hlo_category` that
    XLA attaches (convolution, data formatting, non-fusion elementwise, ...) where present, else by name;
  * on a CPU (the `/host:CPU` plane): the events of XLA's threads (`tf_XLA...` lines) that name HLO
    instructions (`convolution.3`, `loop_fusion.12`, `custom-call.1`), grouped by name with the instance number
    removed. Python and runtime frames (PjitFunction, ThunkExecutor::Execute, ...) are left out. The CPU runtime
    also splits an operation into tasks on its Eigen threads, under other names (`convolution` for a
    `conv_general_dilated.0` thunk): on a CPU the totals count such work twice; read them as a ranking.
Within one timeline line only outermost events count (a nested event is part of its parent's time).
The table lists the groups by total time with their share of all operation time, and the number of events: the
profile that issue 14 asks for before any optimisation ("shares of convolutions, BatchNorm, concatenations,
transposes"). Operations that overlap (several CPU threads, several GPU streams) are summed, so shares are of the
summed operation time, not of wall-clock time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

_INSTANCE = re.compile(r"[.:]\d+$")
# Runtime and Python frames on the host plane: not XLA operations.
_NOT_OPS = re.compile(r"^(\$|Pjit|PjRt|Thunk|Common|Execute|Tfrt|TfrtCpu|BufferAllocation|jit_|XlaModule|"
                      r"ProcessPjit|Py|Wait|ThreadPool|Eigen)|::")


def newest_xspace(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: write one with jax.profiler.trace({trace_dir!r})")
  return max(paths, key=os.path.getmtime)


def _stat(event, name: str):
  """One stat of a trace event (XLA attaches e.g. `hlo_category` to GPU operations), or None."""
  try:
    for key, value in event.stats:
      if key == name:
        return value
  except (TypeError, ValueError, AttributeError):  # a reader whose stats are not (name, value) pairs
    return None
  return None


def _top_level(events):
  """The events of one timeline line that no earlier event of the line contains (nested ones are counted in
  their parent)."""
  end = -1
  for event in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
    if event.start_ns >= end:
      end = event.start_ns + event.duration_ns
      yield event


def op_events(xspace_path: str) -> tuple[str, list[tuple[str, str, float]]]:
  """(where, [(group, op name, duration in ms)]) of the XLA operations in one trace file."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  profile = ProfileData.from_file(xspace_path)
  planes = list(profile.planes)
  devices = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
  events = []
  if devices:
    for plane in devices:
      for line in plane.lines:
        if line.name != "XLA Ops":
          continue
        for event in _top_level(line.events):
          category = _stat(event, "hlo_category")
          events.append((str(category) if category else _INSTANCE.sub("", event.name), event.name,
                         event.duration_ns / 1e6))
    return ", ".join(p.name for p in devices), events
  for plane in planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in _top_level(e for e in line.events if not (_NOT_OPS.search(e.name) or " " in e.name)):
        events.append((_INSTANCE.sub("", event.name), event.name, event.duration_ns / 1e6))
  return "/host:CPU (XLA's worker threads)", events


def summarise(trace_dir: str, top: int = 30) -> dict:
  """Per-group totals of the newest trace under `trace_dir`, largest first."""
  where, events = op_events(newest_xspace(trace_dir))
  totals, counts = collections.Counter(), collections.Counter()
  for group, _, ms in events:
    totals[group] += ms
    counts[group] += 1
  total = sum(totals.values())
  rows = [{"group": g, "ms": ms, "share": ms / total if total else 0.0, "events": counts[g]}
          for g, ms in totals.most_common(top)]
  return {"where": where, "total_ms": total, "events": len(events), "groups": len(totals), "rows": rows}


def table(summary: dict) -> str:
  lines = [f"XLA operation time in {summary['where']}: {summary['total_ms']:.1f} ms over {summary['events']} events "
           f"in {summary['groups']} groups (summed over threads/streams)",
           "| operation (group) | time (ms) | share | events |", "|---|---|---|---|"]
  lines += [f"| {r['group']} | {r['ms']:.2f} | {r['share'] * 100:.1f}% | {r['events']} |" for r in summary["rows"]]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace_dir", help="the directory given to jax.profiler.trace")
  parser.add_argument("--top", type=int, default=30, help="groups listed")
  parser.add_argument("--json", default="", help="write the summary here too")
  args = parser.parse_args(argv)
  summary = summarise(args.trace_dir, args.top)
  print(table(summary))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)
  return summary


if __name__ == "__main__":
  main()
