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

Plain ``.csv`` files are read too. One ``Document`` per admission (``id`` = hadm_id in decimal),
in hadm_id order; when an admission has several discharge notes they are joined in ``note_seq``
order (then ``note_id``, then file order) with a blank line. ``min_code_count`` drops codes with
fewer occurrences (counted over all admissions read, i.e. all splits, as Edin et al. do with 10)
and then admissions left without codes; both are counted as filtered.

Memory stays bounded at full scale (~5M diagnosis rows, ~330k discharge notes, ~1.5 GB of text
in ICD-10 admissions): `open_documents` reads the diagnoses into compact arrays (codes per
admission), then streams the discharge notes once, writing the text of each note it keeps to an
unnamed temporary file (in ``$TMPDIR``; deleted when the stream closes, or the process ends)
and keeping only its offset. The documents are then yielded one at a time, per split, read back
from that file. Every skipped or filtered record is known once the stream is open; duplicate
diagnosis rows are counted after the whole diagnoses file has been read.
"""

from __future__ import annotations

import array
import csv
import gzip
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

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

NO_SEQ = 10**9  # the place of a row without a usable seq_num / note_seq: last
_ID_DIGITS = 18  # hadm_id is read as a 64-bit integer

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
    try:  # pyarrow is optional: only Edin's .feather split file needs it
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
    hadm, split = parse_id(row["hadm_id"]), common.canonical_split(row["split"])
    where = f"{path}:{line}"
    if hadm is None:
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
    elif split is None:
      issues.error("unknown split", where, f"{row['split']!r}")
    else:
      splits[str(hadm)] = split
  return splits


def parse_id(raw: str | None) -> int | None:
  """A hadm_id / subject_id field as an integer; None unless it is 1-18 ASCII digits."""
  s = (raw or "").strip()
  return int(s) if s.isascii() and s.isdigit() and len(s) <= _ID_DIGITS else None


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
  """All documents, in hadm_id order (see `open_documents`, which holds no texts)."""
  with open_documents(manual_dir, issues=issues, split_file=split_file,
                      min_code_count=min_code_count) as stream:
    return list(stream.documents())


def open_documents(manual_dir: str | Path, *, issues: common.Issues,
                   split_file: str | Path | None = None,
                   min_code_count: int = 0) -> "MimicStream":
  """Reads the diagnoses and streams the notes once; the documents are then yielded by
  ``stream.documents(split)`` without holding their texts (see the module docstring)."""
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
  splits = ({int(h): s for h, s in read_split_file(Path(split_file), issues).items()}
            if split_file else None)
  stream = MimicStream()
  try:
    t0 = time.perf_counter()
    codes = _read_diagnoses(diagnoses, issues)
    t1 = time.perf_counter()
    kept = _read_notes(notes, codes, issues, stream.spill)
    t2 = time.perf_counter()
    stream.index(codes, kept, splits, min_code_count, issues,
                 diagnoses=diagnoses, split_file=split_file)
    stream.stats.update(diagnoses_s=round(t1 - t0, 2), notes_s=round(t2 - t1, 2),
                        index_s=round(time.perf_counter() - t2, 2),
                        diagnosis_rows=codes.rows, admissions_with_codes=len(codes.hadms),
                        notes_kept=len(kept))
  except BaseException:
    stream.close()
    raise
  return stream


class _Codes:
  """The valid ICD-10-CM diagnoses: admissions in hadm_id order, each with its codes in seq_num
  order (``codes[offsets[i]:offsets[i + 1]]``, ids into ``names``)."""

  def __init__(self, hadms: np.ndarray, offsets: np.ndarray, codes: np.ndarray,
               names: list[str], rows: int):
    self.hadms, self.offsets, self.codes, self.names, self.rows = (hadms, offsets, codes, names,
                                                                   rows)


def _read_diagnoses(path: Path, issues: common.Issues) -> _Codes:
  hadms, seqs, lines, codes = array.array("q"), array.array("q"), array.array("q"), array.array("q")
  ids: dict[str, int] = {}
  rows = 0
  for line, row in read_csv_rows(path, DIAGNOSES_COLUMNS):
    rows += 1
    hadm, version = parse_id(row["hadm_id"]), (row["icd_version"] or "").strip()
    if hadm is None:
      issues.error("malformed hadm_id", f"{path}:{line}", repr(row["hadm_id"]))
      continue
    if version == "9":
      issues.filtered("ICD-9 diagnosis row", f"{path}:{line}")
      continue
    if version != "10":
      issues.error("unknown icd_version", f"{path}:{line}", repr(version))
      continue
    code = issues.code(row["icd_code"] or "", f"{path}:{line}")
    if code is None:
      continue
    seq = (row["seq_num"] or "").strip()
    hadms.append(hadm)
    seqs.append(int(seq) if seq.isascii() and seq.isdigit() and len(seq) < 10 else NO_SEQ)
    lines.append(line)
    codes.append(ids.setdefault(code, len(ids)))
  h, seq, ln = (np.frombuffer(a, np.int64) if a else np.zeros(0, np.int64)
                for a in (hadms, seqs, lines))
  c = np.asarray(codes, np.int64)
  del hadms, seqs, lines, codes
  # A code repeated in an admission: the first row (in file order) stays.
  order = np.lexsort((ln, c, h))
  dup = np.zeros(len(order), bool)
  dup[1:] = (h[order][1:] == h[order][:-1]) & (c[order][1:] == c[order][:-1])
  for line in np.sort(ln[order[dup]]):
    issues.filtered("duplicate diagnosis row", f"{path}:{line}")
  keep = order[~dup]
  keep = keep[np.lexsort((ln[keep], seq[keep], h[keep]))]
  hadm_sorted = h[keep]
  uniq, starts = np.unique(hadm_sorted, return_index=True)
  names = [""] * len(ids)
  for code, i in ids.items():
    names[i] = code
  return _Codes(uniq, np.append(starts, len(keep)).astype(np.int64), c[keep].astype(np.int32),
                names, rows)


class _Notes:
  """The kept notes, sorted by (admission, note_seq, note_id, line): the admission (index into
  ``_Codes.hadms``), where the text lies in the spill file, and the subject_id as written."""

  def __init__(self, admission, seq, offset, length, note_ids: list[str], subjects: list[str]):
    adm, seq = np.asarray(admission, np.int64), np.asarray(seq, np.int64)
    order = np.lexsort((seq, adm))  # stable: file order within equal keys
    same = (adm[order][1:] == adm[order][:-1]) & (seq[order][1:] == seq[order][:-1])
    for start, end in _runs(same):  # notes sharing an admission and a note_seq: by note_id
      order[start:end] = sorted(order[start:end].tolist(), key=lambda k: (note_ids[k], k))
    self.admission, self.offset = adm[order], np.asarray(offset, np.int64)[order]
    self.length = np.asarray(length, np.int64)[order]
    self.subjects = [subjects[k] for k in order.tolist()]

  def __len__(self) -> int:
    return len(self.admission)


def _runs(same: np.ndarray) -> Iterator[tuple[int, int]]:
  """[start, end) of each run of >= 2 items where ``same[k]`` says item k+1 equals item k."""
  edges = np.diff(np.concatenate(([0], same.astype(np.int8), [0])))
  for start, end in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
    yield start, end + 1


def _read_notes(path: Path, codes: _Codes, issues: common.Issues, spill) -> _Notes:
  """Streams the notes once; the text of each note of an admission with codes goes to
  ``spill`` (a binary file), the rest of what is kept of it to compact arrays."""
  admission, seqs = array.array("q"), array.array("q")
  offsets, lengths = array.array("q"), array.array("q")
  note_ids: list[str] = []
  subjects: list[str] = []
  offset, hadms = 0, codes.hadms
  for line, row in read_csv_rows(path, NOTES_COLUMNS):
    where = f"{path}:{line}"
    hadm = parse_id(row["hadm_id"])
    if hadm is None:
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
      continue
    i = int(np.searchsorted(hadms, hadm))
    if i == len(hadms) or hadms[i] != hadm:
      issues.filtered("discharge note of an admission without ICD-10 diagnoses", where)
      continue
    text = row["text"] or ""
    if not common.check_text(issues, text, where, "text"):
      continue
    data = text.encode("utf-8")
    seq = (row["note_seq"] or "").strip()
    admission.append(i)
    seqs.append(int(seq) if seq.isascii() and seq.isdigit() and len(seq) < 10 else NO_SEQ)
    offsets.append(offset)
    lengths.append(len(data))
    note_ids.append(row["note_id"] or "")
    subjects.append((row["subject_id"] or "").strip())
    try:
      spill.write(data)
    except OSError as e:  # e.g. a full disk
      raise OSError(f"{where}: writing the note text to a temporary file in "
                    f"{tempfile.gettempdir()} failed ({e}); point TMPDIR to a folder with room "
                    "for the discharge text of the ICD-10 admissions (~1.5 GB for MIMIC-IV)"
                    ) from e
    offset += len(data)
  spill.flush()
  return _Notes(admission, seqs, offsets, lengths, note_ids, subjects)


class MimicStream(common.DocumentStream):
  """MIMIC-IV documents read back one at a time from the notes' spill file."""

  def __init__(self):
    self.spill = tempfile.TemporaryFile(prefix="jaxicd-mimic-iv-")  # pylint: disable=consider-using-with
    self.counts: dict[str, int] = {}
    self.stats: dict[str, float | int] = {}
    self._names: list[str] = []

  def index(self, codes: _Codes, notes: _Notes, splits: dict[int, str] | None,
            min_code_count: int, issues: common.Issues, *, diagnoses: Path,
            split_file: str | Path | None) -> None:
    """Decides each document (split, codes, notes) and counts what it leaves out."""
    split_names = list(common.SPLITS)
    adms = np.arange(len(codes.hadms))
    firsts = np.searchsorted(notes.admission, adms, "left").tolist()
    ends = np.searchsorted(notes.admission, adms, "right").tolist()
    docs = array.array("q")  # (admission, split, first note, end note) per document
    for i, hadm in enumerate(codes.hadms.tolist()):
      first, end = firsts[i], ends[i]
      if first == end:
        issues.filtered("admission without a discharge note", f"{diagnoses}: hadm_id {hadm}")
        continue
      if splits is None:
        subject = notes.subjects[first]
        split = common.hash_split(f"subject:{subject}" if subject else f"hadm:{hadm}")
      elif hadm in splits:
        split = splits[hadm]
      else:
        issues.filtered("admission not in the split file", f"{split_file}: hadm_id {hadm}")
        continue
      if split not in split_names:
        split_names.append(split)
      docs.extend((i, split_names.index(split), first, end))
    self._docs = np.frombuffer(docs, np.int64).reshape(-1, 4) if docs else np.zeros((0, 4),
                                                                                   np.int64)
    self._rare = np.zeros(len(codes.names), bool)
    if min_code_count > 1:
      self._docs, self._rare = _drop_rare_codes(self._docs, codes, min_code_count, issues)
    self._codes, self._names = codes, split_names
    self._offsets, self._lengths = notes.offset, notes.length
    for s in self._docs[:, 1].tolist():
      self.counts[split_names[s]] = self.counts.get(split_names[s], 0) + 1
    self.stats.update(documents=len(self._docs), spill_bytes=int(notes.length.sum()))

  def documents(self, split: str | None = None, *, start: int = 0,
                stop: int | None = None) -> Iterator[Document]:
    if split is None:
      rows = np.arange(len(self._docs))
    elif split in self.counts:
      rows = np.flatnonzero(self._docs[:, 1] == self._names.index(split))
    else:
      rows = np.zeros(0, np.int64)
    return self._documents(rows[start:stop])

  def _documents(self, rows: np.ndarray) -> Iterator[Document]:
    codes, fd = self._codes, self.spill.fileno()
    for i, s, first, end in self._docs[rows].tolist():
      parts = [os.pread(fd, length, offset).decode("utf-8")
               for offset, length in zip(self._offsets[first:end].tolist(),
                                         self._lengths[first:end].tolist())]
      ids = codes.codes[codes.offsets[i]:codes.offsets[i + 1]].tolist()
      hadm = str(int(codes.hadms[i]))
      doc = Document(id=hadm, text="\n\n".join(parts),
                     codes=tuple(codes.names[c] for c in ids if not self._rare[c]),
                     split=self._names[s], source=SOURCE)
      doc.validate(f"{SOURCE}: hadm_id {hadm}")
      yield doc

  def close(self) -> None:
    self.spill.close()


def _drop_rare_codes(docs: np.ndarray, codes: _Codes, min_count: int, issues: common.Issues
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Leaves out codes with fewer than ``min_count`` occurrences among ``docs``, then the
  documents left without codes; returns the documents kept and the rare codes' mask."""
  per_doc = [codes.codes[codes.offsets[i]:codes.offsets[i + 1]] for i in docs[:, 0].tolist()]
  counts = np.bincount(np.concatenate(per_doc) if per_doc else np.zeros(0, np.int64),
                       minlength=len(codes.names))
  rare = (counts > 0) & (counts < min_count)
  for name, n in sorted((codes.names[c], int(counts[c])) for c in np.flatnonzero(rare)):
    issues.filtered(f"code with fewer than {min_count} occurrences", f"{name} ({n}x)")
  keep = np.ones(len(docs), bool)
  for k, ids in enumerate(per_doc):
    if rare[ids].all():
      keep[k] = False
      issues.filtered(f"admission left without codes by min_code_count={min_count}",
                      f"hadm_id {int(codes.hadms[docs[k, 0]])}")
  return docs[keep], rare
