"""What every reader shares: error routing, code checks, split names, hash splits.

Readers never drop anything silently. A problem is either an *error* (bad input: malformed
JSON, offsets outside the text, an unknown code, ...), which raises ``RecordError`` naming the
file and line or field when ``on_error="raise"`` and is counted in the ``SkipReport`` when
``on_error="skip"``; or a *filter* (data the reader deliberately leaves out by design: ICD-9
rows, ICD-10-PCS annotations, CodiEsp procedures, rare codes), which is always counted under a
reason that starts with ``"filtered: "`` and never raises.

Text is strict UTF-8. A leading byte order mark (``EF BB BF``, which Windows tools write) is
dropped, not read as text. Errors every reader shares: ``invalid UTF-8`` (bytes), ``invalid
text`` (a JSON string that no UTF-8 text can hold: a lone surrogate such as ``"\\ud800"``),
``malformed JSON`` (any decoding failure, nesting too deep included) and ``empty file`` (an
input file without a single record).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from jaxicd import ontology as ontology_lib
from jaxicd.data.records import Document, RecordError, SkipReport

ON_ERROR = ("raise", "skip")
SPLITS = ("train", "val", "test")
FILTERED = "filtered: "

# Names that public datasets use for the three splits; "dev" is CodiEsp's and MDACE's val.
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val", "development": "val",
    "test": "test", "testing": "test",
}

# Default fractions of the hash split when a dataset comes without a split file.
HASH_SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


class MissingDataError(FileNotFoundError):
  """Files of a credentialed or manually downloaded dataset are not where the reader looks."""


class CodeChecker(Protocol):
  def is_valid(self, code: str) -> bool: ...


def missing_data(dataset: str, missing: Iterable[Path], instructions: str) -> MissingDataError:
  paths = "\n".join(f"  - {p}" for p in missing)
  return MissingDataError(
      f"{dataset}: required files not found:\n{paths}\n\n{instructions.strip()}\n"
      "jaxicd never downloads credentialed data; place the files yourself and pass the folder "
      "as --manual_dir (config.data.manual_dir).")


def first_existing(*candidates: Path) -> Path | None:
  for p in candidates:
    if p.exists():
      return p
  return None


def canonical_split(name: str) -> str | None:
  """'dev' -> 'val', 'Train' -> 'train'; None for names that are not a known split."""
  return _SPLIT_ALIASES.get(str(name).strip().lower())


def hash_split(key: str, fractions=HASH_SPLIT_FRACTIONS) -> str:
  """A deterministic split from a stable key (same key, same split, on every machine)."""
  digest = hashlib.sha256(str(key).encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  acc = 0.0
  for name, frac in fractions:
    acc += frac
    if u < acc:
      return name
  return fractions[-1][0]


def check_text(issues: "Issues", text: str, where: str, field: str) -> bool:
  """Reports a CSV text field that is not valid UTF-8 or is empty; True when it is usable."""
  if has_invalid_utf8(text):
    issues.error("invalid UTF-8", where, f"in field {field!r}")
    return False
  if not text.strip():
    issues.error("empty text", f"{where}: field {field!r}")
    return False
  return True


def has_invalid_utf8(s: str) -> bool:
  """True when ``s`` was decoded with errors='surrogateescape' from bytes that are not UTF-8."""
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes) -> tuple[str | None, int]:
  """Strict UTF-8 decoding: (text, 0), or (None, line of the first bad byte) when invalid.

  A leading BOM is dropped: of a file, or of a line (files concatenated with one). Offsets into
  the text then count from the first character after it.
  """
  data = data[len(BOM):] if data.startswith(BOM) else data
  try:
    return data.decode("utf-8"), 0
  except UnicodeDecodeError as e:
    return None, data[:e.start].count(b"\n") + 1


def parse_json(text: str) -> tuple[object, str, int]:
  """(object, "", 0), or (None, why it is malformed JSON, its line or 0 when unknown).

  Every decoding failure is malformed input: JSONDecodeError, and RecursionError from nesting
  deeper than the interpreter's recursion limit, which would otherwise escape on_error="skip".
  """
  try:
    return json.loads(text), "", 0
  except json.JSONDecodeError as e:
    return None, f"{e.msg} at column {e.colno}", e.lineno
  except RecursionError:
    return None, "nested too deeply", 0


def unencodable_field(obj: object) -> str | None:
  """The path (``evidence[0].quote``) of the first string, key or value, that UTF-8 cannot
  encode (JSON's ``"\\ud800"`` decodes to a lone surrogate), or None when all can."""
  stack: list[tuple[str, object]] = [("", obj)]  # iterative: decoded JSON may nest deeply
  while stack:
    path, x = stack.pop()
    if isinstance(x, str):
      if has_invalid_utf8(x):
        return path or "(the value)"
    elif isinstance(x, dict):
      items = [(f"{path}.{k}" if path else k, k, v) for k, v in x.items()]
      for key, k, _ in items:
        if has_invalid_utf8(k):  # named escaped: a message must stay printable
          return key.encode("utf-8", "backslashreplace").decode("utf-8")
      stack.extend((key, v) for key, _, v in reversed(items))
    elif isinstance(x, list):
      stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(x))))
  return None


