"""Training metrics: TensorBoard event files and ``metrics.jsonl`` in the workdir.

Only process 0 writes (the values are global anyway); other processes get a no-op writer.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping


class MetricsWriter:
  """Appends one JSON line per ``write`` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = workdir / "metrics.jsonl"
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # still have metrics.jsonl; say why TensorBoard is missing
        import logging
        logging.warning("tensorboardX is not installed: writing metrics.jsonl only")
      else:
        self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"), flush_secs=10)

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {}
    for key, value in metrics.items():
      value = float(value)
      clean[prefix + key] = value if math.isfinite(value) else str(value)
      if self._tb is not None and math.isfinite(value):
        self._tb.add_scalar(prefix + key, value, global_step=step)
    record = {"step": int(step), "time": round(time.time(), 3), **clean}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(tag, text, global_step=step)

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """All records of ``metrics.jsonl`` (for tests, benches and reports)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
