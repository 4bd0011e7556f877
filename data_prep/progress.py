"""Progress lines with an ETA for the long jobs (phantom, conversion, pretraining, evaluation, inference).

    progress = Progress("converting", total=len(cases), unit="cases")
    for ...:
      progress.update(done)          # logs `converting: 3/10 cases (30%), 0:12 elapsed, ETA 0:28` now and then

A line is emitted for the first item, then at most every `every_s` seconds, and for the last item; `emit` is
`logging.info` of the `data_prep` logger unless given (command lines pass a print to stderr).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("data_prep.progress")


def format_seconds(seconds: float) -> str:
  """`0:07`, `2:05`, `1:02:05`."""
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


class Progress:
  """Counts finished items of a job of known size and reports `done/total`, elapsed time and ETA."""

  def __init__(self, what: str, total: int, unit: str = "", emit: Callable[[str], None] | None = None,
               every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
    self.what, self.total, self.unit = what, int(total), unit
    self.emit = emit or log.info
    self.every_s = every_s
    self.clock = clock
    self.start = clock()
    self._last_emit = None

  def line(self, done: int) -> str:
    elapsed = self.clock() - self.start
    unit = f" {self.unit}" if self.unit else ""
    pct = 100.0 * done / self.total if self.total else 100.0
    text = f"{self.what}: {done}/{self.total}{unit} ({pct:.0f}%), {format_seconds(elapsed)} elapsed"
    if 0 < done < self.total:
      text += f", ETA {format_seconds(elapsed / done * (self.total - done))}"
    return text

  def update(self, done: int) -> None:
    """Reports `done` finished items when it is time to (first, last, or `every_s` after the last report)."""
    now = self.clock()
    if done >= self.total or self._last_emit is None or now - self._last_emit >= self.every_s:
      self._last_emit = now
      self.emit(self.line(done))
