"""Evaluation metrics for document coding: codes, ranking, evidence and output quality.

Conventions (those of the ICD-coding literature, DESIGN.md):

* F1 = TP / (TP + ½(FP + FN)), which is 2PR / (P + R); 0 when TP + FP + FN = 0.
* **micro**: TP/FP/FN summed over every (document, code) pair.
* **macro** (Edin et al. 2023's correction): the mean of per-code F1 over the codes present in
  the gold labels of the evaluated documents; **macro over all codes** also averages the codes
  of the code space that neither gold nor predictions contain (their F1 counts as 0, like
  scikit-learn's ``zero_division=0``), plus any predicted code outside the space.
* **P@k**: mean over documents of |top-k scored codes ∩ gold| / k.
* **unseen-code F1** (strict): micro/macro restricted to the codes that no training document
  contains, all of them (`unseen_in_training`): gold and predictions are both intersected with
  that set first, so predicting an unseen code that the note does not have is a false positive
  even when no evaluated note has that code. (Restricting to the unseen codes of the evaluated
  notes' gold drops exactly those false positives and inflates the score.)
* **evidence** (MDACE style; only documents with gold evidence count): micro P/R/F1 of
  (code, begin, end) spans matched exactly; and of overlap per code: characters, and tokens
  (maximal non-whitespace runs of the note; a token counts as covered when any of its
  characters is), summed over documents and codes.
* **valid-code rate**: accepted answer lines / complete lines that named a code (valid or
  not); a line cut by ``max_new_tokens`` is no answer the model finished, so it is counted apart
  (**truncated-line rate**); **grounded-evidence rate**: quotes found in the note / complete
  lines with a quote (`output_rates`).
* **span accuracy** (`span_accuracy`): gold evidence spans coded on their own, as the span
  examples of Code-Centric Learning are: the share whose top-scored code is the gold code
  (``exact``) or shares its 3-character category (``category``), overall and on unseen codes.
"""

from __future__ import annotations

import re
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np


def f1_score(tp: float, fp: float, fn: float) -> float:
  denom = tp + 0.5 * (fp + fn)
  return float(tp / denom) if denom else 0.0


def _prf(tp: float, fp: float, fn: float, prefix: str) -> dict[str, float]:
  return {f"{prefix}precision": float(tp / (tp + fp)) if tp + fp else 0.0,
          f"{prefix}recall": float(tp / (tp + fn)) if tp + fn else 0.0,
          f"{prefix}f1": f1_score(tp, fp, fn)}


def code_f1(gold: Sequence[Collection[str]], predicted: Sequence[Collection[str]], *,
            code_space: Collection[str] | None = None, restrict_to: Collection[str] | None = None,
            prefix: str = "") -> dict[str, float]:
  """Micro P/R/F1 and macro F1 of predicted code sets against gold code sets (one per document).

  Returns keys ``{prefix}micro_precision``, ``micro_recall``, ``micro_f1``, ``macro_f1`` (codes
  present in gold; Edin's correction), ``macro_f1_all`` (only with `code_space`: every code of
  the space plus predicted codes outside it), ``codes_in_gold``.
  """
  if len(gold) != len(predicted):
    raise ValueError(f"{len(gold)} gold documents but {len(predicted)} predictions")
  keep = (lambda s: set(s) & set(restrict_to)) if restrict_to is not None else set
  tp: dict[str, int] = {}
  fp: dict[str, int] = {}
  fn: dict[str, int] = {}
  for g, p in zip(gold, predicted):
    g, p = keep(g), keep(p)
    for c in g & p:
      tp[c] = tp.get(c, 0) + 1
    for c in p - g:
      fp[c] = fp.get(c, 0) + 1
    for c in g - p:
      fn[c] = fn.get(c, 0) + 1
  total = lambda d: sum(d.values())
  out = {f"{prefix}{k}": v for k, v in _prf(total(tp), total(fp), total(fn), "micro_").items()}
  per_code = lambda c: f1_score(tp.get(c, 0), fp.get(c, 0), fn.get(c, 0))
  in_gold = set(tp) | set(fn)
  out[f"{prefix}macro_f1"] = float(np.mean([per_code(c) for c in in_gold])) if in_gold else 0.0
  out[f"{prefix}codes_in_gold"] = float(len(in_gold))
  if code_space is not None:
    space = set(code_space) if restrict_to is None else set(code_space) & set(restrict_to)
    space |= set(tp) | set(fp) | set(fn)
    out[f"{prefix}macro_f1_all"] = (float(np.mean([per_code(c) for c in space]))
                                    if space else 0.0)
  return out


