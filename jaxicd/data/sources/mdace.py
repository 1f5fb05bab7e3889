"""MDACE inpatient ICD-10: MIMIC-III notes with coder-annotated evidence spans.

Inputs (placed by hand under ``manual_dir``):

* the MDACE annotations, one JSON per admission,
  ``data/Inpatient/ICD-10/1.0/<hadm_id>-ICD-10.json`` (the layout of the MDACE repository; a
  copy at ``Inpatient/ICD-10/1.0/`` is found too): ``{"hadm_id", "comment", "notes": [{"note_id",
  "category", "description", "annotations": [{"begin", "end", "code", "code_system",
  "description", "type"}]}]}``.
* MIMIC-III v1.4 ``NOTEEVENTS.csv`` (or ``.csv.gz``; credentialed): ``ROW_ID, SUBJECT_ID,
  HADM_ID, CHARTDATE, CHARTTIME, STORETIME, CATEGORY, DESCRIPTION, CGID, ISERROR, TEXT``. MDACE
  ships no text: ``note_id`` is ``ROW_ID`` and ``[begin, end)`` are half-open character offsets
  into that row's ``TEXT``.
* optionally split lists: a folder (``split_dir=`` or found at ``splits/inpatient``, ``splits``)
  holding MDACE's ``MDace-ev-{train,val,test}.csv`` (one hadm_id per line, no header) or
  ``{train,dev,test}.txt`` (one hadm_id per line). Without one, admissions are split by a hash
  of hadm_id (80/10/10).

One ``Document`` per annotated note, ``id = f"{hadm_id}/{note_id}"``: the offsets belong to a
note, and an admission's notes stay in one split. ``codes`` are the note's ICD-10-CM codes with
at least one valid evidence span, in order of first appearance. ICD-10-PCS annotations are
counted as filtered (not ICD-10-CM). If an annotation carries the text it covers
(``covered_text``, ``quote`` or ``text``), it must equal ``TEXT[begin:end]``. A note whose
annotations are all filtered or invalid is counted and left out.
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxicd.data.records import Document, Evidence
from jaxicd.data.sources import common
from jaxicd.data.sources.mimic_iv import read_csv_rows

SOURCE = "mdace"
ANNOTATION_DIRS = (Path("data/Inpatient/ICD-10/1.0"), Path("Inpatient/ICD-10/1.0"))
NOTEEVENTS = ("NOTEEVENTS.csv", "NOTEEVENTS.csv.gz")
SPLIT_DIRS = ("splits/inpatient", "splits/Inpatient", "splits", "data/splits/inpatient")
NOTEEVENTS_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "TEXT")
_COVERED_TEXT_KEYS = ("covered_text", "quote", "text")
_FILE_RE = re.compile(r"^(\d+)-ICD-10\.json$")

INSTRUCTIONS = """
MDACE needs two inputs:
  1. the MDACE annotations (MIT licence): https://github.com/3mcloud/MDACE
     place data/Inpatient/ICD-10/1.0/*.json at MANUAL_DIR/data/Inpatient/ICD-10/1.0/
     (and optionally the split lists, e.g. MDace-ev-{train,val,test}.csv, in MANUAL_DIR/splits/)
  2. MIMIC-III v1.4 NOTEEVENTS.csv.gz (PhysioNet credentialed access + data use agreement):
     https://physionet.org/content/mimiciii/1.4/
     place it at MANUAL_DIR/NOTEEVENTS.csv.gz (or unpacked as MANUAL_DIR/NOTEEVENTS.csv)
"""

# Split list names: MDACE's own CSVs and plain text lists.
_SPLIT_LISTS = {
    "train": ("MDace-ev-train.csv", "train.txt", "train.csv"),
    "val": ("MDace-ev-val.csv", "dev.txt", "val.txt", "dev.csv", "val.csv"),
    "test": ("MDace-ev-test.csv", "test.txt", "test.csv"),
}


def read_split_dir(split_dir: Path, issues: common.Issues) -> dict[str, str]:
  """hadm_id -> split from one-id-per-line lists; a header line (not digits) is skipped."""
  splits: dict[str, str] = {}
  found = False
  for split, names in _SPLIT_LISTS.items():
    path = common.first_existing(*(split_dir / n for n in names))
    if path is None:
      continue
    found = True
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
      value = line.split(",")[0].strip()
      if not value or (lineno == 1 and value.lower() in ("hadm_id", "_id", "id")):
        continue
      where = f"{path}:{lineno}"
      if not value.isdigit():
        issues.error("malformed hadm_id", where, repr(value))
      elif splits.get(value, split) != split:
        issues.error("hadm_id in two split lists", where, f"{value} ({splits[value]}, {split})")
      else:
        splits[value] = split
  if not found:
    raise FileNotFoundError(
        f"{split_dir}: no split lists; expected MDace-ev-{{train,val,test}}.csv or "
        "{train,dev,test}.txt with one hadm_id per line")
  return splits


def _read_annotations(path: Path, issues: common.Issues):
  """Yields (hadm_id, note_id, where, [(begin, end, code, covered_text | None, where)])."""
  where = str(path)
  if not common.check_nonempty(issues, path):
    return
  text, line = common.decode_utf8(path.read_bytes())
  if text is None:
    issues.error("invalid UTF-8", f"{path}:{line}")
    return
  obj, problem, line = common.parse_json(text)
  if problem:
    issues.error("malformed JSON", f"{path}:{line}" if line else where, problem)
    return
  if not common.check_json_text(issues, obj, where):
    return
  if not isinstance(obj, dict) or not isinstance(obj.get("notes"), list):
    issues.error("malformed MDACE file", f"{where}: field 'notes'", "expected a list of notes")
    return
  hadm = str(obj.get("hadm_id", "")).strip()
  m = _FILE_RE.match(path.name)
  if not hadm.isdigit() or (m and m.group(1) != hadm):
    issues.error("malformed hadm_id", f"{where}: field 'hadm_id'",
                 f"{obj.get('hadm_id')!r}, file name {path.name}")
    return
  for i, note in enumerate(obj["notes"]):
    at = f"{where}: notes[{i}]"
    note_id = str(note.get("note_id", "")).strip() if isinstance(note, dict) else ""
    if not note_id.isdigit() or not isinstance(note.get("annotations"), list):
      issues.error("malformed MDACE note", at, "expected note_id (int) and annotations (list)")
      continue
    anns = []
    for j, ann in enumerate(note["annotations"]):
      a_at = f"{at}.annotations[{j}]"
      ok = isinstance(ann, dict) and all(
          isinstance(ann.get(k), int) and not isinstance(ann.get(k), bool)
          for k in ("begin", "end"))
      if not ok or not isinstance(ann.get("code"), str):
        issues.error("malformed MDACE annotation", a_at,
                     "expected begin (int), end (int), code (str), code_system")
        continue
      system = str(ann.get("code_system", "ICD-10-CM")).strip()
      if system != "ICD-10-CM":
        issues.filtered(f"{system} annotation (not ICD-10-CM)", a_at)
        continue
      covered = next((ann[k] for k in _COVERED_TEXT_KEYS if k in ann), None)
      anns.append((ann["begin"], ann["end"], ann["code"], covered, a_at))
    yield hadm, note_id, at, anns


def _inputs(manual_dir: Path, split_dir: str | Path | None, annotation_dir: str | Path | None
            ) -> tuple[list[Path], Path | None, Path | None]:
  """(annotation files, NOTEEVENTS or None, split list folder or None)."""
  ann_dir = (Path(annotation_dir) if annotation_dir else
             common.first_existing(*(manual_dir / d for d in ANNOTATION_DIRS)))
  notes_path = common.first_existing(*(manual_dir / n for n in NOTEEVENTS))
  ann_files = sorted(ann_dir.glob("*.json")) if ann_dir and ann_dir.is_dir() else []
  if split_dir is None:
    split_dir = next((manual_dir / d for d in SPLIT_DIRS
                      if any((manual_dir / d / n).is_file()
                             for names in _SPLIT_LISTS.values() for n in names)), None)
  return ann_files, notes_path, Path(split_dir) if split_dir else None


def input_files(manual_dir: str | Path, *, split_dir: str | Path | None = None,
                annotation_dir: str | Path | None = None) -> list[Path]:
  """The files `load` reads (what a cache of its documents is keyed on)."""
  ann_files, notes_path, split_dir = _inputs(Path(manual_dir), split_dir, annotation_dir)
  lists = ([split_dir / n for names in _SPLIT_LISTS.values() for n in names
            if (split_dir / n).is_file()] if split_dir else [])
  return ann_files + ([notes_path] if notes_path else []) + lists


def load(manual_dir: str | Path, *, issues: common.Issues, split_dir: str | Path | None = None,
         annotation_dir: str | Path | None = None) -> list[Document]:
  manual_dir = Path(manual_dir)
  ann_files, notes_path, split_dir = _inputs(manual_dir, split_dir, annotation_dir)
  if not ann_files or notes_path is None:
    missing = ([] if ann_files else [manual_dir / ANNOTATION_DIRS[0] / "<hadm_id>-ICD-10.json"])
    missing += [] if notes_path else [manual_dir / NOTEEVENTS[1]]
    raise common.missing_data("MDACE", missing,
                              INSTRUCTIONS.replace("MANUAL_DIR", str(manual_dir)))
  splits = read_split_dir(split_dir, issues) if split_dir else None

  notes = []  # (hadm, note_id, where, annotations)
  for path in ann_files:
    notes.extend(_read_annotations(path, issues))
  wanted = {note_id: hadm for hadm, note_id, _, _ in notes}
  texts = _read_noteevents(notes_path, wanted, issues)

  docs = []
  for hadm, note_id, where, anns in notes:
    if texts.get(note_id, "") is None:
      continue  # its NOTEEVENTS row was already reported
    if note_id not in texts:
      issues.error("note_id not found in NOTEEVENTS", where,
                   f"ROW_ID {note_id} of hadm_id {hadm} in {notes_path}")
      continue
    text = texts[note_id]
    if splits is None:
      split = common.hash_split(f"hadm:{hadm}")
    elif hadm in splits:
      split = splits[hadm]
    else:
      issues.filtered("admission not in the split lists", f"{where} (hadm_id {hadm})")
      continue
    evidence = []
    for begin, end, raw_code, covered, a_at in anns:
      code = issues.code(raw_code, a_at)
      if code is None:
        continue
      if not 0 <= begin < end <= len(text):
        issues.error("evidence offsets outside text", a_at,
                     f"[{begin}, {end}) vs TEXT length {len(text)} of ROW_ID {note_id}")
        continue
      if covered is not None and covered != text[begin:end]:
        issues.error("evidence quote does not match text[begin:end]", a_at,
                     f"span [{begin}, {end}) of ROW_ID {note_id}")
        continue
      ev = Evidence(code, begin, end)
      if ev in evidence:
        issues.filtered("duplicate annotation (same code and span)", a_at)
        continue
      evidence.append(ev)
    if not evidence:
      issues.filtered("note without valid ICD-10-CM evidence", where)
      continue
    doc = Document(id=f"{hadm}/{note_id}", text=text,
                   codes=common.dedupe(ev.code for ev in evidence), evidence=tuple(evidence),
                   split=split, source=SOURCE)
    doc.validate(where)
    docs.append(doc)
  return docs


def _read_noteevents(path: Path, wanted: dict[str, str], issues: common.Issues
                     ) -> dict[str, str | None]:
  """ROW_ID -> TEXT for the wanted notes (None: reported as bad), streaming past the rest."""
  texts = {}
  for line, row in read_csv_rows(path, NOTEEVENTS_COLUMNS):
    row_id = (row["ROW_ID"] or "").strip()
    if row_id not in wanted:
      continue
    where = f"{path}:{line}"
    texts[row_id] = None
    if (row["HADM_ID"] or "").strip() != wanted[row_id]:
      issues.error("NOTEEVENTS HADM_ID differs from the MDACE hadm_id", where,
                   f"ROW_ID {row_id}: {row['HADM_ID']!r} vs {wanted[row_id]}")
      continue
    text = row["TEXT"] or ""
    if not common.check_text(issues, text, where, 'TEXT'):
      continue
    texts[row_id] = text
  return texts
