"""Predict mode: notes from files -> the document coder -> grounded JSONL lines and a report.

Each refusal and the crash/resume cases below failed (overwrote notes, coded untrained, lost
work) before predict checked for them."""

from __future__ import annotations

import json
import os

import pytest

import train_worker
from jaxicd.data.records import Document
from jaxicd.errors import InputError
from jaxicd.infer import coder as coder_lib
from jaxicd.infer import predict
from test_coder import FILLER, ScriptedModel

TEXT = (FILLER * 3 + "History of hypertension. " + FILLER * 6
        + "Type 2 diabetes mellitus without complications. " + FILLER * 2)
CODE_SPACE = ("I10", "E11.9", "J45.909")


def test_read_notes_from_text_directory_and_jsonl(tmp_path):
  (tmp_path / "a.txt").write_text("Essential hypertension.\n")
  assert predict.read_notes(tmp_path / "a.txt") == [
      Document("a", "Essential hypertension.\n", (), split="test", source="text")]
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "n2.txt").write_text("CHF.")
  (notes / "n1.txt").write_text("AKI.")
  (notes / "skip.md").write_text("not a note")
  read = predict.read_input(notes)
  assert [(d.id, d.text) for d in read.docs] == [("n1", "AKI."), ("n2", "CHF.")]
  assert read.ignored == 1 and read.gold == {}
  jsonl = tmp_path / "notes.jsonl"
  jsonl.write_text(json.dumps({"id": "x", "text": "COPD."}) + "\n"
                   + json.dumps({"text": "T2DM.", "codes": ["e119"]}) + "\n")
  read = predict.read_input(jsonl)
  assert [(d.id, d.text, d.codes) for d in read.docs] == [
      ("x", "COPD.", ()), ("notes.jsonl:2", "T2DM.", ())]
  assert read.gold == {"notes.jsonl:2": ("E11.9",)} and read.where[1] == f"{jsonl}:2"


def test_jsonl_gold_fields_are_optional_and_never_refused(tmp_path):
  """Codes outside the code space (or the ontology), bad evidence or an unknown split used to
  refuse the file, with advice (--on_error=skip) that predict does not take."""
  path = tmp_path / "notes.jsonl"
  path.write_text(
      json.dumps({"id": "a", "text": "HTN.", "codes": ["I10", "Z99.999", "not a code"],
                  "split": "holdout"}) + "\n"
      + json.dumps({"id": "b", "text": "CHF.", "evidence": [
          {"code": "I50.9", "begin": 0, "end": 99}]}) + "\n"
      + json.dumps({"id": "c", "text": "AKI.", "codes": "N17.9"}) + "\n"
      + '{"id": "d", "text": "CKD.", "codes": ["\\ud800"]}\n')
  read = predict.read_input(path)
  assert [d.id for d in read.docs] == ["a", "b", "c", "d"]
  assert read.gold == {"a": ("I10", "Z99.999", "not a code"), "b": ("I50.9",), "d": ("\ud800",)}
  for bad, match in [('{"id": "a", "text": "x"}\n{"id": "y"}\n',
                      r"bad.jsonl:2: field 'text': empty text"),
                     ('{"text": "x"}\n[1]\n', r"bad.jsonl:2: malformed JSON"),
                     ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
                      r"bad.jsonl:2: field 'id': duplicate id"),
                     ('{"text": "caf\\ud800"}\n', r"bad.jsonl:1: .*lone surrogate"),
                     ("\n\n", r"bad.jsonl: empty file")]:
    (tmp_path / "bad.jsonl").write_text(bad)
    with pytest.raises(InputError, match=match) as e:
      predict.read_notes(tmp_path / "bad.jsonl")
    assert "on_error" not in str(e.value)


