"""The decision threshold: chosen on validation notes (hand cases, a scikit-learn reference)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from jaxicd.eval import calibration


def test_hand_case():
  gold = [{"A", "B"}, {"C"}]
  scores = [{"A": 0.9, "B": 0.4, "X": 0.6}, {"C": 0.8, "Y": 0.95}]
  # Sorted: Y .95 (fp), A .9 (tp), C .8 (tp), X .6 (fp), B .4 (tp); 3 gold codes.
  # t=.95: tp0 -> 0; t=.9: tp1 fp1 fn2 -> 2/5; t=.8: tp2 fp1 fn1 -> 4/6; t=.6: tp2 fp2 fn1 ->
  # 4/7; t=.4: tp3 fp2 fn0 -> 6/8 = 0.75 (best).
  assert calibration.choose_threshold(gold, scores) == (0.4, 0.75)
  # Without B's low score, .8 wins (4/6 vs 4/7 at .6 and 4/8 keeping all of .6 and below).
  del scores[0]["B"]
  t, f1 = calibration.choose_threshold(gold, scores)
  assert t == 0.8 and f1 == pytest.approx(4 / 6)


def test_ties_keep_equal_scores_together_and_prefer_the_lower_threshold():
  gold = [{"A"}, {"B"}]
  # A and Z share a score: a threshold keeps both or neither.
  scores = [{"A": 0.5, "Z": 0.5}, {"B": 0.2}]
  t, f1 = calibration.choose_threshold(gold, scores)
  # t=.5: tp1 fp1 fn1 -> 0.5; t=.2: tp2 fp1 fn0 -> 0.8.
  assert (t, f1) == (0.2, pytest.approx(0.8))
  # Equal F1 at two thresholds: the lower one (more recall).
  t, _ = calibration.choose_threshold([{"A"}, set()], [{"A": 0.9}, {"Q": 0.1}])
  assert t == 0.9
  t, f1 = calibration.choose_threshold([{"A"}, {"B"}], [{"A": 0.9}, {"B": 0.1}])
  assert (t, f1) == (0.1, 1.0)


def test_no_candidates():
  assert calibration.choose_threshold([{"A"}], [{}]) == (0.0, 0.0)
  assert calibration.choose_threshold([], []) == (0.0, 0.0)
  with pytest.raises(ValueError, match="2 gold notes but 1"):
    calibration.choose_threshold([set(), set()], [{}])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_brute_force_scikit_learn_search(seed):
  rng = random.Random(seed)
  codes = [f"C{i}" for i in range(12)]
  gold = [set(rng.sample(codes, rng.randint(0, 4))) for _ in range(9)]
  scores = [{c: round(rng.random(), 2) for c in rng.sample(codes, rng.randint(0, 6))}
            for _ in range(9)]
  binarizer = MultiLabelBinarizer(classes=codes)
  y_true = binarizer.fit_transform(gold)
  best = (-1.0, None)
  for t in sorted({s for sc in scores for s in sc.values()}):
    y_pred = binarizer.transform([{c for c, s in sc.items() if s >= t} for sc in scores])
    f1 = f1_score(y_true, y_pred, average="micro", zero_division=0.0)
    if f1 > best[0] + 1e-12:  # ascending thresholds: ties keep the lower one
      best = (f1, t)
  t, f1 = calibration.choose_threshold(gold, scores)
  assert f1 == pytest.approx(max(best[0], 0.0))
  if best[0] > 0:
    assert t == best[1]


def test_save_load_and_resolve(tmp_path):
  assert calibration.load(tmp_path) is None
  assert calibration.resolve_threshold(-1.0, tmp_path)[0] == 0.0
  assert calibration.resolve_threshold(0.3, tmp_path) == (0.3, "configured")
  calibration.save(tmp_path, 0.42, step=96, split="val", documents=10)
  assert calibration.load(tmp_path)["threshold"] == 0.42
  t, origin = calibration.resolve_threshold(-1.0, tmp_path)
  assert t == 0.42 and "step 96" in origin
  assert calibration.resolve_threshold(0.0, tmp_path)[0] == 0.0  # explicit 0 keeps all
  (tmp_path / calibration.FILENAME).write_text("{not json")
  with pytest.raises(ValueError, match="calibration.json"):
    calibration.load(tmp_path)
  np.testing.assert_equal(calibration.resolve_threshold(0.5, None)[0], 0.5)


def test_stages_set_otherwise_than_at_calibration_are_named(tmp_path):
  assert calibration.mismatched_stages(tmp_path, recode=True, scan=True) == []  # none stored
  calibration.save(tmp_path, 0.4, step=8, recode=True, scan=False)
  assert calibration.mismatched_stages(tmp_path, recode=True, scan=False) == []
  assert calibration.mismatched_stages(tmp_path, recode=True, scan=True) == [
      "scan=True (calibrated with scan=False)"]
  calibration.save(tmp_path, 0.4, step=8)  # a record from before stages were stored
  assert calibration.mismatched_stages(tmp_path, recode=False, scan=True) == []