def check_json_text(issues: "Issues", obj: object, where: str) -> bool:
  """Reports a decoded JSON value holding text that is not text (see `unencodable_field`)."""
  field = unencodable_field(obj)
  if field is None:
    return True
  issues.error("invalid text", where, f"field {field!r} holds a lone surrogate, which no UTF-8 "
               "text can hold")
  return False


def check_nonempty(issues: "Issues", path: Path) -> bool:
  """Reports an input file of 0 bytes (a failed copy or download), which would read as no
  records without a word; True when the file has content."""
  if path.stat().st_size:
    return True
  issues.error("empty file", str(path), "0 bytes")
  return False


class Issues:
  """Routes the problems a reader finds: raise, or count, according to ``on_error``."""

  def __init__(self, on_error: str = "raise", skips: SkipReport | None = None,
               ontology: CodeChecker | None = None,
               normalize: Callable[[str], str] | None = None):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.on_error = on_error
    self.skips = skips if skips is not None else SkipReport()
    self._ontology = ontology
    self._normalize = normalize
    self._checked: dict[str, tuple[str, str | None]] = {}  # raw -> (code, problem or None)

  def error(self, reason: str, where: str, detail: str = "") -> None:
    """Bad input: raises RecordError in raise mode, else counts ``reason`` (never the text)."""
    if self.on_error == "raise":
      msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
      raise RecordError(msg + "; pass on_error='skip' (--on_error=skip) to count and skip such "
                        "records instead")
    self.skips.add(reason, where)

  def filtered(self, reason: str, where: str) -> None:
    """Data left out by design; always counted, never raises."""
    self.skips.add(FILTERED + reason, where)

  def code(self, raw: object, where: str) -> str | None:
    """Normalised, ontology-checked code, or None after reporting why it is unusable."""
    if self._normalize is None or self._ontology is None:
      self._normalize = self._normalize or ontology_lib.normalize_code
      self._ontology = self._ontology or ontology_lib.get_ontology()
    key = raw if isinstance(raw, str) else repr(raw)
    if key not in self._checked:  # millions of rows in MIMIC-IV, a few thousand distinct codes
      try:
        code = self._normalize(raw)  # type: ignore[arg-type]
      except ValueError:
        self._checked[key] = (str(raw), "malformed ICD-10-CM code")
      else:
        self._checked[key] = (code, None if self._ontology.is_valid(code)
                              else "unknown ICD-10-CM code")
    code, problem = self._checked[key]
    if problem:
      self._invalid(code, problem, where)
      return None
    return code

  def _invalid(self, code: str, reason: str, where: str) -> None:
    # Codes are not clinical text, so the offending value goes into the message and report.
    if self.on_error == "raise":
      self.error(reason, where, repr(code))
    self.skips.add(reason, f"{where} ({code!r})")
    invalid = self.skips.invalid_codes
    invalid[code] = invalid.get(code, 0) + 1


class DocumentStream:
  """The documents of one source, yielded one at a time, split by split.

  ``counts`` (documents per split, in the order of each split's first document) is known when
  the stream is opened, and so is every skipped or filtered record; ``documents(split)`` then
  yields that split's documents (all splits, in source order, when ``split`` is None), or those
  in ``[start, stop)`` of them, and may be called again. Close the stream (or use it in a
  ``with``) to release what it holds.
  """

  counts: dict[str, int]

  def documents(self, split: str | None = None, *, start: int = 0,
                stop: int | None = None) -> Iterator[Document]:
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __len__(self) -> int:
    return sum(self.counts.values())

  def __enter__(self) -> "DocumentStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class InMemoryStream(DocumentStream):
  """A stream over documents already read (the small sources, records built in code)."""

  def __init__(self, docs: Iterable[Document]):
    self._docs = list(docs)
    self.counts = {}
    for d in self._docs:
      self.counts[d.split] = self.counts.get(d.split, 0) + 1

  def documents(self, split: str | None = None, *, start: int = 0,
                stop: int | None = None) -> Iterator[Document]:
    docs = (d for d in self._docs if split is None or d.split == split)
    return itertools.islice(docs, start, stop)


def dedupe(items: Iterable[str]) -> tuple[str, ...]:
  """Unique items in first-seen order."""
  return tuple(dict.fromkeys(items))
