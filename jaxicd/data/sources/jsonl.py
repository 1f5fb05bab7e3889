"""JSONL: users' own documents and spans, one JSON object per line.

Documents::

  {"id": "n1", "text": "...", "codes": ["I50.23", "n179"],
   "evidence": [{"code": "I50.23", "begin": 10, "end": 42, "quote": "..."}], "split": "train"}

``id`` defaults to ``<file name>:<line>``; ``codes`` defaults to the codes of ``evidence``;
``split`` defaults to ``train`` (``dev``/``valid``/``validation`` mean ``val``). An evidence item
may carry the text it covers as ``quote`` (or ``text``); it must equal ``text[begin:end]``.

Spans::

  {"text": "acute on chronic diastolic heart failure", "code": "I50.33",
   "origin": "annotated", "context": "..."}

``code`` null (or absent) makes a negative span; ``origin`` defaults to ``annotated`` for coded
spans and ``negative`` for the others.

Granularity of ``on_error="skip"``: a problem with a whole line (invalid UTF-8, malformed JSON,
invalid text such as a lone surrogate ``"\\ud800"`` in any field, empty text, bad id or split)
skips the line; an unknown code drops that code (and its evidence); a bad evidence item
(offsets, quote) drops that item only; a file without any record (0 bytes, or blank lines only)
is an ``empty file``. A UTF-8 byte order mark is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from jaxicd.data.records import Document, Evidence, SkipReport, Span
from jaxicd.data.sources import common

SOURCE = "jsonl"


def _lines(path: Path, issues: common.Issues) -> Iterator[tuple[str, Any]]:
  """Yields (where, parsed object) for each non-blank line; reports undecodable lines."""
  if not common.check_nonempty(issues, path):
    return
  records = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      line, _ = common.decode_utf8(raw)
      if line is None:
        records += 1
        issues.error("invalid UTF-8", where)
        continue
      if not line.strip():
        continue  # blank lines separate nothing and carry no record
      records += 1
      obj, problem, _ = common.parse_json(line)
      if problem:
        issues.error("malformed JSON", where, problem)
        continue
      if not isinstance(obj, dict):
        issues.error("malformed JSON", where, f"expected an object, got {type(obj).__name__}")
        continue
      yield where, obj
  if not records:
    issues.error("empty file", str(path), "no records: only blank lines")


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _document(where: str, obj: dict, path: Path, issues: common.Issues,
              seen_ids: set[str]) -> Document | None:
  if not common.check_json_text(issues, obj, where):  # any field: the line is unusable
    return None
  text = obj.get("text")
  if not isinstance(text, str) or not text.strip():
    issues.error("empty text", f"{where}: field 'text'",
                 "missing" if text is None else f"{type(text).__name__} of length "
                 f"{len(text) if isinstance(text, str) else 0}")
    return None
  doc_id = obj.get("id", f"{path.name}:{where.rsplit(':', 1)[1]}")
  if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or not str(doc_id).strip():
    issues.error("bad id", f"{where}: field 'id'", f"expected a non-empty string, got {doc_id!r}")
    return None
  doc_id = str(doc_id)
  if doc_id in seen_ids:
    issues.error("duplicate id", f"{where}: field 'id'", repr(doc_id))
    return None
  split = common.canonical_split(obj.get("split", "train"))
  if split is None:
    issues.error("unknown split", f"{where}: field 'split'",
                 f"{obj.get('split')!r}; expected one of {', '.join(common.SPLITS)}")
    return None

  raw_codes = obj.get("codes")
  if raw_codes is not None and not isinstance(raw_codes, list):
    issues.error("bad codes", f"{where}: field 'codes'", "expected a list of code strings")
    return None
  codes = []
  for i, raw in enumerate(raw_codes or []):
    code = issues.code(raw, f"{where}: codes[{i}]")
    if code is not None:
      codes.append(code)

  raw_evidence = obj.get("evidence", [])
  if not isinstance(raw_evidence, list):
    issues.error("bad evidence", f"{where}: field 'evidence'", "expected a list of objects")
    return None
  evidence = []
  for i, ev in enumerate(raw_evidence):
    at = f"{where}: evidence[{i}]"
    if not isinstance(ev, dict) or not _is_int(ev.get("begin")) or not _is_int(ev.get("end")):
      issues.error("bad evidence", at, "expected {\"code\", \"begin\": int, \"end\": int}")
      continue
    code = issues.code(ev.get("code"), f"{at}.code")
    if code is None:
      continue
    begin, end = ev["begin"], ev["end"]
    if not 0 <= begin < end <= len(text):
      issues.error("evidence offsets outside text", at,
                   f"[{begin}, {end}) vs text length {len(text)}")
      continue
    quote = ev.get("quote", ev.get("text"))
    if quote is not None and quote != text[begin:end]:
      # The message names offsets, not the (clinical) text itself.
      issues.error("evidence quote does not match text[begin:end]", at,
                   f"quote of {len(quote) if isinstance(quote, str) else 0} characters vs "
                   f"span [{begin}, {end})")
      continue
    if raw_codes is not None and code not in codes:
      issues.error("evidence code not among the document's codes", at, code)
      continue
    evidence.append(Evidence(code, begin, end))
  if raw_codes is None:
    codes = [ev.code for ev in evidence]
  seen_ids.add(doc_id)
  return Document(id=doc_id, text=text, codes=common.dedupe(codes), evidence=tuple(evidence),
                  split=split, source=SOURCE)


def read_documents(path: str | Path, *, on_error: str = "raise",
                   skips: SkipReport | None = None, ontology=None,
                   issues: common.Issues | None = None) -> list[Document]:
  """Reads one JSONL file of documents (see the module docstring for the schema)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such JSONL file")
  issues = issues or common.Issues(on_error, skips, ontology)
  seen: set[str] = set()
  docs = []
  for where, obj in _lines(path, issues):
    doc = _document(where, obj, path, issues, seen)
    if doc is not None:
      doc.validate(where)
      docs.append(doc)
  return docs


