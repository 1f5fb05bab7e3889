"""MIMIC-IV ICD-10: discharge summaries with the admission's ICD-10-CM diagnosis codes.

Inputs (credentialed PhysioNet data, placed by hand under ``manual_dir``):

* ``hosp/diagnoses_icd.csv.gz`` from MIMIC-IV (v2.2 or later): ``subject_id, hadm_id, seq_num,
  icd_code, icd_version``. Codes are stored without dots (``I5023``); only rows with
  ``icd_version == 10`` are used (ICD-9 rows are counted as filtered).
* ``note/discharge.csv.gz`` from MIMIC-IV-Note (v2.2): ``note_id, subject_id, hadm_id,
  note_type, note_seq, charttime, storetime, text``.
* optionally a split file, ``hadm_id,split`` CSV (header ``hadm_id`` or ``_id``, e.g. Edin et
  al.'s split exported to CSV) or the ``.feather`` file itself (needs pyarrow), found at
  ``split_file=`` or ``manual_dir/mimiciv_icd10_split.{csv,feather}``. Without one, admissions
  are split by a hash of ``subject_id`` (80/10/10), so a patient's admissions share a split.

Plain ``.csv`` files are read too. One ``Document`` per admission (``id`` = hadm_id); when an
admission has several discharge notes they are joined in ``note_seq`` order with a blank line.
``min_code_count`` drops codes with fewer occurrences (counted over all admissions read, i.e.
all splits, as Edin et al. do with 10) and then admissions left without codes; both are counted
as filtered.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import sys
from pathlib import Path
from typing import Iterator

from jaxicd.data.records import Document, RecordError
from jaxicd.data.sources import common

SOURCE = "mimic_iv"
DIAGNOSES = Path("hosp/diagnoses_icd.csv.gz")
NOTES = Path("note/discharge.csv.gz")
SPLIT_FILES = ("mimiciv_icd10_split.csv", "mimiciv_icd10_split.feather")

DIAGNOSES_COLUMNS = ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version")
NOTES_COLUMNS = ("note_id", "subject_id", "hadm_id", "note_seq", "text")

INSTRUCTIONS = """
MIMIC-IV is credentialed data (PhysioNet credentialed access + the data use agreement):
  1. MIMIC-IV (v2.2 or later): https://physionet.org/content/mimiciv/2.2/
     download hosp/diagnoses_icd.csv.gz and place it at MANUAL_DIR/hosp/diagnoses_icd.csv.gz
  2. MIMIC-IV-Note (v2.2): https://physionet.org/content/mimic-iv-note/2.2/
     download note/discharge.csv.gz and place it at MANUAL_DIR/note/discharge.csv.gz
  3. optional: a split file MANUAL_DIR/mimiciv_icd10_split.csv with rows hadm_id,split
     (train/val/test), e.g. Edin et al.'s mimiciv_icd10 split; without it a hash split is used.
"""

# Discharge notes can be longer than csv's default 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _open_text(path: Path) -> io.TextIOBase:
  # surrogateescape keeps reading past invalid UTF-8 so the record can be named and counted;
  # utf-8-sig drops a byte order mark, which would otherwise hide the first column's name.
  if path.suffix == ".gz":
    return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
  return open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def read_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (line where the record starts, row) from a CSV with a header; checks columns."""
  if not path.stat().st_size:  # a required table: no skipping it
    raise RecordError(f"{path}: empty file (0 bytes); expected a CSV with the header "
                      f"{', '.join(required)}")
  line = 1
  try:
    with _open_text(path) as f:
      reader = csv.DictReader(f)
      header = reader.fieldnames or []
      missing = [c for c in required if c not in header]
      if missing:
        raise RecordError(f"{path}:1: missing column(s) {', '.join(missing)} in header "
                          f"{', '.join(header) or '(empty file)'}")
      line = reader.line_num + 1
      for row in reader:
        yield line, row
        line = reader.line_num + 1
  except csv.Error as e:
    raise RecordError(f"{path}:{line}: unreadable CSV ({e})") from e
  except (OSError, EOFError) as e:  # a truncated or corrupt .gz
    raise RecordError(f"{path}:{line}: unreadable file ({e})") from e


def _locate(manual_dir: Path, rel: Path) -> Path | None:
  return common.first_existing(manual_dir / rel, manual_dir / rel.with_suffix(""))


def read_split_file(path: Path, issues: common.Issues) -> dict[str, str]:
  """hadm_id -> train/val/test from a CSV (hadm_id|_id, split) or Edin's feather file."""
  if path.suffix == ".feather":
    try:
      from pyarrow import feather  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise RecordError(f"{path}: reading .feather needs pyarrow; export it to CSV "
                        "(hadm_id,split) instead") from e
    table = feather.read_table(path).to_pydict()
    key = "hadm_id" if "hadm_id" in table else "_id"
    if key not in table or "split" not in table:
      raise RecordError(f"{path}: expected columns hadm_id (or _id) and split, got "
                        f"{', '.join(table)}")
    rows = ((i + 1, {"hadm_id": str(h), "split": str(s)})
            for i, (h, s) in enumerate(zip(table[key], table["split"])))
  else:
    with _open_text(path) as f:
      header = next(csv.reader(f), [])
    key = "hadm_id" if "hadm_id" in header else "_id"
    rows = ((line, {"hadm_id": r.get(key, ""), "split": r["split"]})
            for line, r in read_csv_rows(path, (key, "split")))
  splits = {}
  for line, row in rows:
    hadm, split = row["hadm_id"].strip(), common.canonical_split(row["split"])
    where = f"{path}:{line}"
    if not hadm.isdigit():
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
    elif split is None:
      issues.error("unknown split", where, f"{row['split']!r}")
    else:
      splits[hadm] = split
  return splits


