"""Examples of records that fit ``seq_len``: a span as one example, a document as windows.

A document whose encoded example would not fit ``seq_len`` is split into overlapping windows of
note text (`plan_windows`); each window's target lists only the codes whose evidence lies in it
(``prompts.document_target(doc, begin, end)``). Training uses `document_windows` (full examples,
loss on the target) and `encode_span`; the coder uses `inference_windows` (prompts that leave
room for ``max_new_tokens``). An example that cannot fit even alone (e.g. a target longer than
``seq_len``) is truncated and counted in `PipelineStats`; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxicd.data import prompts
from jaxicd.data.records import Document, Span

@dataclasses.dataclass
class PipelineStats:
  """What the pipeline did to the data; shared by the worker threads of one iterator."""

  documents_encoded: int = 0
  windows: int = 0            # document examples produced (a short document is one window)
  multi_window_documents: int = 0
  spans_encoded: int = 0
  truncated: int = 0          # examples cut to seq_len because they could not fit otherwise
  truncated_tokens: int = 0
  split_evidence: int = 0     # evidence quotes no window holds whole (too long for seq_len)
  unshared_spans: int = 0     # share_prompt: span examples kept whole (not after the prefix)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def add(self, **counts: int) -> None:
    with self._lock:
      for k, v in counts.items():
        setattr(self, k, getattr(self, k) + v)

  def as_dict(self) -> dict[str, int]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if not f.name.startswith("_")}


def _as_example(encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = np.asarray(encoded["tokens"], dtype=np.int32)
  mask = np.asarray(encoded["loss_mask"], dtype=np.int32)
  if tokens.shape != mask.shape or tokens.ndim != 1:
    raise ValueError(f"encode_example returned tokens {tokens.shape} and loss_mask "
                     f"{mask.shape}; expected two equal 1-D arrays")
  return {"tokens": tokens, "loss_mask": mask}


def _truncate(example: dict[str, np.ndarray], budget: int,
              stats: PipelineStats | None) -> dict[str, np.ndarray]:
  n = len(example["tokens"])
  if n <= budget:
    return example
  if stats is not None:
    stats.add(truncated=1, truncated_tokens=n - budget)
  return {k: v[:budget] for k, v in example.items()}


def encode_span(tokenizer: Any, span: Span, seq_len: int,
                stats: PipelineStats | None = None, *,
                answer_format: str = "code_first") -> dict[str, np.ndarray]:
  """Encodes one span example; the shifted example fits ``seq_len`` (truncated if not)."""
  example = _as_example(prompts.encode_target(tokenizer, span.text, prompts.span_lines(span),
                                              answer_format))
  if stats is not None:
    stats.add(spans_encoded=1)
  return _truncate(example, seq_len + 1, stats)


def _snap_back(text: str, lo: int, e: int) -> int:
  """Moves ``e`` back to just after whitespace in (lo, e] so words stay whole."""
  if e >= len(text):
    return len(text)
  cut = max(text.rfind("\n", lo + 1, e + 1), text.rfind(" ", lo + 1, e + 1))
  return cut + 1 if cut > lo else e


def _snap_forward(text: str, s: int, hi: int) -> int:
  """Moves a window start ``s`` forward to the next word start before ``hi``."""
  if s <= 0 or text[s - 1].isspace():
    return max(s, 0)
  j = s
  while j < hi and not text[j].isspace():
    j += 1
  while j < hi and text[j].isspace():
    j += 1
  return j if j < hi else s


def plan_windows(text: str, measure: Callable[[int, int], int], budget: int, *,
                 overlap_chars: int, protected: Sequence[tuple[int, int]] = (),
                 max_tries: int = 8) -> list[tuple[int, int, bool]]:
  """Splits ``text`` into overlapping ``[begin, end)`` windows whose examples fit ``budget``.

  Args:
    text: the note text.
    measure: ``measure(begin, end)`` -> token length of the full encoded example of that
      window (prompt, note window and target): the real tokenizer decides, so every
      accepted window provably fits.
    budget: maximum tokens of an example.
    overlap_chars: characters of note text shared by consecutive windows.
    protected: character ranges (evidence) that a window boundary should not cut.
    max_tries: encodings tried per window before giving up on growing it.

  Returns:
    ``(begin, end, fits)`` triples covering ``text`` in order; ``fits`` is False only when
    even the smallest window tried does not fit (the caller truncates and counts it).
  """
  n = len(text)
  full = measure(0, n)
  if full <= budget:
    return [(0, n, True)]
  chars_per_token = n / full  # prompt/target overhead makes this conservative

  def avoid_cutting(b: int, e: int) -> int:
    for pb, pe in protected:
      if pb < e < pe and pb > b:
        e = pb
    return e

  windows = []
  b = 0
  while b < n:
    best_fit = None
    smallest_seen = None
    e = min(n, b + max(1, int(budget * chars_per_token)))
    for _ in range(max_tries):
      e = avoid_cutting(b, _snap_back(text, b, e)) if e < n else n
      e = max(e, b + 1)
      m = measure(b, e)
      if smallest_seen is None or e < smallest_seen:
        smallest_seen = e
      if m <= budget:
        if best_fit is None or e > best_fit:
          best_fit = e
        if e >= n or m >= 0.95 * budget:
          break
        grown = b + int((e - b) * budget / m * 0.98)
        if grown <= e:
          break
        e = min(n, grown)
      else:
        shrunk = b + int((e - b) * budget / m * 0.95)
        if best_fit is not None and shrunk <= best_fit:
          break
        if shrunk <= b:
          break
        e = shrunk
    fits = best_fit is not None
    end = best_fit if fits else (smallest_seen or min(n, b + 1))
    windows.append((b, end, fits))
    if end >= n:
      break
    # Overlap at most half a window, so a large window_overlap cannot multiply the windows.
    nb = _snap_forward(text, max(b + 1, b + (end - b) // 2, end - overlap_chars), end)
    for pb, pe in protected:  # start before evidence rather than inside it
      if pb < nb < pe and pb > b:
        nb = pb
    b = nb if b < nb < end else end
  return windows


@dataclasses.dataclass(frozen=True)
class DocumentWindow:
  """One window of a document: character offsets into ``Document.text`` and its encoding."""

  doc_id: str
  index: int
  begin: int
  end: int
  tokens: np.ndarray              # full training example, or the prompt for inference
  loss_mask: np.ndarray | None    # None for inference prompts
  fits: bool                      # False: truncated to fit
  # Inference prompts: tokens[note_lo:note_hi] lie inside the note (evidence-first quotes copy
  # them); 0, 0 when not computed.
  note_lo: int = 0
  note_hi: int = 0


def _overlap_chars(tokenizer: Any, text: str, overlap_tokens: int) -> int:
  if overlap_tokens <= 0:
    return 0
  sample = text[:4000]
  n_tok = max(1, len(tokenizer.encode(sample)))
  return int(overlap_tokens * len(sample) / n_tok)


def document_windows(doc: Document, tokenizer: Any, *, seq_len: int, window_overlap: int,
                     stats: PipelineStats | None = None,
                     answer_format: str = "code_first") -> list[DocumentWindow]:
  """Training examples of a document: one per window, each fitting ``seq_len`` once shifted."""
  cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}

  def encode(b: int, e: int) -> dict[str, np.ndarray]:
    if (b, e) not in cache:
      cache[(b, e)] = _as_example(prompts.encode_target(
          tokenizer, doc.text[b:e], prompts.target_lines(doc, b, e), answer_format))
    return cache[(b, e)]

  budget = seq_len + 1  # the shift drops one token
  spans = plan_windows(doc.text, lambda b, e: len(encode(b, e)["tokens"]), budget,
                       overlap_chars=_overlap_chars(tokenizer, doc.text, window_overlap),
                       protected=[(ev.begin, ev.end) for ev in doc.evidence])
  out = []
  for i, (b, e, fits) in enumerate(spans):
    ex = _truncate(encode(b, e), budget, stats)
    out.append(DocumentWindow(doc.id, i, b, e, ex["tokens"], ex["loss_mask"], fits))
  if stats is not None:
    split = sum(not any(w.begin <= ev.begin and ev.end <= w.end for w in out)
                for ev in doc.evidence)
    stats.add(documents_encoded=1, windows=len(out), split_evidence=split,
              multi_window_documents=int(len(out) > 1))
  return out


def inference_windows(doc: Document, tokenizer: Any, *, seq_len: int, window_overlap: int,
                      max_new_tokens: int, note_range: bool = False) -> list[DocumentWindow]:
  """Prompts for the inference loop: windows whose prompt + ``max_new_tokens`` fit seq_len.

  ``tokens`` holds ``prompts.encode_prompt`` of the window text (it ends with the assistant
  header); ``begin``/``end`` map quotes found in the window back to the note. With
  `note_range`, ``note_lo``/``note_hi`` give the note's tokens in the prompt.
  """
  budget = seq_len - max_new_tokens
  if budget <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                     f"seq_len={seq_len}")
  cache: dict[tuple[int, int], tuple[np.ndarray, int, int]] = {}

  def encode(b: int, e: int) -> tuple[np.ndarray, int, int]:
    if (b, e) not in cache:
      if note_range:
        enc = prompts.encode_prompt_with_note(tokenizer, doc.text[b:e])
        cache[(b, e)] = (enc.tokens, enc.note_lo, enc.note_hi)
      else:
        cache[(b, e)] = (np.asarray(prompts.encode_prompt(tokenizer, doc.text[b:e]), np.int32),
                         0, 0)
    return cache[(b, e)]

  spans = plan_windows(doc.text, lambda b, e: len(encode(b, e)[0]), budget,
                       overlap_chars=_overlap_chars(tokenizer, doc.text, window_overlap))
  for b, e, fits in spans:
    if not fits:  # a cut prompt would lose the assistant header: refuse instead
      raise ValueError(f"document {doc.id!r}: the prompt of window [{b}, {e}) needs "
                       f"{len(encode(b, e)[0])} tokens; seq_len={seq_len} minus max_new_tokens="
                       f"{max_new_tokens} leaves {budget}")
  return [DocumentWindow(doc.id, i, b, e, encode(b, e)[0], None, True, *encode(b, e)[1:])
          for i, (b, e, _) in enumerate(spans)]