def precision_at_k(gold: Sequence[Collection[str]], scores: Sequence[Mapping[str, float]],
                   k: int) -> float:
  """Mean over documents of |top-k codes by score ∩ gold| / k (ties broken by code)."""
  if len(gold) != len(scores):
    raise ValueError(f"{len(gold)} gold documents but {len(scores)} score maps")
  if not gold:
    return 0.0
  hits = []
  for g, s in zip(gold, scores):
    top = sorted(s, key=lambda c: (-s[c], c))[:k]
    hits.append(len(set(top) & set(g)) / k)
  return float(np.mean(hits))


Span = tuple[str, int, int]  # (code, begin, end)

_WORD = re.compile(r"\S+")


def _covered(spans: Iterable[tuple[int, int]]) -> set[int]:
  out: set[int] = set()
  for b, e in spans:
    out.update(range(b, e))
  return out


def evidence_scores(texts: Sequence[str], gold: Sequence[Iterable[Span]],
                    predicted: Sequence[Iterable[Span]]) -> dict[str, float]:
  """MDACE-style evidence metrics over documents (see the module docstring).

  Args:
    texts: the note of each document (for token boundaries).
    gold, predicted: (code, begin, end) spans per document; ungrounded predictions (begin < 0)
      are ignored. Documents without gold spans are skipped.

  Returns ``evidence_span_{precision,recall,f1}``, ``evidence_char_*``, ``evidence_token_*``,
  ``evidence_documents``.
  """
  counts = {k: [0, 0, 0] for k in ("span", "char", "token")}  # tp, fp, fn
  docs = 0
  for text, g, p in zip(texts, gold, predicted):
    g = {s for s in g}
    if not g:
      continue
    docs += 1
    p = {s for s in p if s[1] >= 0}
    counts["span"][0] += len(g & p)
    counts["span"][1] += len(p - g)
    counts["span"][2] += len(g - p)
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    starts = np.array([b for b, _ in words])
    for code in {s[0] for s in g | p}:
      gc = _covered((b, e) for c, b, e in g if c == code)
      pc = _covered((b, e) for c, b, e in p if c == code)
      for key, (gs, ps) in (("char", (gc, pc)),
                            ("token", (_words_of(gc, words, starts),
                                       _words_of(pc, words, starts)))):
        counts[key][0] += len(gs & ps)
        counts[key][1] += len(ps - gs)
        counts[key][2] += len(gs - ps)
  out = {"evidence_documents": float(docs)}
  for key, (tp, fp, fn) in counts.items():
    out.update(_prf(tp, fp, fn, f"evidence_{key}_"))
  return out


def _words_of(chars: set[int], words: list[tuple[int, int]], starts: np.ndarray) -> set[int]:
  """Indices of the words with at least one character in `chars`."""
  out = set()
  for c in chars:
    i = int(np.searchsorted(starts, c, side="right")) - 1
    if i >= 0 and words[i][0] <= c < words[i][1]:
      out.add(i)
  return out


def output_rates(stats: Mapping[str, float]) -> dict[str, float]:
  """Valid-code, grounded-evidence and truncation rates from `Coder.stats` counters.

  Keys read (absent: 0). Every answer line is counted once, in exactly one of:

  * ``predicted_lines``: complete lines accepted as a prediction (of which ``quoted_lines`` had
    a quote and ``grounded_lines`` a quote found in the note);
  * ``rejected_malformed``, ``rejected_invalid`` (and ``rejected_duplicate``, which the
    valid-code rate leaves out: it named a valid code): complete lines the parser refused;
  * ``truncated_lines``: lines cut by ``max_new_tokens``, i.e. the unfinished last line of a
    generation that stopped without its end-of-turn token; none of the other counters includes
    them (a cut line may still parse, e.g. ``I50.2`` of ``I50.23``).

  Also ``windows`` and ``truncated_generations`` (generations cut by ``max_new_tokens``).

  Returns ``valid_code_rate`` = predicted / (predicted + malformed + invalid);
  ``grounded_evidence_rate`` = grounded / quoted; ``truncated_line_rate`` = truncated lines / all
  answer lines (complete and truncated); ``truncated_generation_rate`` = truncated generations /
  windows. A rate without a denominator is 0.
  """
  get = lambda k: float(stats.get(k, 0))
  rate = lambda a, b: a / b if b else 0.0
  named = get("predicted_lines") + get("rejected_malformed") + get("rejected_invalid")
  complete = named + get("rejected_duplicate")
  return {"valid_code_rate": rate(get("predicted_lines"), named),
          "grounded_evidence_rate": rate(get("grounded_lines"), get("quoted_lines")),
          "truncated_line_rate": rate(get("truncated_lines"),
                                      complete + get("truncated_lines")),
          "truncated_generation_rate": rate(get("truncated_generations"), get("windows"))}


