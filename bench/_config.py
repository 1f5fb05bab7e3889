"""A run config for the benches: ``load_config("configs/mixed.py")`` is that file's
``get_config()`` (a path under the repository). Not a benchmark (``make bench`` skips
``bench/_*.py``)."""

from __future__ import annotations

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
