"""The document coder: note -> windows -> evidence spans -> codes, each with its evidence.

`Coder.code_documents(docs)` splits every note into overlapping prompt windows
(`windows.inference_windows`), generates answers for all windows in batches (longest prompts
first, so batches share a prompt-length bucket), parses each answer against its window text
(`prompts.parse_output`, in the configured answer format), maps quote offsets back to the full
note and merges the windows:

* one `CodedEvidence` per (code, distinct grounded span); a code whose quotes were never found
  in the note (or that came without a quote) gets one entry with ``begin = end = -1`` and the
  model's quote, and only when it has no grounded evidence at all;
* **score** of a code = the highest, over the lines that predicted it (any window), of
  ``exp(mean log-prob of the code's tokens)`` under the model's unconstrained distribution: the
  model's confidence in spelling that code, in (0, 1]. Every entry of a code carries its score.
  (Constrained decoding masks the logits, but the score uses the raw model probabilities, so a
  code the grammar forced gets a low score.)

**Span re-coding** (``recode=True``): the document pass proposes evidence spans; each distinct
grounded span is then coded again on its own with the span prompt (the task the span examples
teach), batched, decoding only the code (`generate(..., code_only=True)`): evidence-first, the
prompt is the span's prompt followed by the span copied as the quote and `` |``. The code the
span prompt gives replaces the document pass's code for that span, and its probability becomes
the score; a span the span prompt answers with no code (code-first ``NONE``) is dropped. A code's
score is the best over its mentions in all windows.

**Segment scan** (``scan=True``): every clause of the note (`jaxicd.infer.segments`) is coded
alone the same way, and the clauses that get a code join the note's candidates, with that
code's span-prompt probability as their score. The document pass finds evidence the way the
training documents showed it; the scan also reaches evidence written in other ways (problem
lists, SOAP assessments, sign-outs), at the cost of coding every clause. Identical clauses
(headings, boilerplate) are coded once per call.

**Decision**: codes whose score is below ``threshold`` are dropped (0 keeps every code). The
threshold is calibrated on validation notes (`jaxicd.eval.calibration`) and stored in the
workdir; eval and predict apply it.

Entries are ordered by score (descending), then code, then offset. `Coder.stats` counts what
happened (windows, lines, invalid and ungrounded lines, generations cut at ``max_new_tokens``)
for `jaxicd.eval.metrics.output_rates`. Logs show counts and speed, never note text.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from jaxicd.data import demo, prompts, windows
from jaxicd.data.records import Document
from jaxicd.eval import calibration
from jaxicd.infer import generate as generate_lib
from jaxicd.infer import grammar
from jaxicd.infer import segments
from jaxicd.model import lora

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CodedEvidence:
  """A predicted code with one piece of evidence in the document.

  ``begin``/``end``: half-open character offsets into ``Document.text``, or -1/-1 when the quote
  was not found (or the model gave none). ``quote``: the note text at the offsets when grounded,
  else the model's quote. ``score``: the code's score (see the module docstring).
  """

  code: str
  begin: int
  end: int
  quote: str
  score: float

  @property
  def grounded(self) -> bool:
    return self.begin >= 0


def apply_threshold(coded: Sequence[Sequence[CodedEvidence]], threshold: float
                    ) -> list[list[CodedEvidence]]:
  """Each document's evidence of the codes scored at least `threshold` (the decision rule)."""
  return [[ev for ev in evs if ev.score >= threshold] for evs in coded]


def code_scores(evidence: Sequence[CodedEvidence]) -> dict[str, float]:
  """Code -> score of one document's predictions."""
  out: dict[str, float] = {}
  for ev in evidence:
    out[ev.code] = max(out.get(ev.code, -math.inf), ev.score)
  return out


@dataclasses.dataclass
class _Line:
  code: str | None
  score: float


def merge_candidates(*coded: Sequence[Sequence[CodedEvidence]]) -> list[list[CodedEvidence]]:
  """Per document, the union of several candidate lists (one entry per code and span: the
  first list's, with the best score any list gives it), every mention of a code carrying the
  code's best score."""
  out = []
  for evs in zip(*coded):
    merged: dict[tuple[str, int, int], CodedEvidence] = {}
    for ev in (ev for part in evs for ev in part):
      key = (ev.code, ev.begin, ev.end)
      first = merged.get(key)
      if first is None:
        merged[key] = ev
      elif ev.score > first.score:
        merged[key] = dataclasses.replace(first, score=ev.score)
    out.append(_scored(merged.values()))
  return out


