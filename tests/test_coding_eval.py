"""The coding eval hook: the threshold is calibrated on val notes, stored, and applied on test."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from jaxicd.data import prompts
from jaxicd.eval import calibration
from jaxicd.infer import coder as coder_lib
from jaxicd.infer.generate import Generation
from jaxicd.train import coding_eval
from jaxicd.train.config import base_config

WRONG = "I16.1"  # a demo code, never gold in the notes used below (checked)


@pytest.fixture(scope="module")
def tok():
  from jaxicd.model.tokenizer import load_tokenizer
  return load_tokenizer("smollm2")


def _cfg(split):
  cfg = base_config()
  cfg.data.update(source="demo", code_space="demo", seq_len=256, window_overlap=32,
                  answer_format="code_first")
  cfg.eval_coding.update(documents=2, split=split, calibrate=True, recode=False,
                         max_new_tokens=32)
  return cfg


def _scripted(tok, gold_of_window):
  """Each window: its note's first gold code at p=0.9, then WRONG at p=0.3."""
  def generate(batch):
    rows = []
    for ids in batch:
      first = gold_of_window(tok.decode(ids))
      lines = [(first, 0.9), (WRONG, 0.3)]
      out, lp = [], []
      for j, (code, p) in enumerate(lines):
        ids_code = tok.encode(code)
        out += ids_code + (tok.encode("\n") if j == 0 else [])
        lp += [math.log(p)] * len(ids_code) + ([0.0] if j == 0 else [])
      rows.append((out + [tok.end_of_turn_id], lp + [0.0]))
    width = max(len(r[0]) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    logprobs = np.zeros((len(rows), width), np.float32)
    for i, (o, lp) in enumerate(rows):
      tokens[i, :len(o)], logprobs[i, :len(lp)] = o, lp
    return Generation(tokens, np.array([len(r[0]) for r in rows], np.int32), logprobs,
                      np.ones(len(rows), bool))
  return generate


def _hook(cfg, tok):
  hook = coding_eval.CodingEval(cfg, tok)
  assert all(WRONG not in d.codes for d in hook.documents)

  def gold_of_window(prompt_text):
    body = prompt_text.split(prompts.INSTRUCTION + "\n\n", 1)[1].split("<|im_end|>", 1)[0]
    return next(d.codes[0] for d in hook.documents if body.strip() in d.text)
  hook._coder = coder_lib.Coder(None, tok, code_space="demo", seq_len=256, window_overlap=32,
                                max_new_tokens=32, generate_fn=_scripted(tok, gold_of_window))
  return hook


def _trainer(workdir):
  printed = []
  return types.SimpleNamespace(model=None, workdir=workdir, is_chief=True, print=printed.append,
                               printed=printed)


def test_val_calibrates_and_test_applies_the_stored_threshold(tok, tmp_path):
  val = _hook(_cfg("val"), tok)
  val.report_path = tmp_path / "report.val.html"
  trainer = _trainer(tmp_path)
  result = val(trainer, 7)
  record = json.loads((tmp_path / calibration.FILENAME).read_text())
  # Every window says the right code at 0.9 and a wrong one at 0.3: 0.9 separates them.
  assert record["threshold"] == pytest.approx(0.9, rel=1e-5)
  assert record["step"] == 7 and record["split"] == "val" and record["documents"] == 2
  assert result["coding/threshold"] == pytest.approx(0.9, rel=1e-5)
  assert result["coding/micro_precision"] == 1.0
  assert result["coding/uncalibrated_micro_f1"] < result["coding/micro_f1"]
  assert "calibrated on these 2 notes" in trainer.printed[-1]
  # Eval mode's report: both notes, each with its first gold code highlighted (kept at 0.9),
  # WRONG (0.3, below the threshold) nowhere.
  html = val.report_path.read_text()
  for d in val.documents:
    assert f'data-document="{d.id}"' in html and f'data-code="{d.codes[0]}"' in html
  assert f'data-code="{WRONG}"' not in html

  # On test notes calibrate is ignored: the stored threshold is applied, not re-chosen.
  calibration.save(tmp_path, 0.5, step=7, split="val", documents=2)
  test = _hook(_cfg("test"), tok)
  result = test(trainer, 7)
  assert result["coding/threshold"] == 0.5
  assert json.loads((tmp_path / calibration.FILENAME).read_text())["threshold"] == 0.5
  assert result["coding/micro_precision"] == 1.0  # WRONG (0.3) dropped at 0.5
  assert "calibrated on val at step 7" in trainer.printed[-1]
