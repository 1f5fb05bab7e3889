"""Predict mode: code notes read from files with the adapters of a workdir's latest checkpoint.

  python -m jaxicd.main --config=configs/predict.py --workdir=runs/mixed --config.input=note.txt

``config.input`` is a ``.txt`` note, a ``.jsonl`` file of documents (the schema of
`jaxicd.data.sources.jsonl`; only ``text`` is required, ``id`` is kept) or a directory of
``.txt`` notes (the file name without ``.txt`` is the note's id). The run config must describe
the model the checkpoint was trained on (source and LoRA shapes are checked on restore); windows,
code space and decoding follow ``config.data`` and ``config.eval_coding``.

Output: ``config.output`` (default ``<workdir>/predictions.jsonl``), one JSON object per
predicted code and evidence span, ordered per note by score::

  {"document": "n1", "code": "I50.23", "description": "Acute on chronic systolic ...",
   "begin": 812, "end": 851, "quote": "acute on chronic systolic heart failure", "score": 0.91}

``begin``/``end`` are character offsets into the note (-1 when the model's quote was not found
in it; ``quote`` is then the model's). The file holds note text (the quotes); the log lines only
counts.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, Sequence

from jaxicd.data.records import Document
from jaxicd.infer.coder import CodedEvidence

TEXT_SOURCE = "text"


def _text_note(path: pathlib.Path) -> Document:
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from e
  if not text.strip():
    raise ValueError(f"{path}: empty note")
  return Document(id=path.stem, text=text, codes=(), split="test", source=TEXT_SOURCE)


def read_notes(path: str | pathlib.Path) -> list[Document]:
  """The notes of ``config.input``: a .txt note, a .jsonl of documents or a directory of .txt."""
  if not str(path):
    raise ValueError("config.input is empty: give a .txt note, a .jsonl file of documents or "
                     "a directory of .txt notes")
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.txt"))
    if not files:
      raise FileNotFoundError(f"{path}: no .txt notes in this directory")
    return [_text_note(f) for f in files]
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file or directory (config.input)")
  if path.suffix == ".jsonl":
    from jaxicd.data.sources import jsonl  # pylint: disable=import-outside-toplevel
    return jsonl.read_documents(path)
  return [_text_note(path)]


def prediction_rows(doc: Document, evidence: Sequence[CodedEvidence],
                    describe: Callable[[str], str]) -> list[dict[str, Any]]:
  """The output lines of one note (see the module docstring)."""
  return [dict(document=doc.id, code=ev.code, description=describe(ev.code), begin=ev.begin,
               end=ev.end, quote=ev.quote, score=round(float(ev.score), 6)) for ev in evidence]


def _describer() -> Callable[[str], str]:
  from jaxicd.ontology import get_ontology  # pylint: disable=import-outside-toplevel
  ontology = get_ontology()

  def describe(code: str) -> str:
    try:
      return ontology.description(code)
    except KeyError:  # a user code space may hold codes the ontology lacks
      return ""
  return describe


def run_predict(cfg: Any, workdir: str) -> dict[str, Any]:
  """Codes ``cfg.input`` with the latest checkpoint in ``workdir``; writes the JSONL output."""
  from jaxicd.infer.coder import build_coder  # pylint: disable=import-outside-toplevel
  from jaxicd.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  docs = read_notes(cfg.get("input", ""))  # before loading the model: bad input fails fast
  output = pathlib.Path(cfg.get("output", "") or pathlib.Path(workdir) / "predictions.jsonl")
  trainer = trainer_lib.Trainer(cfg, workdir)
  try:
    step = trainer.restore_latest(with_data=False)
    if step is None:
      trainer.print(f"warning: no checkpoint in {trainer.checkpointer.directory}: coding with "
                    "the base model and untrained adapters")
    model = trainer.parts.merge(trainer.params, trainer.base, trainer.rest)
    coder = build_coder(cfg, model, trainer.tokenizer)
    t0 = time.time()
    predictions = coder.code_documents(docs)
    describe = _describer()
    rows = [row for doc, evidence in zip(docs, predictions)
            for row in prediction_rows(doc, evidence, describe)]
    if trainer.is_chief:
      output.parent.mkdir(parents=True, exist_ok=True)
      with open(output, "w", encoding="utf-8") as f:
        for row in rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
    codes = sum(len({ev.code for ev in evidence}) for evidence in predictions)
    grounded = sum(1 for row in rows if row["begin"] >= 0)
    trainer.print(f"predict (checkpoint step {step or 0}): {len(docs)} notes, {codes} codes, "
                  f"{len(rows)} evidence lines ({grounded} found in the note) in "
                  f"{time.time() - t0:.0f}s -> {output}")
    return dict(step=step or 0, documents=len(docs), codes=codes, evidence=len(rows),
                grounded=grounded, output=str(output))
  finally:
    trainer.close()
