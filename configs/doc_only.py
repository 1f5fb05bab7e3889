"""Baseline: documents only (no expansion spans), otherwise as configs/mixed.py."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mixed  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = mixed.get_config()
  config.data.update(span_weight=0.0, doc_weight=1.0, spans_per_code=0, annotated_spans=False)
  return config
