"""Baseline: spans only (expansion + annotated evidence), no documents; else as mixed."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mixed  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = mixed.get_config()
  config.data.update(span_weight=1.0, doc_weight=0.0)
  return config