def test_read_notes_errors_name_the_input(tmp_path):
  with pytest.raises(InputError, match="config.input is empty"):
    predict.read_notes("")
  with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
    predict.read_notes(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(InputError, match="empty.txt: empty note"):
    predict.read_notes(tmp_path / "empty.txt")
  (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9".encode("latin-1"))
  with pytest.raises(InputError, match=r"latin1.txt:2: not UTF-8 text"):
    predict.read_notes(tmp_path / "latin1.txt")
  (tmp_path / "no_notes").mkdir()
  with pytest.raises(FileNotFoundError, match="no .txt notes"):
    predict.read_notes(tmp_path / "no_notes")
  (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHTN.")
  assert predict.read_notes(tmp_path / "bom.txt")[0].text == "HTN."


@pytest.mark.parametrize("name", ["notes.json", "note.md", "note"])
def test_other_suffixes_are_refused_with_the_accepted_ones(tmp_path, name):
  """A .json file used to be coded as the raw text of one note."""
  (tmp_path / name).write_text(json.dumps([{"text": "HTN."}]))
  with pytest.raises(InputError, match=r"cannot read .* files; config.input takes a \.txt "
                     r"note, \.jsonl file of notes, or a folder of \.txt notes"):
    predict.read_notes(tmp_path / name)


def test_max_note_chars_names_the_note(tmp_path):
  (tmp_path / "notes.jsonl").write_text(json.dumps({"id": "short", "text": "x" * 10}) + "\n"
                                        + json.dumps({"id": "long", "text": "y" * 11}) + "\n")
  assert len(predict.read_notes(tmp_path / "notes.jsonl", max_chars=11)) == 2
  with pytest.raises(InputError, match=r"notes.jsonl:2: note 'long' has 11 characters, more "
                     r"than config.max_note_chars=10"):
    predict.read_notes(tmp_path / "notes.jsonl", max_chars=10)


# --- runs through jaxicd.main.run, with a scripted model ----------------------------------------


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
  return train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def scripted(monkeypatch):
  """The coder's model replaced by a scripted one (the tiny random model writes no codes);
  ``state["fail_after"]`` makes the n+1-th generation call raise (a crash)."""
  from jaxicd.model.tokenizer import load_tokenizer
  tok = load_tokenizer("smollm2")
  state = dict(fail_after=None, calls=0, coded=[])
  model = ScriptedModel(tok, max_new=96)

  def generate(batch):
    if state["fail_after"] is not None and state["calls"] >= state["fail_after"]:
      raise RuntimeError("killed")
    state["calls"] += 1
    return model(batch)

  class Coder(coder_lib.Coder):
    def code_documents(self, docs):
      state["coded"] += [d.id for d in docs]
      return super().code_documents(docs)

  def scripted_coder(cfg, model, tokenizer, workdir=None):
    del model, tokenizer
    state["workdir"] = workdir  # where predict's calibrated threshold is looked up
    return Coder(None, tok, code_space=CODE_SPACE, seq_len=int(cfg.data.seq_len),
                 window_overlap=32, max_new_tokens=96, batch_size=state.get("batch_size", 4),
                 generate_fn=generate)

  monkeypatch.setattr(coder_lib, "build_coder", scripted_coder)
  return state


def _config(byte_tok, notes, **kw):
  config = train_worker.tiny_config(byte_tok)
  config.mode, config.input = "predict", str(notes)
  config.update(kw)
  return config


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_mode_codes_notes_into_jsonl_and_report(tmp_path, monkeypatch, scripted,
                                                         byte_tok):
  from jaxicd import main
  monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "n1.txt").write_text(TEXT)
  (notes / "n2.txt").write_text(FILLER * 4)
  config = _config(byte_tok, notes, allow_untrained=True)
  printed = []
  monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
  result = main.run(config, str(tmp_path / "run"))

  out = tmp_path / "run" / "predictions.jsonl"
  rows = _lines(out)
  assert result == dict(step=0, documents=2, codes=3, evidence=3, grounded=2, resumed=0,
                        output=str(out), report=str(tmp_path / "run" / "report.html"))
  assert any("no checkpoint" in line and "allow_untrained" in line for line in printed)
  assert any("decision threshold 0.000" in line for line in printed)
  assert scripted["workdir"] == str(tmp_path / "run")  # the calibration of this workdir applies
  progress = [line for line in printed if line.startswith("predict: ") and "ETA" in line]
  assert progress and "2/2 notes" in progress[-1] and "notes/min" in progress[-1]
  assert "windows coded" in progress[-1]
  assert not any(TEXT[:30] in line or "hypertension" in line for line in printed)  # no text
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
  page = (tmp_path / "run" / "report.html").read_text()
  assert f'data-code="I10" data-begin="{hyp}" data-end="{hyp + 12}"' in page
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
      "checkpoints", "config.predict.json", "predictions.jsonl", "report.html"]


def test_workdir_without_checkpoint_is_refused_before_anything_runs(tmp_path, scripted,
                                                                    byte_tok):
  """A mistyped --workdir used to exit 0 with the untrained model's codes."""
  from jaxicd import main
  (tmp_path / "n1.txt").write_text(TEXT)
  config = _config(byte_tok, tmp_path / "n1.txt")
  with pytest.raises(InputError, match=r"no checkpoint in .*typo/checkpoints \(--workdir=.*typo "
                     r"does not exist\): .*--config.allow_untrained=True"):
    main.run(config, str(tmp_path / "typo"))
  assert not (tmp_path / "typo").exists() and scripted["coded"] == []
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match=r"no checkpoint in .*empty/checkpoints: "):
    main.run(config, str(tmp_path / "empty"))
  assert list((tmp_path / "empty").iterdir()) == []  # no config.predict.json either


