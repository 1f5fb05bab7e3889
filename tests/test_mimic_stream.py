"""MIMIC-IV read as a stream: the same documents and reports as reading it whole, no texts held.

``_whole`` is the reader as it was before streaming (every admission's text in a dict), kept
here as the reference: on the fixture and on seeded synthetic inputs (notes out of order,
several notes per admission, ICD-9 and duplicate rows, malformed rows in skip mode, a split
file, ``min_code_count``) the stream must give equal documents, in equal order, and equal
counts and examples of what it skipped or filtered.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import random
import shutil
import tracemalloc
import types
from pathlib import Path

import pytest

from jaxicd.data import sources
from jaxicd.data import tfds_builders as tb
from jaxicd.data.records import Document, RecordError, SkipReport
from jaxicd.data.sources import common, mimic_iv

FIX = Path(__file__).parent / "fixtures" / "mimic_iv"
CODES = ("I10", "E119", "J189", "N179", "I5023", "K219", "N390", "E785", "Z7901", "F329")


class _Codes:
  """A small code space, so that no test here loads the whole ontology."""

  def is_valid(self, code: str) -> bool:
    return code.replace(".", "") in CODES


def _whole(manual_dir: Path, issues: common.Issues, split_file=None, min_code_count=0):
  """The reader before streaming: all texts in memory, documents in hadm_id order."""
  diagnoses = mimic_iv._locate(manual_dir, mimic_iv.DIAGNOSES)  # pylint: disable=protected-access
  notes = mimic_iv._locate(manual_dir, mimic_iv.NOTES)  # pylint: disable=protected-access
  split_file = split_file or common.first_existing(
      *(manual_dir / n for n in mimic_iv.SPLIT_FILES))
  splits = mimic_iv.read_split_file(Path(split_file), issues) if split_file else None
  codes_by_hadm, seen = collections.defaultdict(list), set()
  for line, row in mimic_iv.read_csv_rows(diagnoses, mimic_iv.DIAGNOSES_COLUMNS):
    where, hadm, version = f"{diagnoses}:{line}", row["hadm_id"].strip(), row["icd_version"]
    if not hadm.isdigit():
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
    elif version == "9":
      issues.filtered("ICD-9 diagnosis row", where)
    elif version != "10":
      issues.error("unknown icd_version", where, repr(version))
    elif (code := issues.code(row["icd_code"], where)) is None:
      pass
    elif (hadm, code) in seen:
      issues.filtered("duplicate diagnosis row", where)
    else:
      seen.add((hadm, code))
      seq = row["seq_num"].strip()
      codes_by_hadm[hadm].append((int(seq) if seq.isdigit() else 10**9, code))
  texts = collections.defaultdict(list)
  for line, row in mimic_iv.read_csv_rows(notes, mimic_iv.NOTES_COLUMNS):
    where, hadm = f"{notes}:{line}", row["hadm_id"].strip()
    if not hadm.isdigit():
      issues.error("malformed hadm_id", where, repr(row["hadm_id"]))
    elif hadm not in codes_by_hadm:
      issues.filtered("discharge note of an admission without ICD-10 diagnoses", where)
    elif common.check_text(issues, row["text"], where, "text"):
      seq = row["note_seq"].strip()
      texts[hadm].append((int(seq) if seq.isdigit() else 10**9, row["note_id"], row["text"],
                          row["subject_id"].strip()))
  docs = []
  for hadm in sorted(codes_by_hadm, key=int):
    if hadm not in texts:
      issues.filtered("admission without a discharge note", f"{diagnoses}: hadm_id {hadm}")
      continue
    parts = sorted(texts[hadm])
    if splits is None:
      split = common.hash_split(f"subject:{parts[0][3]}" if parts[0][3] else f"hadm:{hadm}")
    elif hadm in splits:
      split = splits[hadm]
    else:
      issues.filtered("admission not in the split file", f"{split_file}: hadm_id {hadm}")
      continue
    codes = [c for _, c in sorted(codes_by_hadm[hadm], key=lambda sc: sc[0])]
    docs.append(Document(hadm, "\n\n".join(p[2] for p in parts), common.dedupe(codes), (),
                         split, "mimic_iv"))
  if min_code_count > 1:
    counts = collections.Counter(c for d in docs for c in d.codes)
    rare = {c: n for c, n in counts.items() if n < min_code_count}
    for code, n in sorted(rare.items()):
      issues.filtered(f"code with fewer than {min_code_count} occurrences", f"{code} ({n}x)")
    kept = []
    for d in docs:
      left = tuple(c for c in d.codes if c not in rare)
      if not left:
        issues.filtered(f"admission left without codes by min_code_count={min_code_count}",
                        f"hadm_id {d.id}")
      else:
        kept.append(Document(d.id, d.text, left, (), d.split, d.source))
    docs = kept
  return docs


def _both(root: Path, on_error="raise", **options):
  """(streamed documents, their report), (reference documents, its report)."""
  skips, ref_skips = SkipReport(), SkipReport()
  with sources.open_documents("mimic_iv", root, on_error=on_error, skips=skips,
                              ontology=_Codes(), **options) as stream:
    by_split = {s: list(stream.documents(s)) for s in stream.counts}
    streamed = list(stream.documents())
  assert {s: len(d) for s, d in by_split.items()} == stream.counts
  for split, docs in by_split.items():  # a split's documents: the stream's, in its order
    assert docs == [d for d in streamed if d.split == split]
  ref = _whole(root, common.Issues(on_error, ref_skips, _Codes()), **options)
  return (streamed, skips), (ref, ref_skips)


def _same(root: Path, on_error="raise", **options) -> list[Document]:
  (docs, skips), (ref, ref_skips) = _both(root, on_error, **options)
  assert docs == ref
  assert skips.counts == ref_skips.counts
  assert skips.examples == ref_skips.examples
  assert skips.invalid_codes == ref_skips.invalid_codes
  return docs


def test_fixture_equals_the_whole_reader(tmp_path):
  docs = _same(FIX)
  assert [d.id for d in docs] == ["20000001", "20000003"]
  _same(FIX, min_code_count=2)
  root = shutil.copytree(FIX, tmp_path / "m")
  (root / "mimiciv_icd10_split.csv").unlink()  # hash split
  assert [d.id for d in _same(root)] == ["20000001", "20000003", "20000005"]
  _same(root, min_code_count=2)


def _csv(rows: list[list[str]]) -> str:
  out = io.StringIO()
  csv.writer(out, lineterminator="\n").writerows(rows)
  return out.getvalue()


def _synthetic(root: Path, seed: int, admissions: int = 300, *, bad: bool = False,
               text_chars: int = 60, split_file: bool = True) -> Path:
  """A MIMIC-IV-shaped folder: notes in subject order (not hadm_id order), 1-3 notes per
  admission, ICD-9 admissions, duplicate rows, admissions without notes and the reverse."""
  rng = random.Random(seed)
  (root / "hosp").mkdir(parents=True)
  (root / "note").mkdir()
  hadms = rng.sample(range(20_000_000, 30_000_000), admissions)
  diag = [list(mimic_iv.DIAGNOSES_COLUMNS)]
  notes = [["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
            "storetime", "text"]]
  split = [["hadm_id", "split"]]
  for k, hadm in enumerate(hadms):
    subject = 10_000_000 + k // 3
    icd9 = rng.random() < 0.4
    for seq in rng.sample(range(1, 15), rng.randint(1, 6)):
      code = str(rng.randint(2000, 9999)) if icd9 else rng.choice(CODES)
      diag.append([subject, hadm, seq, code, 9 if icd9 else 10])
      if rng.random() < 0.05:
        diag.append(diag[-1])
    if rng.random() < 0.1:
      continue  # an admission without a discharge note
    for seq in rng.sample(range(1, 4), rng.randint(1, 3) if rng.random() < 0.2 else 1):
      words = [rng.choice(("pt", "HTN", "CHF", "\"quoted\"", "a,b", "line\nbreak", "AKI"))
               for _ in range(text_chars // 5)]
      notes.append([f"{subject}-DS-{seq}", subject, hadm, "DS", seq, "", "", " ".join(words)])
    if rng.random() < 0.9:
      split.append([hadm, rng.choice(("train", "train", "train", "val", "test"))])
  notes.append(["1-DS-1", 1, 19_999_999, "DS", 1, "", "", "no diagnoses"])
  notes[1:] = sorted(notes[1:], key=lambda r: (r[1], r[4]))  # the release's subject order
  diag[1:] = sorted(diag[1:], key=lambda r: (r[0], r[1]))
  if bad:
    diag.insert(7, ["5", "12a", "1", "I10", "10"])
    diag.insert(9, ["5", "13", "1", "Q999", "10"])
    notes.insert(3, ["x", "5", "", "DS", "1", "", "", "text"])
    icd10 = next(r[1] for r in diag[1:] if r[4] == 10)
    notes.insert(5, ["y", "5", str(icd10), "DS", "1", "", "", "   "])
  (root / "hosp/diagnoses_icd.csv").write_text(_csv(diag))
  (root / "note/discharge.csv.gz").write_bytes(gzip.compress(_csv(notes).encode()))
  if split_file:
    (root / "mimiciv_icd10_split.csv").write_text(_csv(split))
  return root


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_input_equals_the_whole_reader(tmp_path, seed):
  root = _synthetic(tmp_path / "a", seed)
  docs = _same(root)
  assert len(docs) > 100 and any("\n\n" in d.text for d in docs)
  _same(root, min_code_count=30)
  _same(_synthetic(tmp_path / "b", seed, split_file=False), min_code_count=20)
  bad = _synthetic(tmp_path / "c", seed, bad=True)
  (docs, skips), _ = _both(bad, on_error="skip")
  assert {k: v for k, v in skips.counts.items() if not k.startswith(common.FILTERED)} == {
      "malformed hadm_id": 2, "unknown ICD-10-CM code": 1, "empty text": 1}
  _same(bad, on_error="skip")
  with pytest.raises(RecordError, match=r"diagnoses_icd\.csv:8: malformed hadm_id"):
    sources.open_documents("mimic_iv", bad, ontology=_Codes())


def test_icd9_rows_are_filtered_and_malformed_rows_named(tmp_path):
  root = _synthetic(tmp_path / "m", 2, bad=True)
  skips = SkipReport()
  with sources.open_documents("mimic_iv", root, on_error="skip", skips=skips,
                              ontology=_Codes()) as stream:
    docs = list(stream.documents())
  assert skips.counts["filtered: ICD-9 diagnosis row"] > 100
  assert all(c.replace(".", "") in CODES for d in docs for c in d.codes)
  diag, notes = root / "hosp/diagnoses_icd.csv", root / "note/discharge.csv.gz"
  assert skips.examples["malformed hadm_id"][0] == f"{diag}:8"
  assert skips.examples["unknown ICD-10-CM code"] == [f"{diag}:10 ('Q99.9')"]
  assert skips.examples["malformed hadm_id"][1].startswith(f"{notes}:")
  assert skips.examples["empty text"][0].startswith(f"{notes}:")


def test_the_stream_holds_no_texts(tmp_path):
  """20k notes (~50 MB of text): the stream is a generator, and reading every document
  allocates a small fraction of the text at any time."""
  root = tmp_path / "m"
  (root / "hosp").mkdir(parents=True)
  (root / "note").mkdir()
  n, filler = 20_000, ("Hospital course unremarkable; HTN controlled. " * 55)[:2500]
  with open(root / "hosp/diagnoses_icd.csv", "w", encoding="utf-8") as f:
    f.write(",".join(mimic_iv.DIAGNOSES_COLUMNS) + "\n")
    f.writelines(f"{h},{20_000_000 + h},1,I10,10\n{h},{20_000_000 + h},2,4019,9\n"
                 for h in range(n))
  with open(root / "note/discharge.csv", "w", encoding="utf-8") as f:
    f.write("note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n")
    f.writelines(f"{h}-DS-1,{h},{20_000_000 + h},DS,1,,,Note {h}. {filler}\n" for h in range(n))
  text_bytes = n * len(filler)
  tracemalloc.start()
  try:
    with sources.open_documents("mimic_iv", root, ontology=_Codes()) as stream:
      docs = stream.documents("train")
      assert isinstance(docs, types.GeneratorType)
      count = chars = 0
      for split in stream.counts:
        for d in stream.documents(split):
          count, chars = count + 1, chars + len(d.text)
      _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert count == n and chars >= text_bytes
  assert peak < text_bytes / 5, f"peak {peak / 1e6:.1f} MB for {text_bytes / 1e6:.0f} MB of text"


@pytest.mark.parametrize("per_shard", [1000, 7])
def test_tfds_build_streams_the_same_documents(tmp_path, monkeypatch, per_shard):
  """The built splits hold the reader's documents in its order, written shard by shard."""
  monkeypatch.setattr(tb, "DOCUMENTS_PER_SHARD", per_shard)
  root = _synthetic(tmp_path / "m", 3, text_chars=400)
  direct = sources.load_documents("mimic_iv", root)
  builder = tb.JaxicdDocuments(source="mimic_iv", manual_dir=str(root),
                               data_dir=str(tmp_path / "tfds"))
  tb.prepare(builder, str(root))
  for split in ("train", "val", "test"):
    expected = [d for d in direct if d.split == split]
    assert tb.read_documents(builder, split) == expected
    shards = builder.info.splits[split].shard_lengths
    assert sum(shards) == len(expected) and len(shards) == -(-len(expected) // per_shard)
  assert builder.info.metadata["documents"] == dict(collections.Counter(d.split for d in direct))
  assert builder.info.metadata["skips"]["by_reason"]["filtered: ICD-9 diagnosis row"] > 100
  assert getattr(builder, "_stream") is None  # closed, its temporary file with it


def test_stream_ranges():
  with sources.open_documents("mimic_iv", FIX, ontology=_Codes()) as stream:
    train = list(stream.documents("train"))
    assert list(stream.documents("train", start=0, stop=1)) == train[:1]
    assert list(stream.documents("train", start=1)) == []
    assert list(stream.documents("test")) == []  # a split without documents
    every = list(stream.documents())
    assert [d.id for d in stream.documents(start=1)] == [d.id for d in every[1:]]
