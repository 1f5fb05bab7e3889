"""Progress lines shared by training and predict."""

from __future__ import annotations

import math


def format_eta(seconds: float) -> str:
  """``h:mm:ss``, or ``?`` when the time left is unknown."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
