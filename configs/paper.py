"""The paper's comparison on real data: document SFT on MIMIC-IV vs mixed training at ~20% of
its tokens, as one config file (``--config=configs/paper.py:<recipe>[,cpu]``):

* ``doc_sft``: Llama-3.1-8B (configs/llama31_8b_tpu.py, TPU v5e-32) on MIMIC-IV ICD-10 documents,
  Edin et al.'s split, codes with >= 10 occurrences (as Edin et al. do);
* ``mixed``: MDACE evidence documents (their gold evidence also as span examples, pooled with
  the code-system expansion spans) + expansion spans + a tenth of the MIMIC-IV training
  documents, for a fifth of doc_sft's steps (same rows and seq_len: ~20% of its tokens).

Both are evaluated on MIMIC-IV test (codes: micro/macro F1, P@8, P@15, strict unseen-code F1)
during training, and on MDACE test (evidence span/token F1) by an eval run on the checkpoint:

  python -m jaxicd.main --config=configs/paper.py:mixed --workdir=gs://.../mixed \\
      --config.mode=eval --config.eval_coding.source=mdace

``,cpu``: the CPU twin of a recipe: the random ``tiny`` model (set --config.model.tokenizer to a
tokenizer that fits its 512 ids, as tests/test_paper_configs.py does), the reader fixtures in
tests/fixtures, a few steps. The fixtures have no test notes: their validation notes stand in
(split mapping test <- val), every code counts (min_code_count=1) and mixed keeps MIMIC-IV's
one training note.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import llama31_8b_tpu  # noqa: E402
import tiny  # noqa: E402
from jaxicd.train.config import source_config  # noqa: E402

RECIPES = ("doc_sft", "mixed")
DOC_SFT_STEPS = 2_500   # x 64 rows x 4096 = 0.66 B tokens: ~3 epochs of MIMIC-IV's training notes
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "fixtures")


def get_config(arg: str = "mixed") -> ml_collections.ConfigDict:
  recipe, _, scale = arg.partition(",")
  if recipe not in RECIPES or scale not in ("", "cpu"):
    raise ValueError(f"configs/paper.py:{arg}: expected <recipe>[,cpu] with recipe one of "
                     f"{', '.join(RECIPES)}")
  cpu = scale == "cpu"
  config = tiny.get_config() if cpu else llama31_8b_tpu.get_config()
  # The single-source keys of the base recipe give way to named sources.
  config.data.update(source="demo", manual_dir="", on_error="skip")
  mimic_dir = os.path.join(FIXTURES, "mimic_iv") if cpu else "/mnt/data/mimic"
  mdace_dir = os.path.join(FIXTURES, "mdace") if cpu else "/mnt/data/mdace"
  # Edin et al.'s split: <manual_dir>/mimiciv_icd10_split.feather (or .csv), found by the reader.
  held_out = dict(test="val") if cpu else {}
  mimic = source_config(reader="mimic_iv", manual_dir=mimic_dir, role="documents",
                        options=dict(min_code_count=1 if cpu else 10), splits=held_out)
  # MDACE is read in both recipes: its test notes score the evidence.
  mdace = source_config(reader="mdace", manual_dir=mdace_dir, role="documents",
                        splits=held_out)
  sources = config.data.sources
  steps = 10 if cpu else DOC_SFT_STEPS
  if recipe == "doc_sft":
    mimic.weight = 1.0
    mdace.splits.train = ""            # evaluation only
    sources.mimic, sources.mdace = mimic, mdace
  else:
    # A tenth of MIMIC-IV's training notes (the fixture has one: all of it on CPU).
    mimic.update(weight=0.2, fraction=1.0 if cpu else 0.1)
    mdace.update(role="both", weight=0.3, pool="codes")
    sources.mimic, sources.mdace = mimic, mdace
    sources.codes = source_config(
        reader="expansion", role="spans", weight=0.5,
        options=dict(code_space="demo" if cpu else "all", spans_per_code=2 if cpu else 8,
                     negatives=True, seed=0))
    steps = max(1, steps // 5)         # ~20% of doc_sft's tokens (same rows x seq_len per step)
  config.data.mixture_unit = "tokens"
  config.train.update(steps=steps, eval_source="mimic", eval_split="val")
  config.eval_coding.update(source="mimic", split="test", documents=1 if cpu else 500)
  if cpu:
    # The byte-level test tokenizer has no single " |" token: decode unconstrained, briefly.
    config.train.update(eval_every=0, eval_batches=1, warmup_steps=1)
    config.eval_coding.update(max_new_tokens=8, batch_size=4, constrained=False, recode=False)
    config.data.update(batch_size=4, seq_len=256)
  else:
    config.train.update(warmup_steps=min(500, steps // 10), eval_every=max(steps // 5, 1))
  return config
