"""Progress lines of long runs: the ETA format (training, predict) and training's rates and
token shares."""

from __future__ import annotations

import math
import time
from typing import Any, Mapping


PER_SOURCE = "source:"  # counts of one named source: "source:<name>:tokens" / ":examples"


def format_eta(seconds: float) -> str:
  """``h:mm:ss``, or ``?`` when the time left is unknown."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
  """What training's progress lines report: steps/s, tokens/s, the span/document token shares
  and an ETA over the steps since the last line (the first step, which compiles, is timed on its
  own), and the run's token totals."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self.first_step_seconds: float | None = None
    self.totals = dict(span=0.0, doc=0.0, span_target=0.0, doc_target=0.0)
    self.t_start = time.time()
    self._new_window()

  def _new_window(self) -> None:
    self.window = dict(tokens=0.0, steps=0, span=0.0, doc=0.0, t=time.time())

  def step_done(self, seconds: float, tokens: float, counts: Mapping[str, float]) -> bool:
    """Records a step that took ``seconds`` and trained ``tokens`` tokens, ``counts`` of them
    from spans and documents (`span`, `doc`, `span_target`, `doc_target`); True for the first
    step of the run."""
    first = self.first_step_seconds is None
    if first:
      self.first_step_seconds = seconds
      self.window["t"] = time.time()
    else:
      self.window["tokens"] += tokens
      self.window["steps"] += 1
    for kind in ("span", "doc"):
      self.window[kind] += counts[kind]
    for kind in ("span", "doc", "span_target", "doc_target"):
      self.totals[kind] += counts[kind]
    for kind, n in counts.items():  # named sources (data.sources), those this batch holds
      if kind.startswith(PER_SOURCE):
        self.window[kind] = self.window.get(kind, 0.0) + n
        self.totals[kind] = self.totals.get(kind, 0.0) + n
    return first

  def report(self, step: int) -> tuple[dict[str, float], str]:
    """The rates since the last report (for the metrics) and their text for the progress line
    at ``step``; starts a new window."""
    window = self.window
    elapsed = time.time() - window["t"]
    steps_per_s = window["steps"] / elapsed if window["steps"] and elapsed > 0 else 0.0
    tokens_per_s = window["tokens"] / elapsed if window["steps"] and elapsed > 0 else 0.0
    kinds = window["span"] + window["doc"]
    span_frac = window["span"] / kinds if kinds else float("nan")
    eta = (self.total_steps - step) / steps_per_s if steps_per_s else float("nan")
    speed = (f"{steps_per_s:.2f} steps/s  {tokens_per_s:,.0f} tok/s  " if window["steps"] else "")
    kind_text = (f"tokens {100 * span_frac:.0f}% span / {100 * (1 - span_frac):.0f}% doc"
                 if kinds else "span/doc split n/a")
    shares = source_shares(window)
    self._new_window()
    rates = dict(steps_per_s=steps_per_s, tokens_per_s=tokens_per_s,
                 span_token_fraction=span_frac, **shares)
    return rates, f"{speed}{kind_text}{describe_shares(shares)}  ETA {format_eta(eta)}"

  def summary(self) -> dict[str, Any]:
    """Seconds since the start, the first step's, and the span shares of all and of target
    tokens over the run (None without source counts)."""
    kinds = self.totals["span"] + self.totals["doc"]
    targets = self.totals["span_target"] + self.totals["doc_target"]
    return dict(seconds=time.time() - self.t_start, first_step_seconds=self.first_step_seconds,
                span_token_fraction=self.totals["span"] / kinds if kinds else None,
                span_target_fraction=self.totals["span_target"] / targets if targets else None,
                **source_shares(self.totals))

  def totals_line(self) -> str | None:
    """The run's tokens by source, or None when the batches said nothing of sources."""
    totals = self.totals
    kinds = totals["span"] + totals["doc"]
    if not kinds:
      return None
    targets = totals["span_target"] + totals["doc_target"]
    return (f"tokens trained this run: {int(kinds):,} ({100 * totals['span'] / kinds:.1f}% "
            f"spans, {100 * totals['doc'] / kinds:.1f}% documents); target tokens "
            f"{int(targets):,} ({100 * totals['span_target'] / max(targets, 1):.1f}% spans, "
            f"{100 * totals['doc_target'] / max(targets, 1):.1f}% documents)"
            f"{describe_shares(source_shares(totals))}")


def source_shares(counts: Mapping[str, float]) -> dict[str, float]:
  """Each named source's fraction of the tokens and examples counted (metrics keys)."""
  per = {k[len(PER_SOURCE):]: v for k, v in counts.items() if k.startswith(PER_SOURCE)}
  out = {}
  for what in ("tokens", "examples"):
    total = sum(v for k, v in per.items() if k.endswith(f":{what}"))
    for k, v in per.items():
      name, kind = k.rsplit(":", 1)
      if kind == what and total:
        out[f"source_{'token' if what == 'tokens' else 'example'}_fraction/{name}"] = v / total
  return out


def describe_shares(shares: Mapping[str, float]) -> str:
  """``; sources (tokens/examples): mimic 40%/5%, ...`` for the log line ("" without them)."""
  names = [k.split("/", 1)[1] for k in shares if k.startswith("source_token_fraction/")]
  if not names:
    return ""
  return "; sources (tokens/examples): " + ", ".join(
      f"{n} {100 * shares[f'source_token_fraction/{n}']:.0f}%/"
      f"{100 * shares.get(f'source_example_fraction/{n}', 0.0):.0f}%" for n in names)
