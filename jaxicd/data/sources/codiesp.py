"""CodiEsp (CLEF eHealth 2020): Spanish clinical case reports with ICD-10 codes and evidence.

Public (CC BY 4.0), but jaxicd downloads nothing: unpack the release so that ``manual_dir``
(or ``manual_dir/final_dataset_v4_to_publish``) holds ``train/``, ``dev/``, ``test/``, each with

* ``text_files/<articleID>.txt``: one clinical case per file (UTF-8);
* ``<split>D.tsv`` (CodiEsp-D): rows ``articleID<TAB>code``, lower-case ICD-10-CM (the 2018
  Spanish edition, CIE-10-ES), no header;
* ``<split>X.tsv`` (CodiEsp-X, optional): rows
  ``articleID<TAB>label<TAB>code<TAB>reference<TAB>start end[;start end]`` with half-open
  character offsets into the ``.txt`` text (after a UTF-8 byte order mark, which is dropped).

Splits: ``train`` -> train, ``dev`` -> val, ``test`` -> test; ``id`` = articleID. Codes come
from the D file (from the X file's DIAGNOSTICO rows when there is no D file) and are checked
against the ontology: CIE-10-ES codes that the US ICD-10-CM release in use lacks are reported as
unknown codes. DIAGNOSTICO rows become ``Evidence``; a discontinuous reference
(``start end;start end``) becomes one ``Evidence`` per part, since a quote in the target format
is one contiguous piece of text. PROCEDIMIENTO rows (ICD-10-PCS) are counted as filtered. The
``reference`` must equal ``text[start:end]`` (for several parts: the parts joined by spaces, or
the whole stretch from the first start to the last end, compared with whitespace collapsed).
"""

from __future__ import annotations

import collections
from pathlib import Path

from jaxicd.data.records import Document, Evidence
from jaxicd.data.sources import common

SOURCE = "codiesp"
SPLIT_DIRS = (("train", "train"), ("dev", "val"), ("test", "test"))

INSTRUCTIONS = """
CodiEsp is public (CC BY 4.0) but is not downloaded by jaxicd:
  1. download the CodiEsp corpus from Zenodo: https://zenodo.org/record/3837305
  2. unpack it so that MANUAL_DIR/train/text_files/*.txt and MANUAL_DIR/train/trainD.tsv exist
     (likewise dev/ and test/; MANUAL_DIR/final_dataset_v4_to_publish/ is found as well).
"""


def _collapse(s: str) -> str:
  return " ".join(s.split())


def _root(manual_dir: Path) -> Path | None:
  for root in (manual_dir, manual_dir / "final_dataset_v4_to_publish"):
    if any((root / d / "text_files").is_dir() for d, _ in SPLIT_DIRS):
      return root
  return None


def _read_texts(folder: Path, issues: common.Issues) -> dict[str, str]:
  texts = {}
  for path in sorted(folder.glob("*.txt")):
    text, line = common.decode_utf8(path.read_bytes())
    if text is None:
      issues.error("invalid UTF-8", f"{path}:{line}")
    elif not text.strip():
      issues.error("empty text", str(path))
    else:
      texts[path.stem] = text
  return texts


def _tsv_rows(path: Path, n_fields: int, issues: common.Issues):
  """Yields (where, fields) of the non-blank rows that have exactly ``n_fields`` fields."""
  data = path.read_bytes()
  for lineno, raw in enumerate(data.split(b"\n"), start=1):
    where = f"{path}:{lineno}"
    line, _ = common.decode_utf8(raw)
    if line is None:
      issues.error("invalid UTF-8", where)
      continue
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != n_fields:
      issues.error("malformed TSV row", where, f"{len(fields)} fields, expected {n_fields}")
      continue
    yield where, [f.strip() for f in fields]


def _parse_positions(s: str) -> list[tuple[int, int]] | None:
  parts = []
  for piece in s.split(";"):
    bounds = piece.split()
    if len(bounds) != 2 or not all(b.isdigit() for b in bounds):
      return None
    parts.append((int(bounds[0]), int(bounds[1])))
  return parts or None