def _scored(evidence: Iterable[CodedEvidence]) -> list[CodedEvidence]:
  """One document's evidence, every mention of a code carrying the code's best score, ordered
  by score, code and offset."""
  evidence = list(evidence)
  scores = code_scores(evidence)
  out = [dataclasses.replace(ev, score=scores[ev.code]) for ev in evidence]
  out.sort(key=lambda ev: (-ev.score, ev.code, ev.begin, ev.end))
  return out


def line_scores(token_texts: Sequence[str], logprobs: Sequence[float],
                answer_format: str = prompts.CODE_FIRST) -> list[_Line]:
  """Splits generated tokens into answer lines; scores each line's code tokens.

  A line's code tokens are the tokens that overlap its code part (`prompts.read_line`, the
  reader `prompts.parse_output` uses: the text before ``|`` code-first, after the last ``|``
  evidence-first); the score is exp(mean log-prob) over them.
  """
  lines: list[_Line] = []
  text, lps = "", []

  def close() -> None:
    line = prompts.read_line(text, answer_format)
    if not line.text:
      return
    code_part = line.code_part
    if answer_format == prompts.EVIDENCE_FIRST and "|" in text:
      code_begin = text.index(code_part, text.rindex("|")) if code_part else len(text)
    else:  # the code part follows any list bullet
      code_begin = text.index(code_part, text.index(line.text)) if code_part else 0
    code_end = code_begin + len(code_part)
    pos, chosen = 0, []
    for piece, lp in lps:
      if pos < code_end and pos + len(piece) > code_begin:
        chosen.append(lp)
      pos += len(piece)
    lines.append(_Line(line.code, float(math.exp(np.mean(chosen))) if chosen else 0.0))

  for piece, lp in zip(token_texts, logprobs):
    while "\n" in piece:
      head, piece = piece.split("\n", 1)
      text += head
      if head:
        lps.append((head, lp))
      close()
      text, lps = "", []
    if piece:  # the empty rest of a newline token belongs to no line
      text += piece
      lps.append((piece, lp))
  close()
  return lines


GenerateFn = Callable[[list[np.ndarray]], generate_lib.Generation]


