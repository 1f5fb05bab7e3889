"""TFDS builders: build to array_record, read back without TensorFlow, equal records."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jaxicd.data import demo, pipeline
from jaxicd.data import tfds_builders as tb
from jaxicd.train.config import base_config
from jaxicd.data.records import Document, Evidence, RecordError, Span

FIXTURE_JSONL = "tests/fixtures/jsonl/documents.jsonl"

DOCS = [
    Document("a-1", "Pt with CHF exacerbation. Naïve to β-blockers. Hx: HTN.",
             ("I50.9", "I10"), (Evidence("I50.9", 8, 11), Evidence("I10", 51, 54)), "train",
             "unit"),
    Document("a-2", "No acute findings.\nDischarged home.", (), (), "val", "unit"),
    Document("a-3", "Chest pain, ruled out MI.", ("R07.9",), (), "test", "unit"),
    Document("a-4", "T2DM on metformin; A1c 7.1.", ("E11.9",), (Evidence("E11.9", 0, 4),),
             "train", "unit"),
]
SPANS = [Span("CHF", "I50.9", "index"), Span("no history of diabetes", None, "negative"),
         Span("essential hypertension", "I10", "description", context="PMH")]


def test_documents_and_spans_round_trip(tmp_path):
  docs = tb.JaxicdDocuments(source="demo", demo_seed=3, data_dir=str(tmp_path),
                            loader=lambda: DOCS)
  tb.prepare(docs)
  assert set(docs.info.splits.keys()) == {"train", "val", "test"}
  back = tb.read_documents(docs)
  assert sorted(back, key=lambda d: d.id) == DOCS
  assert tb.read_documents(docs, "val") == [DOCS[1]]
  # The source is random access (what grain reads).
  train = tb.RecordSource(docs.as_data_source(split="train"), tb.document_from_example)
  assert len(train) == 2 and train[1] == DOCS[3] and train[-1] == DOCS[3]
  with pytest.raises(IndexError):
    train[2]  # pylint: disable=pointless-statement
  assert docs.info.metadata["documents"] == {"train": 2, "val": 1, "test": 1}

  spans = tb.JaxicdSpans(code_space="demo", seed=1, max_per_code=4, data_dir=str(tmp_path),
                         loader=lambda: SPANS)
  tb.prepare(spans)
  assert list(tb.read_spans(spans)) == SPANS

  # A second builder of the same config reuses the files instead of rebuilding.
  again = tb.JaxicdDocuments(source="demo", demo_seed=3, data_dir=str(tmp_path),
                             loader=lambda: pytest.fail("rebuilt a prepared dataset"))
  assert again.is_prepared()
  tb.prepare(again)


def test_config_names_keep_settings_apart(tmp_path):
  assert tb.documents_config_name("demo", 0) != tb.documents_config_name("demo", 1)
  assert (tb.documents_config_name("jsonl", manual_dir="/a")
          != tb.documents_config_name("jsonl", manual_dir="/b"))
  names = {tb.spans_config_name("demo"), tb.spans_config_name("all"),
           tb.spans_config_name("demo", seed=1), tb.spans_config_name("demo", max_per_code=4),
           tb.spans_config_name("demo", negatives=False)}
  assert len(names) == 5
  f = tmp_path / "codes.txt"
  f.write_text("I10\n")
  first = tb.spans_config_name(str(f))
  f.write_text("I10\nE11.9\n")  # same file name, other contents: another config
  assert tb.spans_config_name(str(f)) != first
  with pytest.raises(ValueError, match="unknown document source"):
    tb.documents_config_name("mimic")


def test_credentialed_source_without_files_explains_manual_download(tmp_path):
  builder = tb.JaxicdDocuments(source="mimic_iv", manual_dir=str(tmp_path / "missing"),
                               data_dir=str(tmp_path / "data"))
  with pytest.raises(Exception, match="PhysioNet"):
    tb.prepare(builder, str(tmp_path / "missing"))


def data_config(start=None, **fields):
  """A copy of ``start`` (default ``base_config().data``) with ``fields`` changed."""
  data = (start or base_config().data).copy_and_resolve_references()
  data.update(fields)
  return data


def test_pipeline_reads_documents_through_the_tfds_cache(tmp_path):
  from jaxicd.data.sources import load_documents  # pylint: disable=g-import-not-at-top
  direct = load_documents("jsonl", FIXTURE_JSONL)
  cfg = data_config(source="jsonl", manual_dir=FIXTURE_JSONL, data_dir=str(tmp_path))
  cached = pipeline.load_documents(cfg)
  assert sorted(cached, key=lambda d: d.id) == sorted(direct, key=lambda d: d.id)
  assert (tmp_path / "jaxicd_documents").is_dir()


def test_demo_and_expansion_build_from_code(tmp_path):
  cfg = data_config(source="demo", demo_seed=0, code_space="demo", spans_per_code=2,
                    negatives=False, annotated_spans=False)
  direct_docs = pipeline.load_documents(cfg)
  direct_spans = pipeline.load_spans(cfg)
  cached = data_config(cfg, data_dir=str(tmp_path))
  assert list(pipeline.load_documents(cached)) == sorted(
      direct_docs, key=lambda d: ({"train": 0, "test": 1, "val": 2}[d.split]))
  assert pipeline.load_spans(cached) == direct_spans
  assert (tmp_path / "jaxicd_spans" / "demo-n2-neg0-seed0").is_dir()
  # Users' own spans join the span source.
  own = pipeline.load_spans(data_config(cfg, span_files="tests/fixtures/jsonl/spans.jsonl"))
  assert own[:len(direct_spans)] == direct_spans
  assert [s.text for s in own[len(direct_spans):]][:2] == [
      "acute on chronic diastolic heart failure", "no evidence of pneumonia"]
  assert (tmp_path / "jaxicd_documents" / f"demo-seed0-{demo.fingerprint()}").is_dir()


def _line(i: int) -> str:
  return json.dumps({"id": f"n{i}", "text": f"Note {i}: hypertension.", "codes": ["I10"]})


def test_cache_follows_the_source_files_contents(tmp_path):
  src = tmp_path / "notes.jsonl"
  src.write_text(_line(1) + "\n")
  data_dir = str(tmp_path / "tfds")
  load = lambda **kw: [d.id for d in tb.load_documents("jsonl", data_dir=data_dir,
                                                       manual_dir=str(src), **kw)]
  assert load() == ["n1"]
  with open(src, "a", encoding="utf-8") as f:  # appending documents: served stale before
    f.write(_line(2) + "\n")
  assert load() == ["n1", "n2"]
  with open(src, "a", encoding="utf-8") as f:  # appending a malformed line: no error before
    f.write('{"id": "n3", \n')
  with pytest.raises(RecordError, match="notes.jsonl:3.*malformed JSON"):
    load()
  # The reader options are part of the key: a skip-mode build is not served in raise mode.
  assert load(on_error="skip") == ["n1", "n2"]
  with pytest.raises(RecordError, match="notes.jsonl:3.*malformed JSON"):
    load()


def test_config_name_keys_on_size_mtime_hash_and_options(tmp_path):
  src = tmp_path / "notes.jsonl"
  src.write_text(_line(1) + "\n")
  name = lambda **kw: tb.documents_config_name("jsonl", manual_dir=str(src), **kw)
  first = name()
  assert name() == first  # stable while nothing changes
  st = os.stat(src)
  src.write_text(_line(2) + "\n")  # same size, other bytes, mtime put back: the hash differs
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.stat(src).st_size == st.st_size
  second = name()
  assert second != first
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only: mtime differs
  assert name() not in (first, second)
  assert name(on_error="skip") != name()
  # A folder: a file added, or an option's file (e.g. a split file) changed, is a new key.
  folder = tmp_path / "folder"
  folder.mkdir()
  shutil.copy(src, folder / "a.jsonl")
  before = tb.documents_config_name("jsonl", manual_dir=str(folder))
  (folder / "b.jsonl").write_text(_line(3) + "\n")
  assert tb.documents_config_name("jsonl", manual_dir=str(folder)) != before
  # Reader options, and the files they name.
  mimic = tmp_path / "mimic"
  shutil.copytree("tests/fixtures/mimic_iv", mimic)
  name = lambda **options: tb.documents_config_name("mimic_iv", manual_dir=str(mimic),
                                                    options=options)
  assert name(min_code_count=2) != name() and name(min_code_count=2) == name(min_code_count=2)
  split = tmp_path / "split.csv"
  split.write_text("hadm_id,split\n20000001,train\n")
  first = name(split_file=str(split))
  split.write_text("hadm_id,split\n20000001,test\n")
  assert name(split_file=str(split)) != first
  default_split = mimic / "mimiciv_icd10_split.csv"  # found in manual_dir: keyed as well
  first = name()
  default_split.write_text(default_split.read_text() + "20000005,test\n")
  assert name() != first


def test_input_changed_while_building_is_refused(tmp_path):
  src = tmp_path / "notes.jsonl"
  src.write_text(_line(1) + "\n")
  builder = tb.JaxicdDocuments(source="jsonl", manual_dir=str(src),
                               data_dir=str(tmp_path / "tfds"))
  with open(src, "a", encoding="utf-8") as f:  # after the key was computed, before the build
    f.write(_line(2) + "\n")
  with pytest.raises(RecordError, match="changed while"):
    tb.prepare(builder, str(src))
  assert not builder.is_prepared()