def _reference_matches(text: str, parts: list[tuple[int, int]], reference: str) -> bool:
  if len(parts) == 1:
    b, e = parts[0]
    return text[b:e] == reference or _collapse(text[b:e]) == _collapse(reference)
  joined = " ".join(text[b:e] for b, e in parts)
  whole = text[parts[0][0]:parts[-1][1]]
  return _collapse(reference) in (_collapse(joined), _collapse(whole))


def _read_split(folder: Path, split_name: str, split: str, issues: common.Issues
                ) -> list[Document]:
  texts = _read_texts(folder / "text_files", issues)
  d_path, x_path = folder / f"{split_name}D.tsv", folder / f"{split_name}X.tsv"
  codes: dict[str, list[str]] = collections.defaultdict(list)
  evidence: dict[str, list[Evidence]] = collections.defaultdict(list)
  # An empty file is reported; skipped, it counts as absent (codes then come from the X file).
  has_d = d_path.is_file() and common.check_nonempty(issues, d_path)
  if has_d:
    for where, (article, raw_code) in _tsv_rows(d_path, 2, issues):
      if article not in texts:
        issues.error("articleID without a text file", where, repr(article))
        continue
      code = issues.code(raw_code, where)
      if code is not None and code not in codes[article]:
        codes[article].append(code)

  if x_path.is_file() and common.check_nonempty(issues, x_path):
    for where, (article, label, raw_code, reference, positions) in _tsv_rows(x_path, 5, issues):
      if label == "PROCEDIMIENTO":
        issues.filtered("CodiEsp-X PROCEDIMIENTO row (ICD-10-PCS)", where)
        continue
      if label != "DIAGNOSTICO":
        issues.error("unknown CodiEsp-X label", where, repr(label))
        continue
      if article not in texts:
        issues.error("articleID without a text file", where, repr(article))
        continue
      parts = _parse_positions(positions)
      if parts is None:
        issues.error("malformed offsets", where, f"{positions!r}; expected 'start end[;start end]'")
        continue
      code = issues.code(raw_code, where)
      if code is None:
        continue
      text = texts[article]
      if not all(0 <= b < e <= len(text) for b, e in parts):
        issues.error("evidence offsets outside text", where,
                     f"{positions} vs text length {len(text)}")
        continue
      if not _reference_matches(text, parts, reference):
        issues.error("evidence quote does not match text[begin:end]", where, f"span {positions}")
        continue
      if has_d and code not in codes[article]:
        issues.error("evidence code not among the document's codes", where,
                     f"{code} is not in {d_path.name} for this article")
        continue
      if not has_d and code not in codes[article]:
        codes[article].append(code)
      for b, e in parts:
        ev = Evidence(code, b, e)
        if ev not in evidence[article]:
          evidence[article].append(ev)

  docs = []
  for article, text in texts.items():
    doc = Document(id=article, text=text, codes=tuple(codes.get(article, ())),
                   evidence=tuple(evidence.get(article, ())), split=split, source=SOURCE)
    doc.validate(str(folder / "text_files" / f"{article}.txt"))
    docs.append(doc)
  return docs


def input_files(manual_dir: str | Path) -> list[Path]:
  """The files `load` reads (what a cache of its documents is keyed on)."""
  root = _root(Path(manual_dir))
  if root is None:
    return []
  files = []
  for name, _ in SPLIT_DIRS:
    if (root / name / "text_files").is_dir():
      files += sorted((root / name / "text_files").glob("*.txt"))
      files += [p for p in (root / name / f"{name}D.tsv", root / name / f"{name}X.tsv")
                if p.is_file()]
  return files


def load(manual_dir: str | Path, *, issues: common.Issues) -> list[Document]:
  manual_dir = Path(manual_dir)
  root = _root(manual_dir)
  if root is None:
    raise common.missing_data(
        "CodiEsp", [manual_dir / f"{d}/text_files/*.txt" for d, _ in SPLIT_DIRS],
        INSTRUCTIONS.replace("MANUAL_DIR", str(manual_dir)))
  docs = []
  for name, split in SPLIT_DIRS:
    if (root / name / "text_files").is_dir():
      docs.extend(_read_split(root / name, name, split, issues))
  return docs
