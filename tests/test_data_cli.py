"""The data CLI, run as users run it: ``python -m jaxicd.data ... --stats`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxicd.data import sources

FIX = Path(__file__).parent / "fixtures"


def _cli(*flags: str) -> tuple[int, dict, str]:
  proc = subprocess.run([sys.executable, "-m", "jaxicd.data", *flags], capture_output=True,
                        text=True, timeout=120, check=False)
  return proc.returncode, json.loads(proc.stdout), proc.stdout + proc.stderr


def test_percentile_matches_numpy():
  from jaxicd.data.__main__ import _percentile  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 100):
    values = sorted(rng.integers(0, 5000, size=n).tolist())
    for q in (50, 95):
      assert _percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_stats_on_mdace_fixture_with_tokens():
  rc, out, raw = _cli("--source=mdace", f"--manual_dir={FIX / 'mdace'}", "--stats",
                      "--tokenizer=smollm2")
  assert rc == 0, raw
  assert out["source"] == "mdace"
  assert out["documents"] == {"total": 3, "by_split": {"train": 2, "val": 1}}
  assert out["evidence_spans"] == 8
  assert out["documents_with_evidence"] == 3
  # I50.23 N17.9 E11.9 Z79.4 in train; J18.9 J44.9 only in val.
  assert out["distinct_codes"] == {"total": 6, "by_split": {"train": 4, "val": 2},
                                   "only_outside_train": 2}
  assert out["invalid_codes"]["distinct"] == 0
  assert out["skipped"]["total"] == 0
  assert out["filtered"]["by_reason"] == {"ICD-10-PCS annotation (not ICD-10-CM)": 1,
                                          "duplicate annotation (same code and span)": 1}
  # Token counts with the same tokenizer, computed here independently.
  from jaxicd.model.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer("smollm2")
  lengths = [len(tok.encode(d.text)) for d in sources.load_documents("mdace", FIX / "mdace")]
  tokens = out["tokens_per_document"]
  assert tokens["documents_measured"] == 3
  assert tokens["mean"] == pytest.approx(np.mean(lengths), abs=0.01)
  assert tokens["p95"] == pytest.approx(np.percentile(lengths, 95))
  for phrase in ("acute on chronic systolic heart failure", "Community acquired pneumonia",
                 "Admission Date"):
    assert phrase not in raw  # never prints note text


def test_stats_skip_mode_counts_bad_jsonl_lines(tmp_path):
  path = tmp_path / "mine.jsonl"
  path.write_bytes(b"\n".join([
      b'{"id": "a", "text": "Hx: hypertension.", "codes": ["I10"]}',
      b'{"id": "b", "text": "x",',
      b'{"id": "c", "text": "CHF", "codes": ["I50.9", "Q99.99", "Q99.99"]}',
      b'{"id": "d", "text": "  "}',
      b'{"id": "e", "text": "\xff"}',
      b'{"id": "f", "text": "AKI", "codes": ["N17.9"], "split": "test", '
      b'"evidence": [{"code": "N17.9", "begin": 0, "end": 9}]}',
  ]) + b"\n")
  rc, out, raw = _cli("--source=jsonl", f"--manual_dir={path}", "--on_error=skip",
                      "--tokenizer=none")
  assert rc == 0, raw
  assert out["documents"] == {"total": 3, "by_split": {"test": 1, "train": 2}}
  assert out["skipped"]["by_reason"] == {
      "malformed JSON": 1, "unknown ICD-10-CM code": 2, "empty text": 1, "invalid UTF-8": 1,
      "evidence offsets outside text": 1}
  assert out["skipped"]["total"] == 6
  assert out["skipped"]["examples"]["malformed JSON"] == [f"{path}:2"]
  assert out["invalid_codes"] == {"distinct": 1, "occurrences": 2, "codes": {"Q99.99": 2}}
  assert out["evidence_spans"] == 0 and out["distinct_codes"]["total"] == 3
  assert "not measured" in out["tokens_per_document"]["error"]

  rc, out, _ = _cli("--source=jsonl", f"--manual_dir={path}", "--tokenizer=none")
  assert rc == 1
  assert out["error"].startswith(f"RecordError: {path}:2: malformed JSON")


def test_missing_data_and_unavailable_tokenizer(tmp_path):
  rc, out, _ = _cli("--source=mimic_iv", f"--manual_dir={tmp_path}", "--stats")
  assert rc == 1
  assert "MissingDataError" in out["error"] and "https://physionet.org/" in out["error"]
  rc, out, raw = _cli("--source=codiesp", f"--manual_dir={FIX / 'codiesp'}",
                      f"--tokenizer={tmp_path / 'missing.gguf'}")
  assert rc == 0, raw
  assert out["documents"]["by_split"] == {"test": 1, "train": 2, "val": 1}
  assert out["evidence_spans"] == 9
  assert out["filtered"]["by_reason"] == {"CodiEsp-X PROCEDIMIENTO row (ICD-10-PCS)": 1}
  assert "tokenizer unavailable" in out["tokens_per_document"]["error"]
  rc, out, raw = _cli("--source=mimic_iv", f"--manual_dir={FIX / 'mimic_iv'}",
                      f"--split_file={FIX / 'mimic_iv/mimiciv_icd10_split.csv'}",
                      "--min_code_count=2", "--tokenizer=none")
  assert rc == 0, raw
  # 20000005 is not in the split file, so 20000001 (I50.23 N17.9 I10) and 20000003 (J18.9
  # E11.9) remain: five codes seen once each, all rare, both admissions left without codes.
  assert out["documents"]["total"] == 0
  assert out["filtered"]["by_reason"]["code with fewer than 2 occurrences"] == 5
  assert out["filtered"]["by_reason"]["admission left without codes by min_code_count=2"] == 2
