"""Code notes with the adapters configs/mixed.py trained (the embedded default):

  python -m jaxicd.main --config=configs/predict.py --workdir=runs/mixed --config.input=note.txt

Writes <workdir>/predictions.jsonl (see jaxicd/infer/predict.py). For a run trained with another
config, run that config with --config.mode=predict: the model and LoRA settings must match the
checkpoint's.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mixed  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = mixed.get_config()
  config.mode = "predict"
  # Whole notes rather than the 2 validation notes training codes: a larger answer budget.
  config.eval_coding.update(max_new_tokens=128)
  return config
