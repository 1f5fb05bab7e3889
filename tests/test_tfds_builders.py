"""TFDS builders: build to array_record, read back without TensorFlow, equal records."""

from __future__ import annotations

import pytest

from jaxicd.data import pipeline
from jaxicd.data import tfds_builders as tb
from jaxicd.data.records import Document, Evidence, Span

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


def test_pipeline_reads_documents_through_the_tfds_cache(tmp_path):
  from jaxicd.data.sources import load_documents  # pylint: disable=g-import-not-at-top
  direct = load_documents("jsonl", FIXTURE_JSONL)
  cfg = dict(source="jsonl", manual_dir=FIXTURE_JSONL, data_dir=str(tmp_path))
  cached = pipeline.load_documents(cfg)
  assert sorted(cached, key=lambda d: d.id) == sorted(direct, key=lambda d: d.id)
  assert (tmp_path / "jaxicd_documents").is_dir()


def test_demo_and_expansion_build_from_code(tmp_path):
  cfg = dict(source="demo", demo_seed=0, code_space="demo", spans_per_code=2, negatives=False,
             annotated_spans=False)
  direct_docs = pipeline.load_documents(cfg)
  direct_spans = pipeline.load_spans(cfg)
  cached = dict(cfg, data_dir=str(tmp_path))
  assert list(pipeline.load_documents(cached)) == sorted(
      direct_docs, key=lambda d: ({"train": 0, "test": 1, "val": 2}[d.split]))
  assert pipeline.load_spans(cached) == direct_spans
  assert (tmp_path / "jaxicd_spans" / "demo-n2-neg0-seed0").is_dir()
  # Users' own spans join the span source.
  own = pipeline.load_spans(dict(cfg, span_files="tests/fixtures/jsonl/spans.jsonl"))
  assert own[:len(direct_spans)] == direct_spans
  assert [s.text for s in own[len(direct_spans):]][:2] == [
      "acute on chronic diastolic heart failure", "no evidence of pneumonia"]
  assert (tmp_path / "jaxicd_documents" / "demo-seed0").is_dir()