def input_files(manual_dir: str | Path, *, split_file: str | Path | None = None,
                min_code_count: int = 0) -> list[Path]:
  """The files `load` reads (what a cache of its documents is keyed on)."""
  del min_code_count  # an option, not a file
  manual_dir = Path(manual_dir)
  split = (Path(split_file) if split_file
           else common.first_existing(*(manual_dir / name for name in SPLIT_FILES)))
  return [p for p in (_locate(manual_dir, DIAGNOSES), _locate(manual_dir, NOTES), split)
          if p is not None and p.is_file()]


def load(manual_dir: str | Path, *, issues: common.Issues, split_file: str | Path | None = None,
         min_code_count: int = 0) -> list[Document]:
  manual_dir = Path(manual_dir)
  diagnoses, notes = _locate(manual_dir, DIAGNOSES), _locate(manual_dir, NOTES)
  if diagnoses is None or notes is None:
    missing = [manual_dir / p for p, found in ((DIAGNOSES, diagnoses), (NOTES, notes))
               if found is None]
    raise common.missing_data("MIMIC-IV", missing,
                              INSTRUCTIONS.replace("MANUAL_DIR", str(manual_dir)))
  if split_file is None:
    split_file = common.first_existing(*(manual_dir / name for name in SPLIT_FILES))
  elif not Path(split_file).is_file():
    raise FileNotFoundError(f"MIMIC-IV split file {split_file} does not exist")
  splits = read_split_file(Path(split_file), issues) if split_file else None

  codes_by_hadm = _read_diagnoses(diagnoses, issues)
  texts_by_hadm = _read_notes(notes, codes_by_hadm, issues)

  docs = []
  for hadm in sorted(codes_by_hadm, key=int):
    if hadm not in texts_by_hadm:
      issues.filtered("admission without a discharge note", f"{diagnoses}: hadm_id {hadm}")
      continue
    parts = sorted(texts_by_hadm[hadm])
    text = "\n\n".join(p[2] for p in parts)
    subject = parts[0][3]
    if splits is None:
      split = common.hash_split(f"subject:{subject}" if subject else f"hadm:{hadm}")
    elif hadm in splits:
      split = splits[hadm]
    else:
      issues.filtered("admission not in the split file", f"{split_file}: hadm_id {hadm}")
      continue
    codes = [code for _, code in sorted(codes_by_hadm[hadm], key=lambda sc: sc[0])]
    docs.append(Document(id=hadm, text=text, codes=common.dedupe(codes), split=split,
                         source=SOURCE))
  if min_code_count > 1:
    docs = _drop_rare_codes(docs, min_code_count, issues)
  for d in docs:
    d.validate(f"{SOURCE}: hadm_id {d.id}")
  return docs


def _read_diagnoses(path: Path, issues: common.Issues) -> dict[str, list[tuple[int, str]]]:
  """hadm_id -> [(seq_num, code)] of the valid ICD-10-CM diagnoses."""
  out: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
  seen: set[tuple[str, str]] = set()
  for line, row in read_csv_rows(path, DIAGNOSES_COLUMNS):
    where = f"{path}:{line}"
    hadm, version = (row["hadm_id"] or "").strip(), (row["icd_version"] or "").strip()
    if not hadm.isdigit():
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
      continue
    if version == "9":
      issues.filtered("ICD-9 diagnosis row", where)
      continue
    if version != "10":
      issues.error("unknown icd_version", where, repr(version))
      continue
    seq = (row["seq_num"] or "").strip()
    code = issues.code(row["icd_code"] or "", where)
    if code is None:
      continue
    if (hadm, code) in seen:
      issues.filtered("duplicate diagnosis row", where)
      continue
    seen.add((hadm, code))
    out[hadm].append((int(seq) if seq.isdigit() else 10**9, code))
  return out


def _read_notes(path: Path, codes_by_hadm: dict, issues: common.Issues
                ) -> dict[str, list[tuple[int, str, str, str]]]:
  """hadm_id -> [(note_seq, note_id, text, subject_id)] for admissions that have codes."""
  out: dict[str, list[tuple[int, str, str, str]]] = collections.defaultdict(list)
  for line, row in read_csv_rows(path, NOTES_COLUMNS):
    where = f"{path}:{line}"
    hadm = (row["hadm_id"] or "").strip()
    if not hadm.isdigit():
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
      continue
    if hadm not in codes_by_hadm:
      issues.filtered("discharge note of an admission without ICD-10 diagnoses", where)
      continue
    text = row["text"] or ""
    if not common.check_text(issues, text, where, 'text'):
      continue
    seq = (row["note_seq"] or "").strip()
    out[hadm].append((int(seq) if seq.isdigit() else 10**9, row["note_id"], text,
                      (row["subject_id"] or "").strip()))
  return out


def _drop_rare_codes(docs: list[Document], min_count: int, issues: common.Issues
                     ) -> list[Document]:
  counts = collections.Counter(c for d in docs for c in d.codes)
  rare = {c: n for c, n in counts.items() if n < min_count}
  for code, n in sorted(rare.items()):
    issues.filtered(f"code with fewer than {min_count} occurrences", f"{code} ({n}x)")
  out = []
  for d in docs:
    codes = tuple(c for c in d.codes if c not in rare)
    if not codes:
      issues.filtered(f"admission left without codes by min_code_count={min_count}",
                      f"hadm_id {d.id}")
      continue
    out.append(Document(id=d.id, text=d.text, codes=codes, evidence=d.evidence, split=d.split,
                        source=d.source))
  return out