def unseen_in_training(training_codes: Iterable[str], *code_sets: Iterable[str]
                       ) -> frozenset[str]:
  """The codes of ``code_sets`` that are not in ``training_codes``: what ``unseen_codes=`` of
  `evaluate` wants.

  Pass every code a note could be scored on: the coder's code space, and the evaluated notes'
  gold codes (a gold code outside the code space is unseen too, and a missed one must count),
  e.g. ``unseen_in_training(train_codes, coder.code_space, (c for d in docs for c in d.codes))``.
  """
  trained = set(training_codes)
  return frozenset(c for codes in code_sets for c in codes if c not in trained)


def evaluate(documents: Sequence[Any], predictions: Sequence[Sequence[Any]], *,
             code_space: Collection[str] | None = None,
             unseen_codes: Collection[str] | None = None, ks: Sequence[int] = (5, 8, 15),
             output_stats: Mapping[str, float] | None = None) -> dict[str, float]:
  """All metrics for coded documents, as one flat dict.

  Args:
    documents: gold `Document`s (``codes``, ``evidence``, ``text``).
    predictions: per document, items with ``code``, ``begin``, ``end``, ``score`` (the
      `Coder.code_documents` output).
    code_space: for ``macro_f1_all``.
    unseen_codes: adds strict ``unseen_*`` metrics (``unseen_micro_f1``, ``unseen_macro_f1``,
      ...): the full set of codes that no training document contains, i.e. every code of the
      code space (and of the evaluated gold) minus the codes of the training split; build it
      with `unseen_in_training`. Gold and predictions are both restricted to it. Not just the
      unseen codes of the evaluated notes' gold: a false positive on any other unseen code
      would then be dropped.
    ks: P@k cut-offs.
    output_stats: `Coder.stats`, for the valid-code, grounded-evidence and truncation rates
      (the counters `output_rates` reads; lines cut by ``max_new_tokens`` as
      ``truncated_lines``).
  """
  if len(documents) != len(predictions):
    raise ValueError(f"{len(documents)} documents but {len(predictions)} predictions")
  gold = [set(d.codes) for d in documents]
  pred = [{p.code for p in ps} for ps in predictions]
  scores = []
  for ps in predictions:
    s: dict[str, float] = {}
    for p in ps:
      s[p.code] = max(s.get(p.code, -np.inf), p.score)
    scores.append(s)
  out = code_f1(gold, pred, code_space=code_space)
  for k in ks:
    out[f"p@{k}"] = precision_at_k(gold, scores, k)
  if unseen_codes is not None:
    out.update(code_f1(gold, pred, code_space=code_space, restrict_to=unseen_codes,
                       prefix="unseen_"))
  out.update(evidence_scores(
      [d.text for d in documents],
      [[(e.code, e.begin, e.end) for e in d.evidence] for d in documents],
      [[(p.code, p.begin, p.end) for p in ps] for ps in predictions]))
  if output_stats is not None:
    out.update(output_rates(output_stats))
  out["documents"] = float(len(documents))
  return out


def span_accuracy(gold: Sequence[str], predictions: Sequence[Sequence[Any]], *,
                  unseen_codes: Collection[str] = ()) -> dict[str, float]:
  """Top-1 accuracy of coding spans one by one (see the module docstring).

  Args:
    gold: the gold code of each span.
    predictions: per span, items with ``code`` and ``score`` (a `Coder.code_documents` output);
      the top-scored code counts (none: wrong).
    unseen_codes: adds ``unseen_span_*`` over the spans whose gold code is in this set (the
      full set of `evaluate` serves as well: only the spans' gold codes are looked up).
  """
  if len(gold) != len(predictions):
    raise ValueError(f"{len(gold)} spans but {len(predictions)} predictions")
  top = [max(ps, key=lambda p: p.score).code if ps else None for ps in predictions]
  unseen = set(unseen_codes)
  out: dict[str, float] = {}
  groups = [("span_", lambda c: True)]
  if unseen:
    groups.append(("unseen_span_", lambda c: c in unseen))
  for prefix, keep in groups:
    pairs = [(g, t) for g, t in zip(gold, top) if keep(g)]
    n = len(pairs)
    out[prefix + "exact"] = sum(g == t for g, t in pairs) / n if n else 0.0
    out[prefix + "category"] = (sum(t is not None and g[:3] == t[:3] for g, t in pairs) / n
                                if n else 0.0)
    out[prefix + "count"] = float(n)
  return out