class Coder:
  """Codes documents with a (fine-tuned) model.

  Args:
    model: a `jaxicd.model.llama.Llama` (base, LoRA or merged parameters).
    tokenizer: its `Tokenizer`.
    code_space: codes (a sequence) or a spec for `jaxicd.data.demo.code_space` ("all", "demo",
      a file).
    seq_len: prompt + answer tokens per window.
    window_overlap: overlap of consecutive windows, in tokens.
    max_new_tokens: answer budget per window.
    batch_size: windows per generation call.
    constrained: decode with the code-space grammar (`grammar.build_constraint`).
    unique_codes: with `constrained`, each code at most once per window's answer (repeated code
      lines would only spend the token budget: codes are merged per document anyway).
    bucket: prompt-length bucket (compilations are per bucket).
    temperature, seed: sampling (0 = greedy).
    generate_fn: replaces the model call (tests): (prompts, note_ranges or None, code_only)
      -> `Generation`.
    answer_format: ``evidence_first`` or ``code_first`` (`jaxicd.data.prompts`); must be the
      format the adapters were trained on.
    recode: re-code each evidence span with the span prompt (see the module docstring).
    recode_batch_size: spans per re-coding call.
    scan: also code every clause of the note with the span prompt (see the module docstring).
    threshold: drop codes scored below it (0 keeps all).
    share_prefix: prefill the prompt prefix a batch shares once (`generate`).
  """

  def __init__(self, model: Any, tokenizer: Any, *, code_space: Sequence[str] | str = "demo",
               seq_len: int = 1024, window_overlap: int = 128, max_new_tokens: int = 128,
               batch_size: int = 8, constrained: bool = True, unique_codes: bool = True,
               bucket: int = 64, temperature: float = 0.0, seed: int = 0,
               generate_fn: GenerateFn | None = None,
               answer_format: str = prompts.CODE_FIRST, recode: bool = False,
               recode_batch_size: int = 32, scan: bool = False, threshold: float = 0.0,
               threshold_origin: str = "configured", share_prefix: bool = True):
    if isinstance(code_space, str):
      code_space = demo.code_space(code_space)
    self.model, self.tokenizer = model, tokenizer
    self.code_space = tuple(code_space)
    self._valid = frozenset(self.code_space)
    self.seq_len, self.window_overlap = seq_len, window_overlap
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    self.answer_format = prompts.check_answer_format(answer_format)
    self.evidence_first = answer_format == prompts.EVIDENCE_FIRST
    self.recode, self.recode_batch_size, self.scan = recode, recode_batch_size, scan
    self.threshold, self.threshold_origin = threshold, threshold_origin
    self.constraint = (grammar.build_constraint(tokenizer, self.code_space,
                                                     unique_codes=unique_codes,
                                                     answer_format=answer_format)
                       if constrained and generate_fn is None else None)
    # Re-coding decodes one code: its longest spelling, then the token that ends the line.
    self._code_tokens = 1 + (self.constraint.max_depth if self.constraint is not None else
                             max(len(prompts.code_token_ids(tokenizer, c, answer_format))
                                 for c in self.code_space))
    self.stop_ids = sorted({i for i in (tokenizer.end_of_turn_id,
                                        getattr(tokenizer, "eos_id", None)) if i is not None})
    self.bucket, self.temperature, self.seed = bucket, temperature, seed
    self.share_prefix = share_prefix
    self._generate = self._model_generate
    if generate_fn is not None:  # a scripted model: plain document prompts need no keywords
      self._generate = lambda batch, note_ranges, code_only: (
          generate_fn(batch) if note_ranges is None and not code_only else
          generate_fn(batch, note_ranges=note_ranges, code_only=code_only))
    self._calls = 0
    self.stats: collections.Counter[str] = collections.Counter()

  def _model_generate(self, batch: list[np.ndarray], note_ranges=None,
                      code_only: bool = False) -> generate_lib.Generation:
    self._calls += 1
    key = jax.random.fold_in(jax.random.key(self.seed), self._calls) if self.temperature else None
    return generate_lib.generate(
        self.model, batch, stop_ids=self.stop_ids,
        max_new_tokens=self._code_tokens if code_only else self.max_new_tokens,
        pad_id=self.tokenizer.pad_id or 0, constraint=self.constraint,
        temperature=self.temperature, key=key, bucket=16 if code_only else self.bucket,
        batch_size=self.recode_batch_size if code_only else self.batch_size,
        note_ranges=note_ranges, code_only=code_only, share_prefix=self.share_prefix)

  def code_documents(self, docs: Sequence[Document]) -> list[list[CodedEvidence]]:
    """Codes each document; returns its evidence list (see `CodedEvidence`), in `docs` order.

    Resets `stats` to the counts of this call.
    """
    t0 = time.perf_counter()
    self.stats = collections.Counter()  # counts of this call only
    doc_windows: list[tuple[int, windows.DocumentWindow]] = []
    for d, doc in enumerate(docs):
      for w in windows.inference_windows(doc, self.tokenizer, seq_len=self.seq_len,
                                         window_overlap=self.window_overlap,
                                         max_new_tokens=self.max_new_tokens,
                                         note_range=self.evidence_first):
        doc_windows.append((d, w))
    self.stats.update(documents=len(docs), windows=len(doc_windows))
    order = sorted(range(len(doc_windows)), key=lambda i: -len(doc_windows[i][1].tokens))
    per_doc: list[list[tuple[list[prompts.Prediction], list[_Line]]]] = [[] for _ in docs]
    generated = 0
    for lo in range(0, len(order), self.batch_size):
      idx = order[lo:lo + self.batch_size]
      gen = self._generate([doc_windows[i][1].tokens for i in idx],
                           [(doc_windows[i][1].note_lo, doc_windows[i][1].note_hi) for i in idx]
                           if self.evidence_first else None, False)
      for row, i in enumerate(idx):
        d, w = doc_windows[i]
        per_doc[d].append(self._read_window(docs[d], w, gen, row))
        generated += int(gen.lengths[row])
      done = lo + len(idx)
      elapsed = time.perf_counter() - t0
      log.info("coded %d/%d windows (%d documents), %d tokens generated, %.1f tokens/s",
               done, len(order), len(docs), generated, generated / max(elapsed, 1e-9))
    self.stats.update(generated_tokens=generated)
    coded = [self._merge(doc, parts) for doc, parts in zip(docs, per_doc)]
    if self.recode:
      coded = self.recode_evidence(docs, coded)
    if self.scan:
      coded = merge_candidates(coded, self.scan_clauses(docs))
    if self.threshold > 0:
      kept = apply_threshold(coded, self.threshold)
      self.stats["below_threshold"] += sum(len(set(e.code for e in a)) - len(set(e.code for e in b))
                                           for a, b in zip(coded, kept))
      coded = kept
    self.stats["seconds"] += time.perf_counter() - t0
    return coded

  def span_prompt(self, text: str) -> np.ndarray:
    """The prompt that re-codes evidence `text` alone: code-first the span prompt (the answer
    starts with the code); evidence-first the span prompt, the span copied as the quote, `` |``."""
    if not self.evidence_first:
      return prompts.encode_prompt(self.tokenizer, text)
    enc = prompts.encode_prompt_with_note(self.tokenizer, text)
    i, j = prompts.quote_token_range(enc, 0, len(text))
    sep = self.tokenizer.encode(prompts.SEPARATOR.rstrip())
    return np.concatenate([enc.tokens, enc.tokens[i:j], np.asarray(sep, np.int32)])

  def code_spans(self, texts: Sequence[str]) -> list[tuple[str | None, float]]:
    """Codes each evidence text alone (the span task): ``(code or None, probability)``."""
    out: list[tuple[str | None, float]] = [(None, 0.0)] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
    for lo in range(0, len(order), self.recode_batch_size):
      idx = order[lo:lo + self.recode_batch_size]
      gen = self._generate([self.span_prompt(texts[i]) for i in idx], None, True)
      for row, i in enumerate(idx):
        ids = gen.row(row)
        pieces = [self.tokenizer.decode([t]) for t in ids]
        lines = line_scores(pieces, gen.logprobs[row, :len(ids)].tolist(), prompts.CODE_FIRST)
        if lines and lines[0].code in self._valid:
          out[i] = (lines[0].code, lines[0].score)
    self.stats["recoded_spans"] += len(texts)
    return out

  def recode_evidence(self, docs: Sequence[Document], coded: list[list[CodedEvidence]]
                      ) -> list[list[CodedEvidence]]:
    """The span re-coding stage over document-pass output (see the module docstring)."""
    spans = sorted({(d, ev.begin, ev.end) for d, evs in enumerate(coded) for ev in evs
                    if ev.grounded and docs[d].text[ev.begin:ev.end].strip()})
    results = self.code_spans([docs[d].text[b:e] for d, b, e in spans])
    best: dict[tuple[int, int, int], tuple[str | None, float]] = dict(zip(spans, results))
    out = []
    for d, evs in enumerate(coded):
      merged: dict[tuple[str, int, int], CodedEvidence] = {}
      for ev in evs:
        if ev.grounded:
          code, score = best.get((d, ev.begin, ev.end), (None, 0.0))
          if code is None:
            self.stats["recode_dropped"] += 1
            continue
          self.stats["recode_changed"] += int(code != ev.code)
          ev = dataclasses.replace(ev, code=code, score=score)
        key = (ev.code, ev.begin, ev.end)
        merged[key] = ev
      out.append(_scored(merged.values()))
    return out

  def scan_clauses(self, docs: Sequence[Document]) -> list[list[CodedEvidence]]:
    """The segment scan's candidates (see the module docstring): each note's clauses that the
    span prompt gives a code, with its probability as the score."""
    spans = [segments.clauses(doc.text) for doc in docs]
    texts = sorted({doc.text[b:e] for doc, ss in zip(docs, spans) for b, e in ss})
    code_of = dict(zip(texts, self.code_spans(texts)))
    self.stats["scanned_clauses"] += len(texts)
    out = []
    for doc, ss in zip(docs, spans):
      found = []
      for b, e in ss:
        code, score = code_of[doc.text[b:e]]
        if code is not None:
          found.append(CodedEvidence(code, b, e, doc.text[b:e], score))
      out.append(_scored(found))
    return out

  def _read_window(self, doc: Document, w: windows.DocumentWindow,
                   gen: generate_lib.Generation, row: int):
    ids = gen.row(row)
    stopped = bool(gen.stopped[row])
    if not stopped:
      # Cut by max_new_tokens: the unfinished last line is counted apart, not read.
      self.stats["truncated_generations"] += 1
      keep = len(ids)
      while keep and "\n" not in self.tokenizer.decode([ids[keep - 1]]):
        keep -= 1
      self.stats["truncated_lines"] += int(keep < len(ids))
      ids = ids[:keep]
    text = self.tokenizer.decode(ids)
    parsed = prompts.parse_output(text, doc.text[w.begin:w.end], self._valid, self.answer_format)
    for _, reason in parsed.rejected:
      self.stats["rejected_" + reason.split()[0]] += 1  # malformed / invalid / duplicate
    n_quoted = sum(bool(p.quote) for p in parsed.predictions)
    self.stats.update(predicted_lines=len(parsed.predictions), quoted_lines=n_quoted,
                      grounded_lines=n_quoted - parsed.ungrounded,
                      none_answers=int(parsed.none and stopped))  # a cut answer said nothing
    pieces = [self.tokenizer.decode([t]) for t in ids]
    lines = line_scores(pieces, gen.logprobs[row, :len(ids)].tolist(), self.answer_format)
    shifted = [dataclasses.replace(p, begin=p.begin + w.begin, end=p.end + w.begin)
               if p.grounded else p for p in parsed.predictions]
    return shifted, lines

  def _merge(self, doc: Document, parts) -> list[CodedEvidence]:
    scores: dict[str, float] = {}
    for _, lines in parts:
      for ln in lines:
        if ln.code is not None:
          scores[ln.code] = max(scores.get(ln.code, 0.0), ln.score)
    spans: dict[str, dict[tuple[int, int], None]] = {}
    loose_quote: dict[str, str] = {}
    for preds, _ in parts:
      for p in preds:
        if p.grounded:
          spans.setdefault(p.code, {})[(p.begin, p.end)] = None
        elif p.code not in loose_quote or (p.quote and not loose_quote[p.code]):
          loose_quote[p.code] = p.quote
    out = []
    for code in set(spans) | set(loose_quote):
      score = scores.get(code, 0.0)
      if code in spans:
        out += [CodedEvidence(code, b, e, doc.text[b:e], score) for b, e in spans[code]]
      else:
        out.append(CodedEvidence(code, -1, -1, loose_quote[code], score))
    out.sort(key=lambda ev: (-ev.score, ev.code, ev.begin, ev.end))
    return out