def read_spans(path: str | Path, *, on_error: str = "raise", skips: SkipReport | None = None,
               ontology=None, issues: common.Issues | None = None) -> list[Span]:
  """Reads one JSONL file of spans (see the module docstring for the schema)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such JSONL file")
  issues = issues or common.Issues(on_error, skips, ontology)
  spans = []
  for where, obj in _lines(path, issues):
    if not common.check_json_text(issues, obj, where):
      continue
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
      issues.error("empty text", f"{where}: field 'text'")
      continue
    context = obj.get("context", "")
    if not isinstance(context, str):
      issues.error("bad context", f"{where}: field 'context'", "expected a string")
      continue
    raw_code = obj.get("code")
    code = None
    if raw_code is not None:
      code = issues.code(raw_code, f"{where}: field 'code'")
      if code is None:
        continue
    origin = obj.get("origin", "annotated" if code else "negative")
    span = Span(text=text, code=code, origin=origin, context=context)
    try:
      span.validate(where)
    except ValueError as e:
      issues.error("bad span", where, str(e).removeprefix(f"{where}: "))
      continue
    spans.append(span)
  return spans


def document_files(path: str | Path) -> list[Path]:
  """The document files that ``path`` names: itself, or a folder's ``*.jsonl`` except spans*."""
  path = Path(path)
  if path.is_file():
    return [path]
  if path.is_dir():
    return sorted(p for p in path.glob("*.jsonl") if not p.name.startswith("spans"))
  return []


def span_files(path: str | Path) -> list[Path]:
  """The span files beside the documents: ``spans*.jsonl`` in a folder."""
  path = Path(path)
  return sorted(path.glob("spans*.jsonl")) if path.is_dir() else []


def input_files(manual_dir: str | Path) -> list[Path]:
  """The files `load` reads (what a cache of its documents is keyed on)."""
  return document_files(manual_dir)


def load(manual_dir: str | Path, *, issues: common.Issues) -> list[Document]:
  """All document files under ``manual_dir`` (a ``.jsonl`` file or a folder of them)."""
  files = document_files(manual_dir)
  if not files:
    raise FileNotFoundError(
        f"jsonl: no documents at {manual_dir!r}; pass a .jsonl file or a folder holding "
        "*.jsonl document files (files named spans*.jsonl are read as spans)")
  docs = []
  seen: set[str] = set()
  for f in files:
    for doc in read_documents(f, issues=issues):
      if doc.id in seen:
        issues.error("duplicate id", str(f), f"{doc.id!r} appears in an earlier file")
        continue
      seen.add(doc.id)
      docs.append(doc)
  return docs
