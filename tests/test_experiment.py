"""The headline experiment's pipeline end to end at toy sizes: arms train, evaluate, report."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxicd import experiment
from jaxicd.data import demo
from jaxicd.train.config import base_config

# Smaller than --quick: one val note, one test note, a few spans, a 4-step budget.
TOY = dataclasses.replace(experiment.QUICK, steps=4, val_notes=1, test_notes=1, spans=3,
                          max_new_tokens=12, batch_size=4)


def test_toy_run_writes_the_table_json_and_figure(tmp_path, monkeypatch):
  out = tmp_path / "out"
  # Two of the other-style notes (a SOAP note and a sign-out) keep the toy run short.
  lines = experiment.STYLE_NOTES.read_text().splitlines()
  few = tmp_path / "styles.jsonl"
  few.write_text("\n".join([lines[0], lines[6]]) + "\n")
  monkeypatch.setattr(experiment, "STYLE_NOTES", few)
  results = experiment.run(TOY, tmp_path / "runs", out, arms=("mixed_20", "zero_shot"),
                           command="test")
  assert set(results) == {"mixed_20", "zero_shot"}
  assert results["zero_shot"]["tokens"] == 0 and results["zero_shot"]["step"] == 0
  # 20% of document SFT's 8 steps (twice the budget) of 4 x 256 tokens in 2-row steps:
  # round(3.2) = 3 steps of 2 x 256 tokens at most.
  assert results["mixed_20"]["step"] == 3 and 0 < results["mixed_20"]["tokens"] <= 1536
  corpus = demo.demo_corpus(0)
  test_style = corpus.styles[corpus.split("test")[0].id]
  for r in results.values():
    assert r["provenance"] == experiment.provenance(experiment._arm(r["arm"]), TOY)
    assert set(r["variants"]) == {v[0] for v in experiment.VARIANTS}
    assert r["test_notes"] == 1 and r["val_notes"] == 1 and r["test_spans"] == 3
    assert r["spans"]["span_count"] == 3.0
    for m in r["variants"].values():
      assert 0.0 <= m["micro_f1"] <= 1.0 and m["documents"] == 1.0
    # Calibration never makes val-chosen thresholds negative; raw variants keep every code.
    assert (r["variants"]["doc"]["threshold"] == r["variants"]["recode"]["threshold"]
            == r["variants"]["scan"]["threshold"] == 0.0)
    # The arm's inference is the calibrated variant best on val (ties: re-coding, then the
    # document pass, then the scan).
    f1 = r["val_variant_f1"]
    assert set(f1) == {"doc+cal", "recode+cal", "scan+cal"}
    assert r["chosen_variant"] == max(("recode+cal", "doc+cal", "scan+cal"), key=f1.get)
    # The scan only adds candidates: every code of the re-coded notes is still there.
    assert r["variants"]["scan"]["micro_recall"] >= r["variants"]["recode"]["micro_recall"]
    # The one test note's style gets its whole micro-F1.
    for m in r["variants"].values():
      assert m["by_style"] == {test_style: m["micro_f1"]}
    assert r["styles"]["notes"] == 2 and set(r["styles"]["by_style"]) == {"soap", "signout"}
    assert 0.0 <= r["styles"]["micro_f1"] <= 1.0 and r["styles"]["documents"] == 2.0
  md = (out / "results.md").read_text()
  assert "| mixed at 20% of the tokens (shared prompt) |" in md and "| zero-shot (untrained adapters) |" in md
  assert md.count("| mixed at 20% of the tokens (shared prompt) | recode+cal |") == 1
  assert "## Notes in other styles" in md and "signout micro-F1" in md
  assert "## Test notes by style" in md
  saved = json.loads((out / "results.json").read_text())
  assert saved["arms"]["mixed_20"]["tokens"] == results["mixed_20"]["tokens"]
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Rerun: every arm is reused (no training, no evaluation).
  again = experiment.run(TOY, tmp_path / "runs", out, arms=("mixed_20", "zero_shot"))
  assert again == results
  # A fresh workdir (a new checkout) reuses the arms the report records with the same recipe,
  # data and settings; other settings are not reused.
  fresh = experiment.run(TOY, tmp_path / "fresh", out, arms=("mixed_20", "zero_shot"))
  assert fresh == json.loads(json.dumps(results))
  assert not (tmp_path / "fresh/mixed_20/checkpoints").exists()
  other = dataclasses.replace(TOY, steps=5)
  assert experiment._recorded(experiment._arm("mixed_20"), other, out) is None
  assert experiment._recorded(experiment._arm("mixed_20"), TOY, out) == fresh["mixed_20"]
  # A workdir result of another recipe is refused, not reused.
  with pytest.raises(RuntimeError, match="another recipe"):
    experiment.run(other, tmp_path / "fresh", out, arms=("zero_shot",))
  # An evaluation stopped before its result.json resumes from its finished pieces (val and
  # test predictions, span codes), giving the same scores.
  cached = {p.name.split("-")[0] for p in (tmp_path / "runs/zero_shot/eval_cache").iterdir()}
  assert cached == {"scan", "spans", "styles", "test", "val"}
  (tmp_path / "runs/zero_shot/result.json").unlink()
  resumed = experiment.run(TOY, tmp_path / "runs", out, arms=("zero_shot",))["zero_shot"]
  assert resumed["variants"] == results["zero_shot"]["variants"]
  assert resumed["spans"] == results["zero_shot"]["spans"]
  assert resumed["styles"] == results["zero_shot"]["styles"]
  # An arm evaluated before the segment scan and the per-style scores existed gets them
  # back-filled from its recorded checkpoint and cached document pass: the same variants,
  # choice and other-style scores.
  path = tmp_path / "runs/mixed_20/result.json"
  old = json.loads(path.read_text())
  for key in ("scan", "scan+cal"):
    del old["variants"][key]
  for m in old["variants"].values():
    del m["by_style"]
  del old["val_variant_f1"]["scan+cal"], old["styles"]
  path.write_text(json.dumps(old))
  for piece in (tmp_path / "runs/mixed_20/eval_cache").glob("scan-*"):
    piece.unlink()
  filled = experiment.run(TOY, tmp_path / "runs", out, arms=("mixed_20",))["mixed_20"]
  assert filled == json.loads(json.dumps(results["mixed_20"]))
  assert json.loads(path.read_text()) == filled


def test_other_style_notes_are_valid_held_out_test_notes():
  from jaxicd import ontology
  from jaxicd.data.demo import DEMO_CODES, demo_corpus
  docs = experiment.style_notes()  # the reader checks every quote against text[begin:end]
  assert len(docs) == 12 and {d.split for d in docs} == {"test"}
  assert {d.id.split("-")[0] for d in docs} == {"soap", "problems", "signout", "ed", "consult"}
  codes = {c for d in docs for c in d.codes}
  assert codes <= set(DEMO_CODES)
  assert all(ontology.normalize_code(c) == c for c in codes)
  # Every gold code has evidence; no note is a demo note.
  for d in docs:
    assert {e.code for e in d.evidence} == set(d.codes)
  demo_texts = {d.text for d in demo_corpus().documents}
  assert not demo_texts & {d.text for d in docs}


def test_comparisons_against_document_only():
  def arm(tokens, macro, unseen):
    return {"tokens": tokens, "variants": {experiment.DEFAULT_VARIANT: {
        "macro_f1": macro, "unseen_micro_f1": unseen}}}
  cmp = experiment.comparisons({"doc_only": arm(1000, 0.40, 0.10),
                                "mixed_20": arm(200, 0.50, 0.45),
                                "mixed_30": arm(300, 0.62, 0.55),
                                "mixed_20_unshared": arm(250, 0.30, 0.05)})
  assert cmp["mixed_20_token_ratio"] == 0.2
  assert abs(cmp["mixed_20_macro_f1_gain"] - 0.10) < 1e-12
  assert abs(cmp["mixed_20_unseen_micro_f1_gain"] - 0.35) < 1e-12
  assert cmp["mixed_20_unshared_token_ratio"] == 0.25
  assert abs(cmp["mixed_20_unshared_macro_f1_gain"] + 0.10) < 1e-12
  assert cmp["mixed_30_token_ratio"] == 0.3
  assert abs(cmp["mixed_30_macro_f1_gain"] - 0.22) < 1e-12
  assert abs(cmp["mixed_30_unseen_micro_f1_gain"] - 0.45) < 1e-12
  assert "mixed_token_ratio" not in cmp  # arms not run are not compared


def test_report_holds_cheap_arms_to_gains_only_within_the_token_bound(tmp_path):
  def arm(name, tokens, macro, unseen):
    m = {"micro_f1": 0.5, "micro_precision": 0.5, "micro_recall": 0.5, "macro_f1": macro,
         "unseen_micro_f1": unseen, "evidence_span_f1": 0.5, "codes_per_note": 9.0,
         "threshold": 0.3}
    return {"arm": name, "label": name, "tokens": tokens, "step": 1, "eval_seconds": 60.0,
            "variants": {"recode+cal": m}, "spans": {"span_exact": 0.5},
            "gold_codes_per_note": 9.0, "test_notes": 50, "val_notes": 10, "test_spans": 500,
            "val_selection": {"1": 0.5}}
  results = {"doc_only": arm("doc_only", 1000, 0.40, 0.10),
             "mixed_30": arm("mixed_30", 290, 0.47, 0.35),    # 29%: +0.07 / +0.25, both met
             "mixed_20": arm("mixed_20", 310, 0.60, 0.60)}    # 31%: over the bound
  experiment.write_report(results, TOY, tmp_path, 1.0, "test")
  md = (tmp_path / "results.md").read_text()
  # Document SFT trains twice the 4-step budget; mixed_20 is 20% of that in 2-row steps.
  assert "(doc_only: 8 steps of 4," in md and "mixed_20: 3 steps of 2 rows" in md
  rows = {line.split(" | ")[0].lstrip("| "): line
          for line in md.splitlines() if " over doc_only " in line}
  assert "| >= +0.05 | +0.070 | met |" in rows[
      "macro f1 gain of mixed_30 over doc_only (29% of its tokens)"]
  assert "| >= +0.20 | +0.250 | met |" in rows[
      "unseen micro f1 gain of mixed_30 over doc_only (29% of its tokens)"]
  for key in ("macro f1 gain", "unseen micro f1 gain"):
    assert "not comparable: over 30% of doc_only's tokens" in rows[
        f"{key} of mixed_20 over doc_only (31% of its tokens)"]


def test_each_arm_is_compared_with_its_val_chosen_variant():
  doc = {"tokens": 1000, "chosen_variant": "doc+cal", "variants": {
      "doc+cal": {"macro_f1": 0.60, "unseen_micro_f1": 0.30},
      "recode+cal": {"macro_f1": 0.20, "unseen_micro_f1": 0.05}}}
  mixed = {"tokens": 200, "variants": {  # recorded before the choice: the default variant
      "doc+cal": {"macro_f1": 0.10, "unseen_micro_f1": 0.10},
      "recode+cal": {"macro_f1": 0.70, "unseen_micro_f1": 0.50}}}
  assert experiment.chosen(mixed) == experiment.DEFAULT_VARIANT == "recode+cal"
  cmp = experiment.comparisons({"doc_only": doc, "mixed_20": mixed})
  assert abs(cmp["mixed_20_macro_f1_gain"] - 0.10) < 1e-12       # 0.70 - 0.60
  assert abs(cmp["mixed_20_unseen_micro_f1_gain"] - 0.20) < 1e-12


def test_evaluation_pieces_are_cached_per_chunk_of_notes(tmp_path):
  from jaxicd.data.records import Document
  from jaxicd.infer.coder import CodedEvidence

  class FakeCoder:  # codes note i as "A<i>"; counts the notes it was asked to code
    def __init__(self):
      self.coded, self.scanned, self.stats = 0, 0, {}

    def code_documents(self, docs):
      self.coded += len(docs)
      self.stats = {"documents": len(docs), "windows": 2 * len(docs)}
      return [[CodedEvidence(f"A{d.id}", 0, 1, "x", 0.5)] for d in docs]

    def recode_evidence(self, docs, first):
      return [[CodedEvidence(e.code + "r", 0, 1, "x", 0.9) for e in evs] for evs in first]

    def scan_clauses(self, docs):
      self.scanned += len(docs)
      return [[CodedEvidence(f"S{d.id}", 2, 3, "y", 0.7)] for d in docs]

  cfg = base_config()
  cache = experiment._EvalCache(tmp_path, TOY, cfg)
  docs = [Document(str(i), "t", (), (), "test", "x") for i in range(25)]
  coder = FakeCoder()
  preds, stats = experiment._code(coder, docs, cache, "test-step1", chunk=10)
  assert [p[0].code for p in preds["doc"]] == [f"A{i}" for i in range(25)]
  assert [p[0].code for p in preds["recode"]] == [f"A{i}r" for i in range(25)]
  # The scan's candidates join the re-coded ones (ordered by score).
  assert [[e.code for e in p] for p in preds["scan"]] == [[f"A{i}r", f"S{i}"] for i in range(25)]
  assert stats == {"documents": 25, "windows": 50}
  assert len(list((tmp_path / "eval_cache").glob("test-step1-notes*"))) == 3
  assert len(list((tmp_path / "eval_cache").glob("scan-test-step1-notes*"))) == 3
  # A rerun after an interruption (one chunk never finished) codes only that chunk again.
  (tmp_path / "eval_cache" / sorted(p.name for p in (tmp_path / "eval_cache").iterdir())[-1]
   ).unlink()
  again = FakeCoder()
  preds2, stats2 = experiment._code(again, docs, cache, "test-step1", chunk=10)
  assert again.coded in (5, 10) and preds2 == preds and stats2 == stats
  assert again.scanned == 0  # the scan's pieces were all finished


def test_micro_f1_by_group_against_a_hand_count():
  """Per-style micro-F1 counts each group's notes alone (hand-counted)."""
  from jaxicd.data.records import Document
  from jaxicd.infer.coder import CodedEvidence

  def doc(i, codes):
    return Document(id=f"n{i}", text="x", codes=tuple(codes), evidence=(), split="test")

  docs = [doc(0, ["I10", "E11.9"]), doc(1, ["N17.9"]), doc(2, ["J18.9"])]
  coded = lambda *codes: [CodedEvidence(c, -1, -1, "", 1.0) for c in codes]  # noqa: E731
  kept = [coded("I10"), coded("N17.9", "I10"), coded("J18.9")]
  by = experiment._micro_f1_by(docs, kept, {"n0": "a", "n1": "a", "n2": "b", "n9": "c"})
  # Group a: tp 2 (I10, N17.9), fp 1 (I10 in n1), fn 1 (E11.9): P 2/3, R 2/3, F1 2/3.
  assert by == {"a": 2 / 3, "b": 1.0}
