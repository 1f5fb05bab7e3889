"""Coding metrics during training: code held-out notes with the live adapters and score them.

Validation loss says the model fits the target format; these metrics say whether it assigns the
right codes with grounded evidence. A hook for ``Trainer.eval_hooks``: it builds one
`jaxicd.infer.coder.Coder` (the code-space trie and the compiled decode loop are reused across
evaluations) and, at each evaluation, points it at a model merged from the current adapters.

Codes of the evaluated documents that occur in no training document are reported separately as
``unseen_*``: only code-centric expansion spans can teach those.

With ``eval_coding.spans = N`` the hook also codes the first N distinct gold evidence spans of
the split's notes one by one, the task the span examples teach, and reports their top-1
accuracy (``span_exact``, ``span_category``, and ``unseen_span_*``): a signal that moves long
before whole-note F1 does, since a note is coded window by window and every window's guesses
add false positives.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxicd.data import pipeline
from jaxicd.data.records import Document
from jaxicd.eval import metrics as metrics_lib

# The metrics worth a progress line; everything goes to metrics.jsonl / TensorBoard.
_HEADLINE = ("micro_f1", "macro_f1", "unseen_micro_f1", "evidence_span_f1", "valid_code_rate",
             "span_exact", "unseen_span_exact", "span_category")


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
    self.at_start = bool(ec.get("at_start", False))
    documents = pipeline.load_documents(cfg.data)
    self.documents = [d for d in documents if d.split == ec.split][:int(ec.documents)]
    if not self.documents:
      raise ValueError(f"eval_coding: no documents in split {ec.split!r} of data.source="
                       f"{cfg.data.source!r}; set eval_coding.documents=0 to turn coding off")
    trained = {c for d in documents if d.split == "train" for c in d.codes}
    self.unseen = frozenset(c for d in self.documents for c in d.codes if c not in trained)
    self.spans = evidence_span_documents([d for d in documents if d.split == ec.split],
                                         int(ec.get("spans", 0)))
    self.unseen_span_codes = frozenset(s.codes[0] for s in self.spans
                                       if s.codes[0] not in trained)
    self._coder = None

  def _get_coder(self, model):
    from jaxicd.infer.coder import build_coder  # pylint: disable=import-outside-toplevel
    if self._coder is None:
      self._coder = build_coder(self.cfg, model, self.tokenizer)
    self._coder.model = model  # same graph, new adapter values: no recompilation
    return self._coder

  def __call__(self, trainer: Any, step: int) -> Mapping[str, float]:
    if step == 0 and not self.at_start:
      return {}
    model = trainer.parts.merge(trainer.params, trainer.base, trainer.rest)
    coder = self._get_coder(model)
    predictions = coder.code_documents(self.documents)
    result = metrics_lib.evaluate(self.documents, predictions, code_space=coder.code_space,
                                  unseen_codes=self.unseen, output_stats=coder.stats)
    seconds = coder.stats["seconds"]
    spans = ""
    if self.spans:
      span_predictions = coder.code_documents(self.spans)  # resets coder.stats
      result.update(metrics_lib.span_accuracy([s.codes[0] for s in self.spans],
                                              span_predictions,
                                              unseen_codes=self.unseen_span_codes))
      seconds += coder.stats["seconds"]
      spans = f" and {len(self.spans)} evidence spans"
    shown = "  ".join(f"{k} {result[k]:.3f}" for k in _HEADLINE if k in result)
    trainer.print(f"coding @ step {step} on {len(self.documents)} {self.cfg.eval_coding.split} "
                  f"notes ({len(self.unseen)} codes unseen in training){spans}, "
                  f"{seconds:.0f}s: {shown}")
    return {f"coding/{k}": float(v) for k, v in result.items()}
