"""The decision rule: which scored candidate codes a note gets, calibrated on validation notes.

The coder scores every candidate code of a note (see `jaxicd.infer.coder`); the rule keeps the
codes whose score reaches a global threshold. `choose_threshold` picks the threshold that
maximises micro-F1 on validation notes with their gold codes; `save` stores it in the workdir
(``calibration.json``, with the checkpoint step it was chosen for) and `resolve_threshold` gives
eval and predict the threshold to apply. Test notes never choose it: `CodingEval` refuses to
calibrate on a split other than the validation split.

One global threshold, not one per chapter: with tens of validation notes, most chapters hold a
handful of gold codes, and per-chapter thresholds would fit noise.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Collection, Mapping, Sequence

FILENAME = "calibration.json"


def choose_threshold(gold: Sequence[Collection[str]],
                     scores: Sequence[Mapping[str, float]]) -> tuple[float, float]:
  """The threshold on code scores that maximises micro-F1 over the notes, and that F1.

  Args:
    gold: each note's gold codes.
    scores: each note's candidate codes with their scores.

  Keeping the codes with ``score >= threshold``; among thresholds with the same F1, the lowest
  (ties resolved towards recall). With no candidate at all: (0.0, F1 of predicting nothing).
  """
  if len(gold) != len(scores):
    raise ValueError(f"{len(gold)} gold notes but {len(scores)} scored notes")
  candidates = sorted(((s, c in g) for g, sc in zip(gold, scores) for c, s in sc.items()),
                      key=lambda x: -x[0])
  n_gold = sum(len(set(g)) for g in gold)
  best_f1, best_t = _f1(0, 0, n_gold), math.inf
  tp = fp = 0
  for k, (score, correct) in enumerate(candidates):
    tp += int(correct)
    fp += int(not correct)
    if k + 1 < len(candidates) and candidates[k + 1][0] == score:
      continue  # a threshold keeps every candidate of equal score
    f1 = _f1(tp, fp, n_gold - tp)
    if f1 >= best_f1:
      best_f1, best_t = f1, score
  return (0.0 if best_t == math.inf else float(best_t)), best_f1


def _f1(tp: int, fp: int, fn: int) -> float:
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def save(workdir: str | os.PathLike, threshold: float, **info: Any) -> pathlib.Path:
  """Writes ``<workdir>/calibration.json`` (atomically) with the threshold and `info`."""
  path = pathlib.Path(workdir) / FILENAME
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"threshold": float(threshold), **info}, indent=1, sort_keys=True))
  os.replace(tmp, path)
  return path


def load(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The stored calibration of a workdir, or None."""
  path = pathlib.Path(workdir) / FILENAME
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    float(record["threshold"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a calibration record ({e})") from e
  return record


def resolve_threshold(configured: float, workdir: str | os.PathLike | None
                      ) -> tuple[float, str]:
  """The threshold to apply and where it comes from.

  ``configured >= 0`` is used as given; a negative value means "the workdir's calibration",
  or 0 (keep every code) when the workdir has none.
  """
  if configured >= 0:
    return float(configured), "configured"
  record = load(workdir) if workdir else None
  if record is None:
    return 0.0, "none (no calibration.json: every candidate code kept)"
  return float(record["threshold"]), f"calibrated on {record.get('split', 'val')} at step " \
                                     f"{record.get('step', '?')}"


def mismatched_stages(workdir: str | os.PathLike | None, **stages: bool) -> list[str]:
  """The inference stages (``recode=``, ``scan=``) set otherwise than when the workdir's
  threshold was calibrated: candidates scored by other stages make that threshold a guess.
  Stages the calibration did not record are not compared."""
  record = load(workdir) if workdir else None
  if record is None:
    return []
  return [f"{k}={v} (calibrated with {k}={record[k]})" for k, v in stages.items()
          if k in record and bool(record[k]) != bool(v)]