def decoding_model(cfg: Any, model: Any) -> Any:
  """The model the coder decodes with: `model` itself, or with ``eval_coding.dtype`` set, a
  copy in that dtype with the adapters folded in (`jaxicd.model.lora.decoding_copy`)."""
  dtype = cfg.eval_coding.dtype
  return lora.decoding_copy(model, dtype) if dtype else model


def build_coder(cfg: Any, model: Any, tokenizer: Any, workdir: Any = None) -> Coder:
  """The `Coder` a run config describes: windows as ``cfg.data`` (seq_len, window_overlap),
  the code space ``cfg.data.code_space`` and decoding as ``cfg.eval_coding``; the decision
  threshold ``eval_coding.threshold`` (negative: `workdir`'s calibration, see
  `jaxicd.eval.calibration`; `Coder.threshold_origin` says which)."""
  threshold, origin = calibration.resolve_threshold(float(cfg.eval_coding.threshold), workdir)
  ec, data = cfg.eval_coding, cfg.data
  if float(ec.threshold) < 0:
    for stage in calibration.mismatched_stages(workdir, recode=ec.recode, scan=ec.scan):
      log.warning("eval_coding.%s: the calibrated threshold does not fit these candidates",
                  stage)
  return Coder(decoding_model(cfg, model), tokenizer, code_space=data.code_space,
               seq_len=int(data.seq_len),
               window_overlap=int(data.window_overlap), max_new_tokens=int(ec.max_new_tokens),
               batch_size=int(ec.batch_size), constrained=bool(ec.constrained),
               unique_codes=bool(ec.unique_codes), answer_format=data.answer_format,
               recode=bool(ec.recode), recode_batch_size=int(ec.recode_batch_size),
               scan=bool(ec.scan),
               threshold=threshold, threshold_origin=origin)