@pytest.mark.parametrize("case", ["same file", "other spelling", "hard link", "in input folder",
                                  "report"])
def test_output_over_an_input_is_refused(tmp_path, scripted, byte_tok, case):
  """--config.output equal to --config.input used to overwrite the notes with predictions."""
  from jaxicd import main
  notes = tmp_path / "notes"
  notes.mkdir()
  note = notes / "n1.txt"
  note.write_text(TEXT)
  kw = dict(allow_untrained=True, output=str(note))
  if case == "other spelling":
    kw["output"] = str(tmp_path / "notes" / ".." / "notes" / "n1.txt")
  elif case == "hard link":
    os.link(note, tmp_path / "link.txt")
    kw["output"] = str(tmp_path / "link.txt")
  elif case == "in input folder":
    kw["output"] = str(notes / "predictions.jsonl")
  elif case == "report":
    kw.update(output=str(tmp_path / "out.jsonl"), report=str(note))
  config = _config(byte_tok, notes if case == "in input folder" else note, **kw)
  with pytest.raises(InputError, match="input"):
    main.run(config, str(tmp_path / "run"))
  assert note.read_text() == TEXT and not (tmp_path / "run").exists()
  assert scripted["coded"] == []


def test_a_crashed_run_leaves_no_output_and_resumes_without_recoding(tmp_path, monkeypatch,
                                                                   scripted, byte_tok):
  """Nothing was written until every note was coded, and a crash lost all of it."""
  from jaxicd import main
  notes = tmp_path / "notes.jsonl"
  texts = {f"n{i}": TEXT.replace("History", f"Visit {i}. History") for i in range(5)}
  notes.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
  scripted["batch_size"] = 1  # one note per generation call and per written chunk
  out = tmp_path / "run" / "predictions.jsonl"
  partial = tmp_path / "run" / "predictions.jsonl.partial"
  reference = tmp_path / "ref.jsonl"
  calls_per_note = None

  config = _config(byte_tok, notes, allow_untrained=True, output=str(reference), report="none")
  main.run(config, str(tmp_path / "ref"))
  calls_per_note = scripted["calls"] // len(texts)
  scripted.update(calls=0, coded=[], fail_after=2 * calls_per_note + 1)  # dies in the 3rd note

  config = _config(byte_tok, notes, allow_untrained=True)
  with pytest.raises(RuntimeError, match="killed"):
    main.run(config, str(tmp_path / "run"))
  assert not out.exists() and not (tmp_path / "run" / "report.html").exists()
  done = [json.loads(line) for line in partial.read_text().splitlines()]
  assert done[0]["format"] == "jaxicd-predict-partial-1"
  assert [d["document"] for d in done[1:]] == ["n0", "n1"]
  # A run killed while appending: the torn last line is dropped, that note coded again.
  with open(partial, "a", encoding="utf-8") as f:
    f.write('{"document": "n2", "sha": "')

  scripted.update(calls=0, coded=[], fail_after=None)
  printed = []
  monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
  result = main.run(config, str(tmp_path / "run"))
  assert scripted["coded"] == ["n2", "n3", "n4"] and result["resumed"] == 2
  assert any("resuming" in line and "2 of 5 notes already coded" in line for line in printed)
  assert out.read_text() == reference.read_text()
  assert not partial.exists() and (tmp_path / "run" / "report.html").exists()


def test_resuming_with_other_settings_is_refused(tmp_path, scripted, byte_tok):
  from jaxicd import main
  notes = tmp_path / "notes.jsonl"
  notes.write_text(json.dumps({"id": "a", "text": TEXT}) + "\n")
  scripted["fail_after"] = 0
  config = _config(byte_tok, notes, allow_untrained=True)
  with pytest.raises(RuntimeError, match="killed"):
    main.run(config, str(tmp_path / "run"))
  partial = tmp_path / "run" / "predictions.jsonl.partial"
  assert not partial.exists()  # nothing coded, nothing written
  scripted["fail_after"] = None
  partial.parent.mkdir(exist_ok=True)
  partial.write_text(json.dumps({"format": "jaxicd-predict-partial-1",
                                 "settings": {"step": 0, "seq_len": 512}}) + "\n")
  with pytest.raises(InputError, match=r"partial holds a half-done run with other settings "
                     r"\(.*seq_len 512 -> 256.*\): rerun with the same settings"):
    main.run(config, str(tmp_path / "run"))
  partial.write_text("not json\n")
  with pytest.raises(InputError, match="not a jaxicd predict partial file"):
    main.run(config, str(tmp_path / "run"))


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
