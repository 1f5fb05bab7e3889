"""Tests of window planning: documents split into windows that fit, spans and what cannot fit.

Uses the byte-level ChatML tokenizer and synthetic notes of ``test_pipeline`` (exact token
counts); one test checks the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from jaxicd.data import prompts
from jaxicd.data import windows as windows_lib
from jaxicd.data.records import Document, Evidence
from jaxicd.model.tokenizer import load_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
# The byte tokenizer and synthetic notes, and their fixtures `tok` and `docs`.
# pylint: disable-next=wrong-import-position,unused-import
from test_pipeline import FILLER, docs, tok  # noqa: F401


def test_long_documents_are_windowed_to_fit(tok, docs):
  seq_len = 400
  long_docs = [d for d in docs if len(d.text) > 600]
  assert long_docs
  stats = windows_lib.PipelineStats()
  for d in long_docs:
    windows = windows_lib.document_windows(d, tok, seq_len=seq_len, window_overlap=20,
                                           stats=stats)
    assert len(windows) > 1
    assert windows[0].begin == 0 and windows[-1].end == len(d.text)
    for w, nxt in zip(windows, windows[1:]):
      assert nxt.begin < w.end, "consecutive windows overlap"
      assert nxt.begin > w.begin
    for w in windows:
      assert w.fits and len(w.tokens) <= seq_len + 1
      # The target is exactly the codes whose evidence lies in the window, with its quote.
      target = tok.decode(w.tokens[w.loss_mask > 0])
      lines = target.removesuffix("<|im_end|>").strip().splitlines()
      inside = [e for e in d.evidence if w.begin <= e.begin and e.end <= w.end]
      want = [f"{e.code} | {d.quote(e)}" for e in inside] or ["NONE"]
      assert sorted(line.strip() for line in lines) == sorted(want), lines
      assert d.text[w.begin:w.end] in tok.decode(w.tokens)
    # Windows never cut an evidence quote: every quote lies whole in some window.
    for e in d.evidence:
      assert any(w.begin <= e.begin and e.end <= w.end for w in windows)
  assert stats.truncated == 0 and stats.multi_window_documents == len(long_docs)


def test_what_cannot_fit_is_counted_not_dropped(tok):
  # 40 codes without evidence give every window a target longer than seq_len.
  codes = tuple(f"S{i:02d}.0" for i in range(40))
  doc = Document("many-codes", FILLER * 3, codes)
  stats = windows_lib.PipelineStats()
  windows = windows_lib.document_windows(doc, tok, seq_len=300, window_overlap=0, stats=stats)
  assert all(len(w.tokens) <= 301 for w in windows)
  assert stats.truncated == sum(not w.fits for w in windows) > 0
  assert windows[0].begin == 0 and windows[-1].end == len(doc.text)
  # An evidence quote longer than any window cannot be learned whole: counted.
  quote = FILLER[:300]
  doc = Document("long-quote", FILLER + quote + FILLER, ("I10",),
                 (Evidence("I10", len(FILLER), len(FILLER) + len(quote)),))
  stats = windows_lib.PipelineStats()
  windows = windows_lib.document_windows(doc, tok, seq_len=400, window_overlap=10, stats=stats)
  assert stats.split_evidence == 1 and stats.truncated == 0
  assert all(w.fits for w in windows)


def test_inference_windows_leave_room_to_generate(tok, docs):
  d = max(docs, key=lambda d: len(d.text))
  windows = windows_lib.inference_windows(d, tok, seq_len=512, window_overlap=16,
                                          max_new_tokens=64)
  assert len(windows) > 1 and windows[-1].end == len(d.text)
  for w in windows:
    assert len(w.tokens) + 64 <= 512
    np.testing.assert_array_equal(w.tokens, prompts.encode_prompt(tok, d.text[w.begin:w.end]))


def test_windows_fit_with_the_smollm2_tokenizer(docs):
  """BPE tokens are not characters: windows must still fit exactly and overlap."""
  tok = load_tokenizer("smollm2")
  stats = windows_lib.PipelineStats()
  n, inner = 0, []
  for d in docs[:8]:
    doc = Document(d.id, d.text * 4, d.codes, d.evidence, d.split)  # ~1-6k characters
    windows = windows_lib.document_windows(doc, tok, seq_len=256, window_overlap=24, stats=stats)
    n += len(windows)
    inner += [len(w.tokens) for w in windows[:-1]]
    assert windows[0].begin == 0 and windows[-1].end == len(doc.text)
    for w, nxt in zip(windows, windows[1:]):
      assert w.begin < nxt.begin < w.end
    for w in windows:
      ex = prompts.encode_example(tok, doc.text[w.begin:w.end],
                                  prompts.document_target(doc, w.begin, w.end))
      np.testing.assert_array_equal(w.tokens, ex["tokens"])
      assert len(ex["tokens"]) <= 257
  assert n > 8 and stats.truncated == 0 and stats.split_evidence == 0
  # Windows are not needlessly small: all but the last of a note use most of seq_len.
  assert np.mean(inner) > 0.85 * 257, np.mean(inner)


def test_overlap_is_bounded_by_half_a_window(tok, docs):
  d = max(docs, key=lambda d: len(d.text))
  windows = windows_lib.document_windows(d, tok, seq_len=400, window_overlap=10_000)
  for w, nxt in zip(windows, windows[1:]):
    assert w.begin < nxt.begin < w.end
  assert windows[-1].end == len(d.text)
  no_overlap = windows_lib.document_windows(d, tok, seq_len=400, window_overlap=0)
  # Half-window steps (a start may move back further only to keep a quote whole).
  assert len(windows) <= 2 * len(no_overlap) + len(d.evidence)
