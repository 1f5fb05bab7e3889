"""Coding metrics during training: code held-out notes with the live adapters and score them.

Validation loss says the model fits the target format; these metrics say whether it assigns the
right codes with grounded evidence. A hook for ``Trainer.eval_hooks``: it builds one
`jaxicd.infer.coder.Coder` (the code-space trie and the compiled decode loop are reused across
evaluations) and, at each evaluation, points it at a model merged from the current adapters.

Codes that occur in no training document are reported separately as ``unseen_*`` (strictly:
gold and predictions both restricted to every such code of the code space): only code-centric
expansion spans can teach those.

The decision threshold (`jaxicd.eval.calibration`): with ``eval_coding.calibrate`` on the
validation split, each evaluation codes its notes keeping every candidate, chooses the threshold
that maximises micro-F1 there, stores it in ``<workdir>/calibration.json`` and reports the
metrics at that threshold (and ``uncalibrated_micro_f1``). On any other split, or without
``calibrate``, the threshold is ``eval_coding.threshold`` (negative: the workdir's calibration,
if any): test notes never choose it.

With ``eval_coding.spans = N`` the hook also codes the first N distinct gold evidence spans of
the split's notes one by one (`Coder.code_spans`: the task the span examples teach, decoding
one code per span), and reports their top-1 accuracy (``span_exact``, ``span_category``, and ``unseen_span_*``): a signal that moves long
before whole-note F1 does, since a note is coded window by window and every window's guesses
add false positives.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Mapping

from jaxicd.data import mixture
from jaxicd.data.records import Document
from jaxicd.eval import calibration
from jaxicd.eval import metrics as metrics_lib
from jaxicd.eval import report as report_lib
from jaxicd.infer import predict as predict_lib
from jaxicd.infer.coder import (CodedEvidence, apply_threshold, build_coder, code_scores,
                                decoding_model)

# The metrics worth a progress line; everything goes to metrics.jsonl / TensorBoard.
_HEADLINE = ("micro_f1", "macro_f1", "unseen_micro_f1", "evidence_span_f1", "valid_code_rate",
             "threshold", "codes_per_note", "span_exact", "unseen_span_exact", "span_category")


def evidence_span_documents(documents, limit: int) -> list[Document]:
  """The first ``limit`` distinct (quote, code) gold evidence spans of ``documents``, each as a
  one-code document whose text is the quote."""
  out, seen = [], set()
  if limit <= 0:
    return out
  for doc in documents:
    for ev in doc.evidence:
      key = (doc.text[ev.begin:ev.end], ev.code)
      if key in seen or not key[0].strip():
        continue
      seen.add(key)
      out.append(Document(f"{doc.id}:{ev.begin}-{ev.end}", key[0], (ev.code,), split=doc.split,
                          source=doc.source))
      if len(out) == limit:
        return out
  return out


class CodingEval:
  """``hook(trainer, step) -> {"coding/<metric>": value}`` over the first N documents of a split."""

  def __init__(self, cfg: Any, tokenizer: Any):
    ec = cfg.eval_coding
    self.cfg, self.tokenizer = cfg, tokenizer
    self.at_start = bool(ec.at_start)
    documents = mixture.documents(cfg.data, ec.source)
    self.documents = [d for d in documents if d.split == ec.split][:int(ec.documents)]
    if not self.documents:
      raise ValueError(f"eval_coding: no documents in split {ec.split!r} of "
                       f"{mixture.describe_source(cfg.data, ec.source)}; set "
                       "eval_coding.documents=0 to turn coding off")
    # Only validation notes choose the threshold: on any other split (test) the stored one is
    # applied, so a test score is never tuned on test.
    self.calibrate = bool(ec.calibrate) and ec.split == "val"
    self.threshold = float(ec.threshold)
    # Seen codes: those of the documents the run trains on (every source of the mixture).
    trained = (mixture.trained_codes(cfg.data) if mixture.named_sources(cfg.data)
               else {c for d in documents if d.split == "train" for c in d.codes})
    self.trained_codes = frozenset(trained)
    self.unseen = frozenset(c for d in self.documents for c in d.codes if c not in trained)
    self.spans = evidence_span_documents([d for d in documents if d.split == ec.split],
                                         int(ec.spans))
    self.unseen_span_codes = frozenset(s.codes[0] for s in self.spans
                                       if s.codes[0] not in trained)
    self._coder = None
    # Eval mode sets it: an HTML evidence report of the coded notes (jaxicd.eval.report).
    self.report_path: pathlib.Path | None = None

  def _get_coder(self, model):
    if self._coder is None:
      self._coder = build_coder(self.cfg, model, self.tokenizer)
    else:  # same graph, new adapter values: no recompilation
      self._coder.model = decoding_model(self.cfg, model)
    return self._coder

  def _write_report(self, predictions, step: int, threshold: float) -> None:
    describe = predict_lib.describer()
    rows = [row for d, p in zip(self.documents, predictions)
            for row in predict_lib.prediction_rows(d, p, describe)]
    html = report_lib.render(
        self.documents, rows, gold={d.id: d.codes for d in self.documents}, describe=describe,
        title=f"jaxicd evaluation: {len(self.documents)} {self.cfg.eval_coding.split} notes",
        subtitle=f"step {step}; decision threshold {threshold:.3f}")
    self.report_path.write_text(html, encoding="utf-8")

  def __call__(self, trainer: Any, step: int) -> Mapping[str, float]:
    if step == 0 and not self.at_start:
      return {}
    coder = self._get_coder(trainer.model)
    unseen = metrics_lib.unseen_in_training(self.trained_codes, coder.code_space,
                                            (c for d in self.documents for c in d.codes))
    threshold, origin = calibration.resolve_threshold(
        0.0 if self.calibrate else self.threshold, trainer.workdir)
    coder.threshold = threshold
    predictions = coder.code_documents(self.documents)
    extra: dict[str, float] = {}
    if self.calibrate:
      gold = [d.codes for d in self.documents]
      extra["uncalibrated_micro_f1"] = metrics_lib.code_f1(
          gold, [code_scores(p).keys() for p in predictions])["micro_f1"]
      threshold, _ = calibration.choose_threshold(gold, [code_scores(p) for p in predictions])
      predictions = apply_threshold(predictions, threshold)
      origin = f"calibrated on these {len(self.documents)} notes"
      if trainer.is_chief:
        calibration.save(trainer.workdir, threshold, step=int(step), split=self.cfg.eval_coding.split,
                         documents=len(self.documents), recode=coder.recode, scan=coder.scan,
                         **extra)
    result = metrics_lib.evaluate(self.documents, predictions, code_space=coder.code_space,
                                  unseen_codes=unseen, output_stats=coder.stats)
    if self.report_path is not None and trainer.is_chief:
      self._write_report(predictions, step, threshold)
    result.update(extra, threshold=threshold,
                  codes_per_note=sum(len(code_scores(p)) for p in predictions)
                  / max(len(predictions), 1))
    seconds = coder.stats["seconds"]
    spans = ""
    if self.spans:
      t0 = time.perf_counter()
      coded = coder.code_spans([s.text for s in self.spans])  # the span task: one code each
      span_predictions = [[CodedEvidence(c, 0, len(s.text), s.text, p)] if c else []
                          for s, (c, p) in zip(self.spans, coded)]
      result.update(metrics_lib.span_accuracy([s.codes[0] for s in self.spans],
                                              span_predictions,
                                              unseen_codes=self.unseen_span_codes))
      seconds += time.perf_counter() - t0
      spans = f" and {len(self.spans)} evidence spans"
    shown = "  ".join(f"{k} {result[k]:.3f}" for k in _HEADLINE if k in result)
    trainer.print(f"coding @ step {step} on {len(self.documents)} {self.cfg.eval_coding.split} "
                  f"notes ({len(self.unseen)} codes unseen in training){spans}, "
                  f"{seconds:.0f}s, threshold {threshold:.3f} ({origin}): {shown}")
    return {f"coding/{k}": float(v) for k, v in result.items()}
