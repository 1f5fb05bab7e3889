"""The CPU twins of configs/paper.py (document SFT vs mixed training) train and evaluate end to
end on the reader fixtures: MIMIC-IV codes and MDACE evidence, each source named."""

from __future__ import annotations

import json
import sys

import pytest

import train_worker

sys.path.insert(0, str(train_worker.ROOT / "configs"))
import paper  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return str(train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok")))


@pytest.mark.parametrize("recipe", paper.RECIPES)
def test_cpu_twin_trains_and_evaluates_on_both_sources(recipe, tokenizer_dir, tmp_path):
  from jaxicd import main  # pylint: disable=g-import-not-at-top
  config = paper.get_config(f"{recipe},cpu")
  config.model.tokenizer = tokenizer_dir
  summary = main.run(config, str(tmp_path))
  assert summary["status"] == "done" and summary["step"] == config.train.steps
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  shares = {k.rsplit("/", 1)[1]: v for r in records for k, v in r.items()
            if k.startswith("train/source_token_fraction/")}
  # Every source of the mixture is logged; doc_sft reads MDACE for evaluation only (weight 0).
  assert set(shares) == set(config.data.sources)
  if recipe == "doc_sft":
    assert shares == {"mimic": 1.0, "mdace": 0.0}
  else:
    assert sum(shares.values()) == pytest.approx(1.0)
  coded = [r for r in records if "eval/coding/micro_f1" in r]
  assert coded, "coding metrics on MIMIC-IV 'test' after training"
  for key in ("micro_f1", "macro_f1", "p@8", "p@15", "unseen_micro_f1"):
    assert f"eval/coding/{key}" in coded[-1], key
  # MDACE test: evidence scores of the same checkpoint, named source and split.
  config.mode = "eval"
  config.eval_coding.source = "mdace"
  result = main.run(config, str(tmp_path))
  assert result["step"] == config.train.steps
  for key in ("evidence_span_f1", "evidence_token_f1"):
    assert 0.0 <= result[f"coding/{key}"] <= 1.0, key
  assert result["coding/documents"] == 1
