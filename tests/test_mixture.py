"""Named data sources (``config.data.sources``, ``jaxicd.data.mixture``) in one training mixture.

A single-source config and its explicit one-source + expansion equivalent are checked against
batch digests recorded by the pipeline before named sources existed
(``tests/fixtures/golden_legacy_batches.json``).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from jaxicd.data import mixture, pipeline
from jaxicd.train.config import source_config
from test_pipeline import ByteTokenizer, make_documents, make_spans  # pylint: disable=wrong-import-order

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "golden_legacy_batches.json").read_text())


def digest(batch) -> str:
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]


def first_digests(cfg, n=5):
  it = pipeline.make_train_iterator(cfg, ByteTokenizer(), with_sources=True, prefetch=0)
  return [digest(next(it)) for _ in range(n)]


def equivalent_sources(cfg) -> ml_collections.ConfigDict:
  """The single-source keys of `cfg` written as named sources: expansion spans, with the demo
  corpus's gold evidence pooled into them, and the demo documents."""
  sources = ml_collections.ConfigDict()
  sources.codes = source_config(
      reader="expansion", role="spans", weight=cfg["span_weight"],
      options=dict(code_space=cfg["code_space"], spans_per_code=cfg["spans_per_code"],
                   negatives=cfg["negatives"], seed=0))
  sources.demo = source_config(reader="demo", role="both", weight=cfg["doc_weight"],
                               pool="codes", options=dict(demo_seed=cfg["demo_seed"]))
  return sources


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_single_source_batches_are_unchanged_bit_for_bit(case):
  cfg = {**GOLDEN["base"], **GOLDEN["cases"][case]["config"]}
  assert first_digests(cfg) == GOLDEN["cases"][case]["batches"]


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_explicit_sources_equal_to_the_single_source_keys_give_the_same_batches(case):
  cfg = {**GOLDEN["base"], **GOLDEN["cases"][case]["config"]}
  named = {**cfg, "sources": equivalent_sources(cfg),
           # Ignored with named sources: set wrong so that a leak shows.
           "source": "jsonl", "span_weight": 0.01, "doc_weight": 5.0, "code_space": "all"}
  assert first_digests(named) == GOLDEN["cases"][case]["batches"]
