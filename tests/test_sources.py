"""Source readers on fixtures in the exact public formats, and on bad input.

The fixtures under ``tests/fixtures/`` are synthetic text written for these tests (no patient
data). Expected records below were worked out by hand from the fixture files: offsets are
character offsets, checked twice, by value and by the phrase they must cover.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from jaxicd.data import sources
from jaxicd.data.records import Document, RecordError, SkipReport, Span
from jaxicd.data.sources import common, jsonl

FIX = Path(__file__).parent / "fixtures"


def _load(source, manual_dir, **kw):
  skips = SkipReport()
  docs = sources.load_documents(source, manual_dir, skips=skips, **kw)
  return {d.id: d for d in docs}, skips


def _ev(doc: Document) -> list[tuple[str, int, int, str]]:
  return [(e.code, e.begin, e.end, doc.quote(e)) for e in doc.evidence]


# --------------------------------------------------------------------------- common


def test_split_names_and_hash_split():
  assert common.canonical_split("dev") == "val"
  assert common.canonical_split(" Train ") == "train"
  assert common.canonical_split("holdout") is None
  keys = [f"subject:{i}" for i in range(20000)]
  first = [common.hash_split(k) for k in keys]
  assert first == [common.hash_split(k) for k in keys]  # deterministic
  frac = collections.Counter(first)
  assert abs(frac["train"] / len(keys) - 0.8) < 0.015
  assert abs(frac["val"] / len(keys) - 0.1) < 0.01
  assert abs(frac["test"] / len(keys) - 0.1) < 0.01


def test_unknown_source_and_missing_manual_dir():
  with pytest.raises(ValueError, match="unknown source 'mimic'"):
    sources.load_documents("mimic", "x")
  with pytest.raises(ValueError, match="needs manual_dir"):
    sources.load_documents("mdace", "")
  with pytest.raises(ValueError, match="on_error"):
    sources.load_documents("jsonl", FIX / "jsonl", on_error="ignore")


def test_input_files_are_the_files_each_reader_reads():
  # What a TFDS cache of the documents is keyed on (tfds_builders.documents_config_name).
  files = lambda source, root, **kw: sorted(
      str(p.relative_to(FIX / root)) for p in sources.input_files(source, FIX / root, **kw))
  assert [p.name for p in sources.input_files("jsonl", FIX / "jsonl")] == ["documents.jsonl"]
  assert files("mimic_iv", "mimic_iv") == [
      "hosp/diagnoses_icd.csv.gz", "mimiciv_icd10_split.csv", "note/discharge.csv.gz"]
  assert files("mdace", "mdace") == [
      "NOTEEVENTS.csv", "data/Inpatient/ICD-10/1.0/100001-ICD-10.json",
      "data/Inpatient/ICD-10/1.0/100002-ICD-10.json", "splits/inpatient/MDace-ev-test.csv",
      "splits/inpatient/MDace-ev-train.csv", "splits/inpatient/MDace-ev-val.csv"]
  assert files("codiesp", "codiesp") == [
      "dev/devD.tsv", "dev/devX.tsv", "dev/text_files/S1130-01082009000300012-1.txt",
      "test/testD.tsv", "test/text_files/S0365-66912004001000011-1.txt",
      "train/text_files/S0004-06142005000100011-1.txt",
      "train/text_files/S0210-48062007000500012-1.txt", "train/trainD.tsv", "train/trainX.tsv"]
  assert sources.input_files("demo") == [] and sources.input_files("codiesp", FIX / "none") == []


# --------------------------------------------------------------------------- MIMIC-IV

NOTE_20000001 = (
    "Name:  ___                 Unit No:   ___\n \nChief Complaint:\nshortness of breath\n \n"
    "History of Present Illness:\n___ with \"acute on chronic diastolic heart failure\", "
    "hypertension.\nDischarge Diagnosis:\nacute on chronic diastolic CHF, AKI, HTN"
    "\n\nAddendum:\nCreatinine improved; acute kidney injury resolving.")


def test_mimic_iv_fixture_with_split_file():
  docs, skips = _load("mimic_iv", FIX / "mimic_iv")
  assert sorted(docs) == ["20000001", "20000003"]
  d1, d3 = docs["20000001"], docs["20000003"]
  # Two discharge notes, joined in note_seq order (the file lists note_seq 2 first).
  assert d1.text == NOTE_20000001
  assert d1.codes == ("I50.23", "N17.9", "I10")
  assert d3.codes == ("J18.9", "E11.9")  # seq_num order, duplicate E119 row dropped
  assert (d1.split, d3.split) == ("train", "val")
  assert d1.evidence == () and d1.source == "mimic_iv"
  diag = f"{FIX / 'mimic_iv/hosp/diagnoses_icd.csv.gz'}"
  assert skips.counts == {
      "filtered: ICD-9 diagnosis row": 2,
      "filtered: duplicate diagnosis row": 1,
      "filtered: discharge note of an admission without ICD-10 diagnoses": 1,
      "filtered: admission without a discharge note": 1,
      "filtered: admission not in the split file": 1,
  }
  assert skips.examples["filtered: ICD-9 diagnosis row"] == [f"{diag}:5", f"{diag}:6"]
  assert skips.examples["filtered: duplicate diagnosis row"] == [f"{diag}:9"]
  # Record start lines count the embedded newlines of the earlier multi-line notes.
  assert skips.examples["filtered: discharge note of an admission without ICD-10 diagnoses"] == [
      f"{FIX / 'mimic_iv/note/discharge.csv.gz'}:13"]


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
  shutil.copytree(src, dst)
  for rel in drop:
    p = dst / rel
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  return dst


def test_mimic_iv_hash_split_plain_csv_and_min_code_count(tmp_path):
  root = _copy(FIX / "mimic_iv", tmp_path / "m", drop=("mimiciv_icd10_split.csv",))
  for rel in ("hosp/diagnoses_icd.csv.gz", "note/discharge.csv.gz"):  # uncompressed copies
    gz = root / rel
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
  docs, skips = _load("mimic_iv", root)
  assert sorted(docs) == ["20000001", "20000003", "20000005"]
  assert docs["20000005"].codes == ("K21.9", "N39.0", "I10")
  again, _ = _load("mimic_iv", root)
  for hadm, d in docs.items():
    assert d.split in common.SPLITS and again[hadm].split == d.split
  assert "filtered: admission not in the split file" not in skips.counts

  # I10 occurs in two admissions, every other code in one.
  docs, skips = _load("mimic_iv", root, min_code_count=2)
  assert {k: d.codes for k, d in docs.items()} == {"20000001": ("I10",), "20000005": ("I10",)}
  assert skips.counts["filtered: code with fewer than 2 occurrences"] == 6
  assert skips.counts["filtered: admission left without codes by min_code_count=2"] == 1
  assert skips.examples["filtered: admission left without codes by min_code_count=2"] == [
      "hadm_id 20000003"]


def test_mimic_iv_split_feather(tmp_path):
  feather = pytest.importorskip("pyarrow.feather")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  path = tmp_path / "edin_split.feather"
  feather.write_feather(pa.table({"_id": [20000001, 20000003, 20000005],
                                  "split": ["test", "train", "val"]}), str(path))
  docs, _ = _load("mimic_iv", FIX / "mimic_iv", split_file=path)
  assert {k: d.split for k, d in docs.items()} == {
      "20000001": "test", "20000003": "train", "20000005": "val"}


DIAG_HEADER = "subject_id,hadm_id,seq_num,icd_code,icd_version\n"
NOTE_HEADER = "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n"
GOOD_NOTE = b'1-DS-1,1,11,DS,1,2180-01-01 00:00:00,2180-01-02 00:00:00,"line one\nline two"\n'


def _mimic_dir(tmp_path: Path, diag_rows: str, note_rows: bytes = b"") -> Path:
  root = tmp_path / "mimic"
  (root / "hosp").mkdir(parents=True)
  (root / "note").mkdir()
  (root / "hosp/diagnoses_icd.csv").write_text(DIAG_HEADER + "1,11,1,I10,10\n" + diag_rows)
  (root / "note/discharge.csv").write_bytes(NOTE_HEADER.encode() + GOOD_NOTE + note_rows)
  return root


MIMIC_BAD = [
    # (diagnoses rows from line 3, notes from line 4, file, line, reason)
    ("2,12,1,Z9999,10\n", b"", "hosp/diagnoses_icd.csv", 3, "unknown ICD-10-CM code"),
    ("2,12,1,ZZ,10\n", b"", "hosp/diagnoses_icd.csv", 3, "malformed ICD-10-CM code"),
    ("2,12,1,I10,11\n", b"", "hosp/diagnoses_icd.csv", 3, "unknown icd_version"),
    ("2,abc,1,I10,10\n", b"", "hosp/diagnoses_icd.csv", 3, "malformed hadm_id"),
    ("2,12,1,I10,10\n", b'2-DS-1,2,12,DS,1,,,"  \n "\n', "note/discharge.csv", 4,
     "empty text"),
    ("2,12,1,I10,10\n", b'2-DS-1,2,12,DS,1,,,"bad \xff byte"\n', "note/discharge.csv", 4,
     "invalid UTF-8"),
]


@pytest.mark.parametrize("diag,notes,file,line,reason", MIMIC_BAD,
                         ids=[c[-1] for c in MIMIC_BAD])
def test_mimic_iv_bad_input(tmp_path, diag, notes, file, line, reason):
  root = _mimic_dir(tmp_path, diag, notes)
  with pytest.raises(RecordError, match=f"{re.escape(str(root / file))}:{line}.*{reason}"):
    sources.load_documents("mimic_iv", root, on_error="raise")
  docs, skips = _load("mimic_iv", root, on_error="skip")
  errors = {k: n for k, n in skips.counts.items() if not k.startswith(common.FILTERED)}
  assert errors == {reason: 1}
  assert skips.examples[reason][0].startswith(f"{root / file}:{line}")
  assert list(docs) == ["11"] and docs["11"].text == "line one\nline two"
  if "code" in reason:
    assert sum(skips.invalid_codes.values()) == 1


def test_mimic_iv_hash_split_keeps_a_patients_admissions_together(tmp_path):
  rows = "".join(f"{h // 4},{100 + h},1,I10,10\n" for h in range(40))  # 10 patients x 4
  notes = "".join(f'{h}-DS-1,{h // 4},{100 + h},DS,1,,,"HTN"\n' for h in range(40)).encode()
  root = _mimic_dir(tmp_path, rows, notes)
  docs, _ = _load("mimic_iv", root)
  by_subject = collections.defaultdict(set)
  for h in range(40):
    by_subject[h // 4].add(docs[str(100 + h)].split)
  assert all(len(s) == 1 for s in by_subject.values())
  assert len(set().union(*by_subject.values())) > 1


def test_mimic_iv_missing_column_and_missing_files(tmp_path):
  root = _mimic_dir(tmp_path, "")
  (root / "hosp/diagnoses_icd.csv").write_text("subject_id,hadm_id,icd_code\n1,11,I10\n")
  with pytest.raises(RecordError, match=r"diagnoses_icd.csv:1: missing column\(s\) seq_num"):
    sources.load_documents("mimic_iv", root, on_error="skip")
  with pytest.raises(common.MissingDataError) as e:
    sources.load_documents("mimic_iv", tmp_path / "empty")
  msg = str(e.value)
  assert "https://physionet.org/content/mimiciv/" in msg
  assert "https://physionet.org/content/mimic-iv-note/" in msg
  assert str(tmp_path / "empty" / "note/discharge.csv.gz") in msg


def test_mimic_iv_utf8_bom_and_empty_file(tmp_path):
  root = _mimic_dir(tmp_path, "")
  diag = root / "hosp/diagnoses_icd.csv"
  diag.write_bytes(b"\xef\xbb\xbf" + diag.read_bytes())  # Excel's "CSV UTF-8"
  docs, skips = _load("mimic_iv", root)
  assert list(docs) == ["11"] and docs["11"].codes == ("I10",)
  diag.write_bytes(b"")
  with pytest.raises(RecordError, match=f"{re.escape(str(diag))}: empty file"):
    sources.load_documents("mimic_iv", root, on_error="skip")


# --------------------------------------------------------------------------- MDACE

MDACE_501 = [("I50.23", 116, 155, "acute on chronic systolic heart failure"),
             ("N17.9", 160, 163, "AKI"),
             ("I50.23", 185, 201, "CHF exacerbation"),
             ("N17.9", 230, 233, "ARF")]


def test_mdace_fixture_with_split_lists():
  docs, skips = _load("mdace", FIX / "mdace")
  assert sorted(docs) == ["100001/501", "100001/502", "100002/601"]
  d = docs["100001/501"]
  assert d.codes == ("I50.23", "N17.9") and d.split == "train" and d.source == "mdace"
  assert _ev(d) == MDACE_501
  assert d.text.startswith("Admission Date:  [**2151-7-16**]")
  assert docs["100001/502"].codes == ("E11.9", "Z79.4")
  assert _ev(docs["100001/502"]) == [("E11.9", 21, 24, "DM2"), ("Z79.4", 26, 36, "on insulin")]
  assert docs["100001/502"].split == "train"
  assert _ev(docs["100002/601"]) == [("J18.9", 21, 49, "Community acquired pneumonia"),
                                     ("J44.9", 75, 79, "COPD")]
  assert docs["100002/601"].split == "val"
  ann = f"{FIX / 'mdace/data/Inpatient/ICD-10/1.0/100001-ICD-10.json'}"
  assert skips.counts == {"filtered: ICD-10-PCS annotation (not ICD-10-CM)": 1,
                          "filtered: duplicate annotation (same code and span)": 1}
  assert skips.examples["filtered: ICD-10-PCS annotation (not ICD-10-CM)"] == [
      f"{ann}: notes[0].annotations[3]"]


def test_mdace_hash_split_and_text_split_lists(tmp_path):
  root = _copy(FIX / "mdace", tmp_path / "mdace", drop=("splits",))
  docs, _ = _load("mdace", root)
  assert len(docs) == 3
  assert docs["100001/501"].split == docs["100001/502"].split  # an admission stays together
  split_dir = tmp_path / "lists"
  split_dir.mkdir()
  (split_dir / "train.txt").write_text("100002\n")
  (split_dir / "dev.txt").write_text("100001\n")
  (split_dir / "test.txt").write_text("")
  docs, _ = _load("mdace", root, split_dir=split_dir)
  assert {k: d.split for k, d in docs.items()} == {
      "100001/501": "val", "100001/502": "val", "100002/601": "train"}


NOTEEVENTS_HEADER = ('"ROW_ID","SUBJECT_ID","HADM_ID","CHARTDATE","CHARTTIME","STORETIME",'
                     '"CATEGORY","DESCRIPTION","CGID","ISERROR","TEXT"\n')
MDACE_TEXT = "Dx:\nsepsis due to E. coli UTI.\n"  # "sepsis" is [4, 10), "UTI" [26, 29)


def _mdace_dir(tmp_path: Path, annotations: list | str | bytes, *, row_id=7, hadm=300,
               text: bytes = MDACE_TEXT.encode()) -> tuple[Path, Path]:
  root = tmp_path / "mdace"
  ann_dir = root / "data/Inpatient/ICD-10/1.0"
  ann_dir.mkdir(parents=True)
  path = ann_dir / "300-ICD-10.json"
  if isinstance(annotations, list):
    body = json.dumps({"hadm_id": 300, "comment": "", "notes": [
        {"note_id": 7, "category": "Discharge summary", "description": "Report",
         "annotations": annotations}]}, indent=1).encode()
  else:
    body = annotations if isinstance(annotations, bytes) else annotations.encode()
  path.write_bytes(body)
  (root / "NOTEEVENTS.csv").write_bytes(
      NOTEEVENTS_HEADER.encode() + f'{row_id},1,{hadm},"2100-01-01","","","Discharge summary",'
      f'"Report","","","'.encode() + text + b'"\n')
  return root, path


def _ann(begin, end, code, **extra):
  return {"begin": begin, "end": end, "code": code, "code_system": "ICD-10-CM",
          "description": "", "type": "Human", **extra}


GOOD_ANN = _ann(26, 29, "N39.0")
MDACE_BAD = [
    # (annotations, where-suffix, reason)
    ([_ann(4, 99, "A41.51"), GOOD_ANN], ": notes[0].annotations[0]",
     "evidence offsets outside text"),
    ([_ann(4, 10, "A41.51", covered_text="sepsis!"), GOOD_ANN], ": notes[0].annotations[0]",
     "evidence quote does not match"),
    ([_ann(4, 10, "A99.99"), GOOD_ANN], ": notes[0].annotations[0]", "unknown ICD-10-CM code"),
    ([{"begin": "4", "end": 10, "code": "A41.51"}, GOOD_ANN], ": notes[0].annotations[0]",
     "malformed MDACE annotation"),
]


@pytest.mark.parametrize("anns,suffix,reason", MDACE_BAD, ids=[c[-1] for c in MDACE_BAD])
def test_mdace_bad_annotations(tmp_path, anns, suffix, reason):
  root, path = _mdace_dir(tmp_path, anns)
  with pytest.raises(RecordError, match=f"{re.escape(str(path) + suffix)}.*{reason}"):
    sources.load_documents("mdace", root)
  docs, skips = _load("mdace", root, on_error="skip")
  [(key, count)] = skips.counts.items()
  assert key.startswith(reason) and count == 1
  assert _ev(docs["300/7"]) == [("N39.0", 26, 29, "UTI")]  # the good annotation survives


def test_mdace_bad_files(tmp_path):
  cases = [
      (dict(annotations='{"hadm_id": 300,\n "notes": [}'), ":2", "malformed JSON"),
      (dict(annotations=b'{"hadm_id": 300, "comment": "\xe9"}'), ":1", "invalid UTF-8"),
      (dict(annotations=[GOOD_ANN], row_id=8), ": notes[0]", "note_id not found in NOTEEVENTS"),
      (dict(annotations=[GOOD_ANN], hadm=301), None, "NOTEEVENTS HADM_ID differs"),
      (dict(annotations=[GOOD_ANN], text=b"  "), None, "empty text"),
  ]
  for i, (kw, suffix, reason) in enumerate(cases):
    root, path = _mdace_dir(tmp_path / str(i), **kw)
    where = f"{path}{suffix}" if suffix else f"{root / 'NOTEEVENTS.csv'}:2"
    with pytest.raises(RecordError, match=f"{re.escape(where)}.*{reason}"):
      sources.load_documents("mdace", root)
    docs, skips = _load("mdace", root, on_error="skip")
    assert docs == {}
    [(key, count)] = skips.counts.items()
    assert key.startswith(reason) and count == 1, skips.counts


def test_mdace_text_errors_bom_and_empty_file(tmp_path):
  body = lambda covered: json.dumps({"hadm_id": 300, "notes": [{"note_id": 7, "annotations": [
      _ann(4, 10, "A41.51", covered_text=covered), GOOD_ANN]}]}, indent=1)
  # A lone surrogate anywhere in the file: named by its field; the file is unusable.
  root, path = _mdace_dir(tmp_path / "s", body("sepsis").replace('"sepsis"', '"\\ud800"'))
  with pytest.raises(RecordError, match=(f"{re.escape(str(path))}: invalid text.*"
                                         r"notes\[0\]\.annotations\[0\]\.covered_text")):
    sources.load_documents("mdace", root)
  docs, skips = _load("mdace", root, on_error="skip")
  assert docs == {} and skips.counts == {"invalid text": 1}
  # Too deeply nested to decode: malformed JSON, skippable.
  root, path = _mdace_dir(tmp_path / "r", '{"hadm_id": 300, "notes": ' + "[" * 100_000)
  with pytest.raises(RecordError, match=f"{re.escape(str(path))}.*malformed JSON"):
    sources.load_documents("mdace", root)
  assert _load("mdace", root, on_error="skip")[1].counts == {"malformed JSON": 1}
  # A UTF-8 BOM is accepted, in the annotations and in the split lists.
  root, path = _mdace_dir(tmp_path / "b", b"\xef\xbb\xbf" + body("sepsis").encode())
  (root / "splits").mkdir()
  (root / "splits/train.txt").write_bytes(b"\xef\xbb\xbf300\n")
  docs, skips = _load("mdace", root)
  assert _ev(docs["300/7"]) == [("A41.51", 4, 10, "sepsis"), ("N39.0", 26, 29, "UTI")]
  assert docs["300/7"].split == "train" and skips.total == 0
  # A 0-byte annotation file.
  root, path = _mdace_dir(tmp_path / "e", b"")
  with pytest.raises(RecordError, match=f"{re.escape(str(path))}: empty file"):
    sources.load_documents("mdace", root)
  assert _load("mdace", root, on_error="skip")[1].counts == {"empty file": 1}


def test_mdace_missing_files(tmp_path):
  with pytest.raises(common.MissingDataError) as e:
    sources.load_documents("mdace", tmp_path)
  msg = str(e.value)
  assert "https://physionet.org/content/mimiciii/1.4/" in msg
  assert "NOTEEVENTS.csv" in msg and "data/Inpatient/ICD-10/1.0" in msg


# --------------------------------------------------------------------------- CodiEsp

CODIESP = {
    "S0004-06142005000100011-1": ("train", ("N50.8", "R50.9", "N45.3", "I10"), [
        ("N50.8", 21, 37, "dolor testicular"), ("R50.9", 40, 46, "fiebre"),
        ("N45.3", 63, 86, "orquiepididimitis aguda"), ("I10", 102, 123, "hipertensión arterial")]),
    # A discontinuous reference "85 91;98 122" gives one Evidence per part.
    "S0210-48062007000500012-1": ("train", ("N18.9", "D63.1"), [
        ("N18.9", 21, 48, "insuficiencia renal crónica"), ("D63.1", 85, 91, "anemia"),
        ("D63.1", 98, 122, "enfermedad renal crónica")]),
    "S1130-01082009000300012-1": ("val", ("I50.9", "E11.65"), [
        ("I50.9", 13, 46, "insuficiencia cardiaca congestiva"),
        ("E11.65", 72, 111, "Diabetes mellitus tipo 2 mal controlada")]),
    "S0365-66912004001000011-1": ("test", ("H10.3",), []),  # a category; D track only
}


def test_codiesp_fixture(tmp_path):
  docs, skips = _load("codiesp", FIX / "codiesp")
  assert {k: (d.split, d.codes, _ev(d)) for k, d in docs.items()} == CODIESP
  assert skips.counts == {"filtered: CodiEsp-X PROCEDIMIENTO row (ICD-10-PCS)": 1}
  assert skips.examples["filtered: CodiEsp-X PROCEDIMIENTO row (ICD-10-PCS)"] == [
      f"{FIX / 'codiesp/train/trainX.tsv'}:6"]
  # The release's own folder name one level down is found too.
  _copy(FIX / "codiesp", tmp_path / "final_dataset_v4_to_publish")
  nested, _ = _load("codiesp", tmp_path)
  assert sorted(nested) == sorted(docs)


ART = "S0001-00000000000000001-1"
ES_TEXT = "Mujer con neumonía y cefalea.\n"  # "neumonía" [10, 18), "cefalea" [21, 28)


def _codiesp_dir(tmp_path: Path, d_rows: str, x_rows: str,
                 text: bytes = ES_TEXT.encode()) -> Path:
  root = tmp_path / "codiesp"
  (root / "train/text_files").mkdir(parents=True)
  (root / "train/text_files" / f"{ART}.txt").write_bytes(text)
  (root / "train/trainD.tsv").write_text(f"{ART}\tj18.9\n{ART}\tr51.9\n" + d_rows)
  (root / "train/trainX.tsv").write_text(
      f"{ART}\tDIAGNOSTICO\tj18.9\tneumonía\t10 18\n" + x_rows)
  return root


CODIESP_BAD = [
    # (D rows from line 3, X rows from line 2, file, line, reason)
    ("", f"{ART}\tDIAGNOSTICO\tr51.9\tcefalea\t21 99\n", "trainX.tsv", 2,
     "evidence offsets outside text"),
    ("", f"{ART}\tDIAGNOSTICO\tr51.9\tdolor\t21 28\n", "trainX.tsv", 2,
     "evidence quote does not match"),
    ("", f"{ART}\tDIAGNOSTICO\tr51.9\tcefalea\t21-28\n", "trainX.tsv", 2, "malformed offsets"),
    ("", f"{ART}\tDIAGNOSTICO\tr51.9\tcefalea\n", "trainX.tsv", 2, "malformed TSV row"),
    ("", f"{ART}\tSINTOMA\tr51.9\tcefalea\t21 28\n", "trainX.tsv", 2, "unknown CodiEsp-X label"),
    ("", f"{ART}\tDIAGNOSTICO\tr50.9\tcefalea\t21 28\n", "trainX.tsv", 2,
     "evidence code not among the document's codes"),
    (f"{ART}\tz99.99\n", "", "trainD.tsv", 3, "unknown ICD-10-CM code"),
    ("S9999\tr51.9\n", "", "trainD.tsv", 3, "articleID without a text file"),
]


@pytest.mark.parametrize("d_rows,x_rows,file,line,reason", CODIESP_BAD,
                         ids=[c[-1] for c in CODIESP_BAD])
def test_codiesp_bad_rows(tmp_path, d_rows, x_rows, file, line, reason):
  root = _codiesp_dir(tmp_path, d_rows, x_rows)
  where = f"{root / 'train' / file}:{line}"
  with pytest.raises(RecordError, match=f"{re.escape(where)}.*{reason}"):
    sources.load_documents("codiesp", root)
  docs, skips = _load("codiesp", root, on_error="skip")
  [(key, count)] = skips.counts.items()
  assert key.startswith(reason) and count == 1
  assert skips.examples[key][0].startswith(where)
  assert docs[ART].codes == ("J18.9", "R51.9")
  assert _ev(docs[ART]) == [("J18.9", 10, 18, "neumonía")]


def test_codiesp_bad_text_file_and_missing(tmp_path):
  root = _codiesp_dir(tmp_path, "", "", text="Mujer con\nneumonía".encode("latin-1"))
  path = root / "train/text_files" / f"{ART}.txt"
  with pytest.raises(RecordError, match=f"{re.escape(str(path))}:2.*invalid UTF-8"):
    sources.load_documents("codiesp", root)
  with pytest.raises(common.MissingDataError, match="zenodo"):
    sources.load_documents("codiesp", tmp_path / "nothing")


def test_codiesp_utf8_bom_and_empty_files(tmp_path):
  root = _codiesp_dir(tmp_path, "", "", text=b"\xef\xbb\xbf" + ES_TEXT.encode())
  for name in ("trainD.tsv", "trainX.tsv"):
    tsv = root / "train" / name
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())
  docs, skips = _load("codiesp", root)
  assert skips.total == 0
  assert docs[ART].text == ES_TEXT and docs[ART].codes == ("J18.9", "R51.9")
  assert _ev(docs[ART]) == [("J18.9", 10, 18, "neumonía")]
  d_tsv = root / "train/trainD.tsv"
  d_tsv.write_bytes(b"")  # without it every article would silently have no codes
  with pytest.raises(RecordError, match=f"{re.escape(str(d_tsv))}: empty file"):
    sources.load_documents("codiesp", root)
  docs, skips = _load("codiesp", root, on_error="skip")
  assert skips.counts == {"empty file": 1}
  assert docs[ART].codes == ("J18.9",)  # as without a D file: codes of the X file


# --------------------------------------------------------------------------- JSONL


def test_jsonl_fixture_documents_and_spans():
  docs, skips = _load("jsonl", FIX / "jsonl")
  assert skips.total == 0
  assert list(docs) == ["note-1", "note-2", "documents.jsonl:4"]  # blank line 3 skipped
  d1 = docs["note-1"]
  assert d1.codes == ("I48.91", "I10") and d1.split == "train" and d1.source == "jsonl"
  # Character (not byte) offsets: "naïve" precedes the evidence.
  assert _ev(d1) == [("I48.91", 49, 68, "atrial fibrillation"), ("I10", 81, 93, "hypertension")]
  assert docs["note-2"].codes == ("R07.9",) and docs["note-2"].split == "val"
  d3 = docs["documents.jsonl:4"]
  assert d3.codes == ("E11.9",) and d3.split == "test"  # codes taken from the evidence
  assert _ev(d3) == [("E11.9", 21, 45, "type 2 diabetes mellitus"), ("E11.9", 47, 50, "DM2")]
  spans = sources.read_spans(FIX / "jsonl/spans.jsonl")
  assert spans == [
      Span("acute on chronic diastolic heart failure", "I50.33", "annotated"),
      Span("no evidence of pneumonia", None, "negative"),
      Span("CHF exacerbation", "I50.23", "paraphrase",
           "Hospital course: CHF exacerbation, diuresed."),
  ]


GOOD_LINE = json.dumps({"id": "a", "text": "Hx: hypertension.", "codes": ["I10"],
                        "evidence": [{"code": "I10", "begin": 4, "end": 16}]})
JSONL_BAD = [
    # (line 2 of the file, reason, skip-mode: remaining evidence count of document "b" or None)
    ('{"id": "b", "text": "x", ', "malformed JSON", None),
    ('["not", "an", "object"]', "malformed JSON", None),
    ('{"id": "b", "text": "  ", "codes": ["I10"]}', "empty text", None),
    ('{"id": "b", "codes": ["I10"]}', "empty text", None),
    ('{"id": "b", "text": "caf\xe9 HTN", "codes": ["I10"]}', "invalid UTF-8", None),
    ('{"id": "b", "text": "HTN", "codes": ["I10"], "split": "holdout"}', "unknown split", None),
    ('{"id": "a", "text": "HTN", "codes": ["I10"]}', "duplicate id", None),
    ('{"id": "b", "text": "HTN", "codes": ["I10"], "evidence": [{"code": "I10", "begin": 0, '
     '"end": 4}]}', "evidence offsets outside text", 0),
    ('{"id": "b", "text": "HTN", "codes": ["I10"], "evidence": [{"code": "I10", "begin": 0, '
     '"end": 3, "quote": "HTM"}]}', "evidence quote does not match", 0),
    ('{"id": "b", "text": "HTN", "codes": ["I10"], "evidence": [{"code": "I10", "begin": 0, '
     '"end": 3, "text": "HTN"}]}', None, 1),
    ('{"id": "b", "text": "HTN", "codes": ["I10", "Q99.99"]}', "unknown ICD-10-CM code", 0),
    ('{"id": "b", "text": "HTN", "codes": ["I10", "hypertension"]}', "malformed ICD-10-CM code",
     0),
    ('{"id": "b", "text": "HTN", "codes": ["I10"], "evidence": [{"code": "E11.9", "begin": 0, '
     '"end": 3}]}', "evidence code not among the document's codes", 0),
    # A lone surrogate decodes from JSON but is no text: it crashed the tokenizer later.
    ('{"id": "b", "text": "HTN \\ud800", "codes": ["I10"]}', "invalid text", None),
    ('{"id": "b", "text": "HTN", "codes": ["I10"], "evidence": [{"code": "I10", "begin": 0, '
     '"end": 3, "quote": "\\udfff"}]}', "invalid text", None),
    ('{"id": "b", "text": "HTN", "\\ud83d": 1}', "invalid text", None),  # even in a key
    ('{"id": "b", "text": "\\ud83d\\ude00 HTN", "codes": ["I10"]}', None, 0),  # a valid pair
    # Nesting deeper than the recursion limit raised RecursionError past on_error="skip".
    ("[" * 100_000 + "]" * 100_000, "malformed JSON", None),
    ('{"id": "b", "text": "HTN", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "malformed JSON",
     None),
]


@pytest.mark.parametrize("line2,reason,evidence_left", JSONL_BAD,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(JSONL_BAD)])
def test_jsonl_bad_documents(tmp_path, line2, reason, evidence_left):
  path = tmp_path / "notes.jsonl"
  data = GOOD_LINE.encode() + b"\n" + (line2.encode("latin-1") if "\xe9" in line2
                                       else line2.encode()) + b"\n"
  path.write_bytes(data)
  if reason is None:  # a control: the well-formed variant loads in raise mode
    docs = jsonl.read_documents(path)
    assert len(docs[1].evidence) == evidence_left
    if evidence_left:
      assert _ev(docs[1]) == [("I10", 0, 3, "HTN")]
    return
  with pytest.raises(RecordError, match=f"{re.escape(str(path))}:2.*{reason}"):
    jsonl.read_documents(path)
  skips = SkipReport()
  docs = {d.id: d for d in jsonl.read_documents(path, on_error="skip", skips=skips)}
  [(key, count)] = skips.counts.items()
  assert key.startswith(reason) and count == 1
  assert skips.examples[key][0].startswith(f"{path}:2")
  assert _ev(docs["a"]) == [("I10", 4, 16, "hypertension")]
  if evidence_left is None:
    assert "b" not in docs  # the whole line is unusable
  else:
    assert docs["b"].codes == ("I10",) and len(docs["b"].evidence) == evidence_left


def test_jsonl_bad_spans(tmp_path):
  path = tmp_path / "spans.jsonl"
  path.write_text("\n".join([
      '{"text": "CHF", "code": "I50.9"}',
      '{"text": "CHF", "code": "I50.9", "origin": "made up"}',
      '{"text": "", "code": "I50.9"}',
      '{"text": "CHF", "code": "X00.00"}',
      '{"text": "no CHF", "code": null, "origin": "description"}',
  ]) + "\n")
  with pytest.raises(RecordError, match=f"{re.escape(str(path))}:2.*unknown span origin"):
    sources.read_spans(path)
  skips = SkipReport()
  spans = sources.read_spans(path, on_error="skip", skips=skips)
  assert spans == [Span("CHF", "I50.9", "annotated")]
  assert skips.counts == {"bad span": 2, "empty text": 1, "unknown ICD-10-CM code": 1}
  assert skips.invalid_codes == {"X00.00": 1}
  assert [w.split(" ")[0] for w in skips.examples["bad span"]] == [f"{path}:2", f"{path}:5"]


def test_jsonl_lone_surrogate_in_a_span_is_invalid_text(tmp_path):
  path = tmp_path / "spans.jsonl"
  path.write_text('{"text": "CHF", "code": "I50.9"}\n{"text": "CHF \\udc80", "code": "I50.9"}\n')
  with pytest.raises(RecordError, match=f"{re.escape(str(path))}:2: invalid text.*'text'"):
    sources.read_spans(path)
  skips = SkipReport()
  assert sources.read_spans(path, on_error="skip", skips=skips) == [
      Span("CHF", "I50.9", "annotated")]
  assert skips.counts == {"invalid text": 1}


BOM = b"\xef\xbb\xbf"


def test_jsonl_utf8_bom_keeps_the_first_record(tmp_path):
  path = tmp_path / "notes.jsonl"
  second = GOOD_LINE.replace('"id": "a"', '"id": "b"')
  path.write_bytes(BOM + GOOD_LINE.encode() + b"\n" + second.encode() + b"\n")
  docs = jsonl.read_documents(path)  # raise mode: the BOM is no malformed JSON
  assert [d.id for d in docs] == ["a", "b"]
  assert _ev(docs[0]) == [("I10", 4, 16, "hypertension")]  # offsets unmoved by the BOM
  spans = tmp_path / "spans.jsonl"
  spans.write_bytes(BOM + b'{"text": "CHF", "code": "I50.9"}\n')
  assert sources.read_spans(spans) == [Span("CHF", "I50.9", "annotated")]


def test_jsonl_empty_file_is_reported(tmp_path):
  (tmp_path / "a.jsonl").write_text(GOOD_LINE + "\n")
  empty = tmp_path / "b.jsonl"
  empty.write_bytes(b"")
  with pytest.raises(RecordError, match=f"{re.escape(str(empty))}: empty file"):
    sources.load_documents("jsonl", tmp_path)
  with pytest.raises(RecordError, match=f"{re.escape(str(empty))}: empty file"):
    jsonl.read_documents(empty)
  docs, skips = _load("jsonl", tmp_path, on_error="skip")
  assert list(docs) == ["a"] and skips.counts == {"empty file": 1}
  assert skips.examples["empty file"] == [str(empty)]
  # Only blank lines: no records either.
  empty.write_text("\n  \n")
  with pytest.raises(RecordError, match=f"{re.escape(str(empty))}: empty file.*no records"):
    jsonl.read_documents(empty)
  spans = tmp_path / "spans.jsonl"
  spans.write_bytes(b"")
  with pytest.raises(RecordError, match=f"{re.escape(str(spans))}: empty file"):
    sources.read_spans(spans)


def test_jsonl_single_file_and_duplicates_across_files(tmp_path):
  docs = sources.load_documents("jsonl", FIX / "jsonl/documents.jsonl")
  assert [d.id for d in docs] == ["note-1", "note-2", "documents.jsonl:4"]
  (tmp_path / "a.jsonl").write_text(GOOD_LINE + "\n")
  (tmp_path / "b.jsonl").write_text(GOOD_LINE + "\n")
  (tmp_path / "spans.jsonl").write_text("this is not read as documents\n")
  with pytest.raises(RecordError, match="b.jsonl.*duplicate id"):
    sources.load_documents("jsonl", tmp_path)
  with pytest.raises(FileNotFoundError, match="no documents"):
    sources.load_documents("jsonl", tmp_path / "none")


# --------------------------------------------------------------------------- demo


def test_demo_delegates_to_demo_corpus():
  demo = pytest.importorskip("jaxicd.data.demo")
  docs = sources.load_documents("demo", demo_seed=3)
  assert docs == list(demo.demo_corpus(seed=3).documents)
  assert {d.split for d in docs} <= set(common.SPLITS)
