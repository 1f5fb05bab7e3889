"""Predict mode: notes from files -> the document coder -> grounded JSONL lines."""

from __future__ import annotations

import json

import pytest

import train_worker
from jaxicd.data.records import Document
from jaxicd.infer import coder as coder_lib
from jaxicd.infer import predict
from test_coder import FILLER, ScriptedModel

TEXT = (FILLER * 3 + "History of hypertension. " + FILLER * 6
        + "Type 2 diabetes mellitus without complications. " + FILLER * 2)


def test_read_notes_from_text_directory_and_jsonl(tmp_path):
  (tmp_path / "a.txt").write_text("Essential hypertension.\n")
  assert predict.read_notes(tmp_path / "a.txt") == [
      Document("a", "Essential hypertension.\n", (), split="test", source="text")]
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "n2.txt").write_text("CHF.")
  (notes / "n1.txt").write_text("AKI.")
  (notes / "skip.md").write_text("not a note")
  assert [(d.id, d.text) for d in predict.read_notes(notes)] == [("n1", "AKI."), ("n2", "CHF.")]
  jsonl = tmp_path / "notes.jsonl"
  jsonl.write_text(json.dumps({"id": "x", "text": "COPD."}) + "\n"
                   + json.dumps({"text": "T2DM.", "codes": ["E11.9"]}) + "\n")
  docs = predict.read_notes(jsonl)
  assert [(d.id, d.text, d.codes) for d in docs] == [
      ("x", "COPD.", ()), ("notes.jsonl:2", "T2DM.", ("E11.9",))]


def test_read_notes_errors_name_the_input(tmp_path):
  with pytest.raises(ValueError, match="config.input is empty"):
    predict.read_notes("")
  with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
    predict.read_notes(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="empty.txt: empty note"):
    predict.read_notes(tmp_path / "empty.txt")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3\)"):
    predict.read_notes(tmp_path / "latin1.txt")
  (tmp_path / "no_notes").mkdir()
  with pytest.raises(FileNotFoundError, match="no .txt notes"):
    predict.read_notes(tmp_path / "no_notes")
  (tmp_path / "bad.jsonl").write_text('{"id": "ok", "text": "x"}\n{"id": "y"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    predict.read_notes(tmp_path / "bad.jsonl")


def test_prediction_rows():
  doc = Document("n1", "Pt with HTN.", ())
  evidence = [coder_lib.CodedEvidence("I10", 8, 11, "HTN", 0.8),
              coder_lib.CodedEvidence("X99.9", -1, -1, "model's quote", 0.25)]
  described = {"I10": "Essential (primary) hypertension"}
  rows = predict.prediction_rows(doc, evidence, lambda c: described.get(c, ""))
  assert rows == [
      dict(document="n1", code="I10", description="Essential (primary) hypertension", begin=8,
           end=11, quote="HTN", score=0.8),
      dict(document="n1", code="X99.9", description="", begin=-1, end=-1,
           quote="model's quote", score=0.25)]


def test_predict_mode_codes_notes_into_jsonl(tmp_path, monkeypatch):
  """`jaxicd.main.run` in predict mode, with the coder's model replaced by a scripted one (the
  tiny random model writes no codes) and no checkpoint in the workdir."""
  from jaxicd import main
  from jaxicd.model.tokenizer import load_tokenizer
  tok = load_tokenizer("smollm2")
  scripted = ScriptedModel(tok, max_new=96)

  def scripted_coder(cfg, model, tokenizer):
    del model, tokenizer
    return coder_lib.Coder(None, tok, code_space=("I10", "E11.9", "J45.909"),
                           seq_len=int(cfg.data.seq_len), window_overlap=32,
                           max_new_tokens=96, batch_size=4, generate_fn=scripted)

  monkeypatch.setattr(coder_lib, "build_coder", scripted_coder)
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "n1.txt").write_text(TEXT)
  (notes / "n2.txt").write_text(FILLER * 4)
  config = train_worker.tiny_config(train_worker.write_byte_tokenizer(tmp_path / "tok"))
  config.mode, config.input = "predict", str(notes)
  printed = []
  monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
  result = main.run(config, str(tmp_path / "run"))

  out = tmp_path / "run" / "predictions.jsonl"
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert result == dict(step=0, documents=2, codes=3, evidence=3, grounded=2, output=str(out))
  assert any("no checkpoint" in line for line in printed)
  assert not any(TEXT[:30] in line for line in printed)  # logs never show note text
  by_code = {r["code"]: r for r in rows}
  assert {r["document"] for r in rows} == {"n1"}  # n2 has nothing to code
  hyp = TEXT.index("hypertension")
  diabetes = TEXT.index("Type 2 diabetes mellitus")
  assert (by_code["I10"]["begin"], by_code["I10"]["end"]) == (hyp, hyp + 12)
  assert (by_code["E11.9"]["begin"], by_code["E11.9"]["quote"]) == (
      diabetes, "Type 2 diabetes mellitus")
  assert (by_code["J45.909"]["begin"], by_code["J45.909"]["quote"]) == (-1, "wheezing at night")
  assert by_code["I10"]["description"] == "Essential (primary) hypertension"
  assert by_code["E11.9"]["description"] == "Type 2 diabetes mellitus without complications"
  for r in rows:
    if r["begin"] >= 0:
      assert TEXT[r["begin"]:r["end"]] == r["quote"]
  assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
