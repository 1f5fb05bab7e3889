"""Metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score
from sklearn.preprocessing import MultiLabelBinarizer

from jaxicd.data.records import Document, Evidence
from jaxicd.eval import metrics
from jaxicd.infer.coder import CodedEvidence


def _random_sets(seed: int, n_docs: int = 40, space: int = 30):
  rng = np.random.default_rng(seed)
  codes = [f"C{i:02d}" for i in range(space)]
  draw = lambda: {c for c in codes[:space - 5] if rng.random() < 0.15}  # 5 codes never used
  gold = [draw() for _ in range(n_docs)]
  # Predictions: mostly gold with noise, including codes outside the space.
  pred = [{c for c in g if rng.random() < 0.7} | draw() | ({"Z99"} if rng.random() < 0.1 else set())
          for g in gold]
  return codes, gold, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_code_f1_matches_sklearn(seed):
  codes, gold, pred = _random_sets(seed)
  got = metrics.code_f1(gold, pred, code_space=codes)
  labels = sorted(set(codes) | {"Z99"})
  mlb = MultiLabelBinarizer(classes=labels)
  y_true, y_pred = mlb.fit_transform(gold), mlb.transform(pred)
  assert got["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
  assert got["micro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="micro"))
  assert got["micro_recall"] == pytest.approx(recall_score(y_true, y_pred, average="micro"))
  in_gold = sorted(set().union(*gold))
  idx = [labels.index(c) for c in in_gold]
  assert got["macro_f1"] == pytest.approx(
      f1_score(y_true[:, idx], y_pred[:, idx], average="macro", zero_division=0))
  assert got["macro_f1_all"] == pytest.approx(
      f1_score(y_true, y_pred, average="macro", zero_division=0))
  assert got["codes_in_gold"] == len(in_gold)


def test_unseen_code_f1_matches_sklearn_on_restricted_sets():
  codes, gold, pred = _random_sets(3)
  unseen = set(codes[::3])
  got = metrics.code_f1(gold, pred, code_space=codes, restrict_to=unseen, prefix="unseen_")
  mlb = MultiLabelBinarizer(classes=sorted(unseen))
  y_true = mlb.fit_transform([g & unseen for g in gold])
  y_pred = mlb.transform([p & unseen for p in pred])
  assert got["unseen_micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
  present = y_true.sum(0) > 0
  assert got["unseen_macro_f1"] == pytest.approx(
      f1_score(y_true[:, present], y_pred[:, present], average="macro", zero_division=0))
  assert got["unseen_macro_f1_all"] == pytest.approx(
      f1_score(y_true, y_pred, average="macro", zero_division=0))


def _coded(codes):
  return [CodedEvidence(c, -1, -1, "", 0.5) for c in sorted(codes)]


def test_unseen_metrics_are_strict_hand_case():
  # Trained on A only. The note has A and B; the model predicts every code of the space.
  space = ["A", "B", "C", "D", "E"]
  doc = Document("d", "text", ("A", "B"), split="val")
  preds = [_coded(space)]
  unseen = metrics.unseen_in_training({"A"}, space, doc.codes)
  assert unseen == {"B", "C", "D", "E"}
  got = metrics.evaluate([doc], preds, code_space=space, unseen_codes=unseen, ks=())
  # Over the unseen codes: gold {B}, predicted {B, C, D, E}: TP 1, FP 3, FN 0.
  assert got["unseen_micro_precision"] == 0.25
  assert got["unseen_micro_recall"] == 1.0
  assert got["unseen_micro_f1"] == pytest.approx(1 / (1 + 0.5 * 3))  # 0.40
  assert got["unseen_macro_f1"] == 1.0       # B, the only unseen code in gold
  assert got["unseen_macro_f1_all"] == 0.25  # B 1; C, D, E 0
  # The lenient set (unseen codes of the evaluated gold only) drops C, D, E and reads 1.0.
  lenient = metrics.evaluate([doc], preds, code_space=space, unseen_codes={"B"}, ks=())
  assert lenient["unseen_micro_f1"] == 1.0


def test_unseen_in_training_keeps_gold_codes_outside_the_code_space():
  assert metrics.unseen_in_training(["A"], ["A", "B"], ["B", "Z"]) == {"B", "Z"}
  assert metrics.unseen_in_training(["A", "B"], ["A", "B"]) == frozenset()
  # A missed gold code outside the code space is an unseen false negative.
  doc = Document("d", "text", ("B", "Z"), split="val")
  unseen = metrics.unseen_in_training(["A"], ["A", "B"], doc.codes)
  got = metrics.evaluate([doc], [_coded({"B"})], unseen_codes=unseen, ks=())
  assert got["unseen_micro_recall"] == 0.5 and got["unseen_micro_precision"] == 1.0


@pytest.mark.parametrize("seed", [4, 5])
def test_evaluate_unseen_metrics_match_sklearn(seed):
  codes, gold, pred = _random_sets(seed)
  train_gold, gold = gold[:8], gold[8:]  # a small training split leaves many codes unseen
  # Some predict C29, a code of the space that no note has (no training note either).
  pred = [p | ({codes[-1]} if i % 4 == 0 else set()) for i, p in enumerate(pred[8:])]
  docs = [Document(f"d{i}", "text", tuple(sorted(g)), split="val") for i, g in enumerate(gold)]
  unseen = metrics.unseen_in_training({c for g in train_gold for c in g}, codes,
                                      (c for d in docs for c in d.codes))
  got = metrics.evaluate(docs, [_coded(p) for p in pred], code_space=codes, unseen_codes=unseen,
                         ks=())
  labels = sorted(unseen)
  mlb = MultiLabelBinarizer(classes=labels)
  y_true = mlb.fit_transform([g & unseen for g in gold])
  y_pred = mlb.transform([p & unseen for p in pred])
  assert got["unseen_micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
  assert got["unseen_micro_precision"] == pytest.approx(
      precision_score(y_true, y_pred, average="micro"))
  assert got["unseen_micro_recall"] == pytest.approx(recall_score(y_true, y_pred, average="micro"))
  # Per column (one column alone would read as a binary target, averaged over 0 and 1).
  per_code = [f1_score(y_true[:, j], y_pred[:, j], zero_division=0) for j in range(len(labels))]
  present = y_true.sum(0) > 0
  assert present.sum() > 1
  assert got["unseen_macro_f1"] == pytest.approx(np.mean(np.asarray(per_code)[present]))
  assert got["unseen_macro_f1_all"] == pytest.approx(
      f1_score(y_true, y_pred, average="macro", zero_division=0))
  # The case the strict set exists for: false positives on unseen codes outside this gold.
  lenient = set().union(*gold) & unseen
  assert any((p & unseen) - lenient for p in pred)
  assert metrics.evaluate(docs, [_coded(p) for p in pred], unseen_codes=lenient, ks=())[
      "unseen_micro_precision"] > got["unseen_micro_precision"]


def test_f1_hand_cases():
  # gold {A,B}, pred {A,C}: TP 1, FP 1, FN 1 -> F1 = 1 / (1 + 1) = 0.5.
  got = metrics.code_f1([{"A", "B"}], [{"A", "C"}], code_space=["A", "B", "C", "D"])
  assert got["micro_f1"] == 0.5
  assert got["macro_f1"] == 0.5          # A: 1, B: 0 (C is not in gold)
  assert got["macro_f1_all"] == 0.25     # A: 1, B, C, D: 0
  assert metrics.f1_score(0, 0, 0) == 0.0
  with pytest.raises(ValueError, match="predictions"):
    metrics.code_f1([{"A"}], [])


def test_precision_at_k_hand_case():
  gold = [{"A", "B"}, {"C"}]
  scores = [{"A": 0.9, "X": 0.8, "B": 0.1}, {"Y": 0.5, "C": 0.4}]
  assert metrics.precision_at_k(gold, scores, 1) == pytest.approx((1 + 0) / 2)
  assert metrics.precision_at_k(gold, scores, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
  assert metrics.precision_at_k(gold, scores, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_evidence_scores_hand_case():
  text = "chest pain and heart failure noted"
  #       0123456789012345678901234567890123
  gold = [[("I50.9", 15, 28), ("R07.9", 0, 10)]]
  pred = [[("I50.9", 15, 28), ("R07.9", 0, 5), ("R07.9", -1, -1), ("E11.9", 29, 34)]]
  got = metrics.evidence_scores([text], gold, pred)
  # Exact spans: TP 1 (I50.9), FP 2 (R07.9 0-5, E11.9), FN 1 (R07.9 0-10).
  assert got["evidence_span_precision"] == pytest.approx(1 / 3)
  assert got["evidence_span_recall"] == pytest.approx(1 / 2)
  # Characters: I50.9 13 TP; R07.9 5 TP, 5 FN; E11.9 5 FP.
  assert got["evidence_char_precision"] == pytest.approx(18 / 23)
  assert got["evidence_char_recall"] == pytest.approx(18 / 23)
  # Tokens: I50.9 {heart, failure} TP 2; R07.9 gold {chest, pain} pred {chest}; E11.9 {noted}.
  assert got["evidence_token_precision"] == pytest.approx(3 / 4)
  assert got["evidence_token_recall"] == pytest.approx(3 / 4)
  # Documents without gold evidence are not scored.
  assert metrics.evidence_scores(["x"], [[]], [[("A00", 0, 1)]])["evidence_documents"] == 0


def test_evaluate_and_output_rates():
  text = "hypertension and diabetes"
  doc = Document("d", text, ("I10", "E11.9"), (Evidence("I10", 0, 12),), split="val")
  preds = [[CodedEvidence("I10", 0, 12, "hypertension", 0.9),
            CodedEvidence("J45.909", -1, -1, "asthma", 0.2)]]
  stats = {"predicted_lines": 3, "rejected_invalid": 1, "quoted_lines": 2, "grounded_lines": 1,
           "windows": 2, "truncated_generations": 1}
  got = metrics.evaluate([doc], preds, code_space=["I10", "E11.9", "J45.909"],
                         unseen_codes={"E11.9"}, ks=(1, 2), output_stats=stats)
  assert got["micro_f1"] == pytest.approx(1 / (1 + 0.5 * 2))
  assert got["p@1"] == 1.0 and got["p@2"] == 0.5
  assert got["unseen_micro_f1"] == 0.0
  assert got["evidence_span_f1"] == 1.0
  assert got["valid_code_rate"] == 0.75
  assert got["grounded_evidence_rate"] == 0.5
  assert got["truncated_generation_rate"] == 0.5
  assert got["truncated_line_rate"] == 0.0  # no `truncated_lines` counter: none counted


def test_output_rates_count_truncated_lines_apart():
  # 6 complete accepted lines, 1 malformed, 1 invalid, 1 duplicate, and 2 lines cut by
  # max_new_tokens (the coder counts those in truncated_lines only).
  stats = {"predicted_lines": 6, "rejected_malformed": 1, "rejected_invalid": 1,
           "rejected_duplicate": 1, "truncated_lines": 2, "quoted_lines": 4,
           "grounded_lines": 3, "windows": 4, "truncated_generations": 2}
  got = metrics.output_rates(stats)
  assert got == {"valid_code_rate": 6 / 8, "grounded_evidence_rate": 3 / 4,
                 "truncated_line_rate": 2 / 11, "truncated_generation_rate": 2 / 4}
  assert metrics.output_rates({}) == {"valid_code_rate": 0.0, "grounded_evidence_rate": 0.0,
                                      "truncated_line_rate": 0.0,
                                      "truncated_generation_rate": 0.0}


def test_span_accuracy_hand_case():
  ev = lambda code, score: CodedEvidence(code, 0, 3, "x", score)
  gold = ["I50.23", "N17.9", "E11.9", "J44.1"]
  predictions = [
      [ev("I50.9", 0.4), ev("I50.23", 0.7)],  # top-scored is right
      [ev("N17.0", 0.9)],                     # right category only
      [],                                     # no code: wrong
      [ev("J44.1", 0.5)],                     # right (an unseen code)
  ]
  got = metrics.span_accuracy(gold, predictions, unseen_codes={"J44.1", "E11.9"})
  assert got == {"span_exact": 2 / 4, "span_category": 3 / 4, "span_count": 4.0,
                 "unseen_span_exact": 1 / 2, "unseen_span_category": 1 / 2,
                 "unseen_span_count": 2.0}
  assert "unseen_span_exact" not in metrics.span_accuracy(gold, predictions)
  with pytest.raises(ValueError, match="4 spans but 1 predictions"):
    metrics.span_accuracy(gold, predictions[:1])


def test_evidence_span_documents_hand_case():
  from jaxicd.train.coding_eval import evidence_span_documents
  a = Document("a", "CHF and AKI. CHF.", ("I50.9", "N17.9"),
               (Evidence("N17.9", 8, 11), Evidence("I50.9", 0, 3), Evidence("I50.9", 13, 16)),
               split="val")
  b = Document("b", "AKI again", ("N17.9",), (Evidence("N17.9", 0, 3),), split="val")
  spans = evidence_span_documents([a, b], limit=5)
  # Distinct (quote, code) pairs in evidence order; the repeated "CHF" and "AKI" are dropped.
  assert [(s.id, s.text, s.codes) for s in spans] == [
      ("a:8-11", "AKI", ("N17.9",)), ("a:0-3", "CHF", ("I50.9",))]
  assert len(evidence_span_documents([a, b], limit=1)) == 1
  assert evidence_span_documents([a, b], limit=0) == []  # eval_coding.spans=0: off
