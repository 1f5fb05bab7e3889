"""Named data sources (``config.data.sources``, ``jaxicd.data.mixture``) in one training mixture.

A single-source config and its explicit one-source + expansion equivalent are checked against
batch digests of the single-source pipeline (``tests/fixtures/golden_legacy_batches.json``:
recorded before named sources existed, re-recorded by the same keys when the demo corpus
changed).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from jaxicd.data import mixture, pipeline
from jaxicd.train.config import base_config, source_config
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
  """Digests of the first `n` batches of the data config `cfg` (a dict of the keys the recorded
  run set; every other key takes its base_config() default, as it did then)."""
  data = base_config().data
  data.update(cfg)
  it = pipeline.make_train_iterator(data, ByteTokenizer(), with_sources=True, prefetch=0)
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


# --- three named sources from the reader fixtures ----------------------------------------------
# tests/fixtures/README.md: MIMIC-IV has one ICD-10 training admission and one validation one
# (the others are filtered or unsplit), MDACE two training admissions and one validation one.


def three_sources(**changes) -> ml_collections.ConfigDict:
  config = base_config()
  config.data.update(seq_len=512, batch_size=4, num_threads=0, answer_format="code_first",
                     on_error="skip")
  sources = config.data.sources
  sources.mimic = source_config(reader="mimic_iv", manual_dir=str(FIXTURES / "mimic_iv"),
                                weight=0.3)
  sources.mdace = source_config(reader="mdace", manual_dir=str(FIXTURES / "mdace"), role="both",
                                weight=0.2, pool="codes")
  sources.codes = source_config(reader="expansion", role="spans", weight=0.5,
                                options=dict(code_space="demo", spans_per_code=2))
  for key, value in changes.items():
    name, field = key.split("__")
    sources[name][field] = value
  return config


def test_components_follow_roles_pools_and_split_mappings():
  config = three_sources()
  parts = {p.name: p for p in mixture.components(config.data)}
  assert [(n, p.kind, p.weight) for n, p in parts.items()] == [
      ("codes", "spans", 0.5), ("mdace", "documents", 0.2), ("mimic", "documents", 0.3)]
  assert len(parts["mdace"].records) == 2 and len(parts["mimic"].records) == 1
  # The pool: expansion spans first, then MDACE's training evidence, quote by quote.
  mdace_train = parts["mdace"].records
  gold = []
  for doc in mdace_train:
    for ev in doc.evidence:
      pair = (doc.text[ev.begin:ev.end].strip(), ev.code)
      if pair not in gold:
        gold.append(pair)
  codes = parts["codes"].records
  assert [(s.text, s.code) for s in codes[len(codes) - len(gold):]] == gold
  assert all(s.origin != "annotated" for s in codes[:len(codes) - len(gold)])
  # A split mapping: MDACE's val notes become the run's test notes, its train notes none.
  remapped = three_sources(mdace__splits=ml_collections.ConfigDict(
      dict(train="", val="", test="val")))
  docs = mixture.source_documents(remapped.data, "mdace")
  original = [d for d in mixture.source_documents(config.data, "mdace") if d.split == "val"]
  assert [d.split for d in docs] == ["test"] and docs[0].text == original[0].text


def test_fraction_keeps_an_evenly_spread_part():
  assert mixture.evenly_spread(list(range(10)), 0.3) == [0, 3, 6]
  assert mixture.evenly_spread(list(range(4)), 1.0) == [0, 1, 2, 3]
  assert mixture.evenly_spread(list(range(7)), 0.5) == [0, 1, 3, 5]   # round(3.5) = 4


def test_three_sources_mix_by_their_weights():
  config = three_sources()
  it = pipeline.make_train_iterator(config.data, ByteTokenizer(), with_sources=True, prefetch=0)
  assert it.summary["source_ids"] == {"codes": 1, "mdace": 2, "mimic": 3}
  examples = dict.fromkeys(it.summary["source_ids"], 0)
  for _ in range(40):
    for name, c in pipeline.count_sources(next(it), it.summary["source_ids"]).items():
      examples[name] += c["examples"]
  total = sum(examples.values())
  for name, weight in (("codes", 0.5), ("mdace", 0.2), ("mimic", 0.3)):
    # Each document here fits one window, so example shares follow the example weights.
    assert abs(examples[name] / total - weight) < 0.06, (name, examples)


def test_resume_mid_epoch_restores_every_source(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = three_sources()
  config.data.num_threads = 2   # reader threads and the prefetch thread, as in training
  it = pipeline.make_train_iterator(config.data, ByteTokenizer(), with_sources=True)
  for _ in range(5):   # a few dozen of the 786 + evidence spans: mid-epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  expected = [next(it) for _ in range(4)]
  assert {int(s) for b in expected for s in np.unique(b["sources"])} == {0, 1, 2, 3}
  restored = pipeline.make_train_iterator(config.data, ByteTokenizer(), with_sources=True)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.restore(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  fresh = pipeline.make_train_iterator(config.data, ByteTokenizer(), with_sources=True)
  fresh.set_state(state)
  for other in (restored, fresh):
    for want in expected:
      got = next(other)
      for k in list(pipeline.BATCH_KEYS) + ["sources"]:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    other.close()
  it.close()


def test_eval_iterator_reads_the_named_source_and_split():
  config = three_sources()
  it = pipeline.make_eval_iterator(config.data, ByteTokenizer(), "val", source="mdace")
  list(it)
  assert it.stats.documents_encoded == 1   # MDACE's one validation admission
  everything = pipeline.make_eval_iterator(config.data, ByteTokenizer(), "val")
  list(everything)
  assert everything.stats.documents_encoded == 2   # and MIMIC-IV's
  with pytest.raises(ValueError, match="no 'test' documents to evaluate on"):
    pipeline.make_eval_iterator(config.data, ByteTokenizer(), "test", source="mimic")


def test_trained_codes_are_those_of_weighted_training_documents():
  config = three_sources()
  mimic = [d for d in mixture.source_documents(config.data, "mimic") if d.split == "train"]
  mdace = [d for d in mixture.source_documents(config.data, "mdace") if d.split == "train"]
  assert mixture.trained_codes(config.data) == {c for d in mimic + mdace for c in d.codes}
  config.data.sources.mimic.weight = 0.0
  assert mixture.trained_codes(config.data) == {c for d in mdace for c in d.codes}


@pytest.mark.parametrize("change, message", [
    (dict(mimic__reader="mimic3"),
     r"^config\.data\.sources\.mimic\.reader='mimic3': choose one of demo, mimic_iv"),
    (dict(mimic__role="evidence"),
     r"^config\.data\.sources\.mimic\.role='evidence': choose one of documents, spans, both$"),
    (dict(codes__role="both"), r"^config\.data\.sources\.codes\.role='both': reader "),
    (dict(mimic__weight=-0.1), r"^config\.data\.sources\.mimic\.weight=-0\.1: must be >= 0$"),
    (dict(mimic__span_weight=0.1), r"^config\.data\.sources\.mimic\.span_weight=0\.1 is for "),
    (dict(mimic__fraction=0.0), r"^config\.data\.sources\.mimic\.fraction=0\.0: must be in"),
    (dict(mdace__span_weight=0.3),
     r"^config\.data\.sources\.mdace\.span_weight=0\.3 is unused: its spans join 'codes'"),
    (dict(mdace__pool="mimic"), r"^config\.data\.sources\.mdace\.pool='mimic': must name "),
    (dict(mimic__manual_dir=""), r"^config\.data\.sources\.mimic\.manual_dir is empty"),
])
def test_bad_source_entries_are_refused_naming_the_key(change, message):
  from jaxicd.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from jaxicd.train.config import validate  # pylint: disable=g-import-not-at-top
  config = three_sources(**change)
  with pytest.raises(ConfigError, match=message) as info:
    validate(config)
  assert "\n" not in str(info.value)


def test_bad_splits_options_and_names_are_refused():
  from jaxicd.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from jaxicd.train.config import validate  # pylint: disable=g-import-not-at-top
  config = three_sources()
  config.data.sources.mimic.splits.test = "dev"
  with pytest.raises(ConfigError, match=r"^config\.data\.sources\.mimic\.splits\.test='dev': "
                                        r"choose one of train, val, test or '' \(none\)$"):
    validate(config)
  config = three_sources()
  config.data.sources.mimic.options.min_count = 10
  with pytest.raises(ConfigError, match=r"^config\.data\.sources\.mimic\.options: min_count "
                                        r"unknown to reader 'mimic_iv' \(it takes: split_file, "
                                        r"min_code_count\)$"):
    validate(config)
  config = three_sources()
  config.data.sources.mimic.wieght = 0.1
  with pytest.raises(ConfigError, match=r"config\.data\.sources\.mimic\.wieght: unknown key "
                                        r"\(did you mean 'weight'\?\)"):
    validate(config)
  config = three_sources()
  config.eval_coding.source = "codes"
  with pytest.raises(ConfigError, match=r"^config\.eval_coding\.source='codes': no document "
                                        r"source of that name in config\.data\.sources "
                                        r"\(mdace, mimic\)$"):
    validate(config)
  config = three_sources()
  config.data.source = "mimic_iv"
  with pytest.raises(ConfigError, match=r"^config\.data\.source='mimic_iv' is not used when"):
    validate(config)


def test_a_weight_without_data_is_refused_naming_the_key():
  from jaxicd.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from jaxicd.train.config import validate, validate_data  # pylint: disable=g-import-not-at-top
  config = three_sources()
  config.data.sources.mimic.splits.train = ""
  validate(config)
  with pytest.raises(ConfigError, match=r"^config\.data\.sources\.mimic\.weight=0\.3 but source "
                                        r"'mimic' gives no training documents \(its split "
                                        r"mapping train='', fraction=1\.0\); set it to 0$"):
    validate_data(config, ByteTokenizer(), mixture.documents(config.data))
  config = three_sources()
  config.train.update(eval_source="mimic", eval_split="test")
  with pytest.raises(ConfigError, match=r"^no 'test' documents in source 'mimic' "
                                        r"\(config\.train\.eval_source='mimic'\), but the "
                                        r"validation loss need them"):
    validate_data(config, ByteTokenizer(), mixture.documents(config.data))


def test_per_source_shares_for_the_log_and_metrics():
  from jaxicd import progress  # pylint: disable=g-import-not-at-top
  from jaxicd.train import trainer  # pylint: disable=g-import-not-at-top
  # Two rows by hand: source 1 (3 tokens, 1 example), source 2 (5 tokens, 2 examples),
  # source 3 (2 tokens, 1 example); 0 is padding.
  batch = {"segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 2, 2, 3, 3, 0, 0]]),
           "sources": np.array([[1, 1, 1, 2, 2, 2, 0, 0], [2, 2, 3, 3, 1, 1, 0, 0]]),
           "loss_weights": np.array([[0, 1, 1, 0, 1, 1, 0, 0], [0, 1, 0, 1, 0, 1, 0, 0]],
                                    np.float32)}
  # Row 2: source 2 tokens 2 (one example), source 3 tokens 2 (one), source 1 tokens 2 (one).
  summary = {"source_ids": {"a": 1, "b": 2, "c": 3},
             "source_kinds": {"a": "spans", "b": "documents", "c": "documents"}}
  counts = trainer._token_kind_counts([batch], summary)  # pylint: disable=protected-access
  assert counts["span"] == 5 and counts["doc"] == 7
  assert counts["span_target"] == 3 and counts["doc_target"] == 4
  shares = progress.source_shares(counts)
  assert shares == pytest.approx({
      "source_token_fraction/a": 5 / 12, "source_token_fraction/b": 5 / 12,
      "source_token_fraction/c": 2 / 12, "source_example_fraction/a": 2 / 5,
      "source_example_fraction/b": 2 / 5, "source_example_fraction/c": 1 / 5})
  assert progress.describe_shares(shares) == (
      "; sources (tokens/examples): a 42%/40%, b 42%/40%, c 17%/20%")


def test_training_progress_reports_per_source_shares():
  from jaxicd import progress  # pylint: disable=g-import-not-at-top
  p = progress.TrainingProgress(total_steps=4)
  base = dict(span=0.0, doc=0.0, span_target=0.0, doc_target=0.0)
  # The first step (compile) is timed apart; its counts still go to the window and the totals.
  p.step_done(1.0, 8, {**base, "span": 6, "doc": 2, "source:a:tokens": 6, "source:a:examples": 3,
                       "source:b:tokens": 2, "source:b:examples": 1})
  p.step_done(1.0, 8, {**base, "span": 2, "doc": 6, "source:a:tokens": 2, "source:a:examples": 1,
                       "source:b:tokens": 6, "source:b:examples": 1})
  rates, text = p.report(step=2)
  # Tokens a 8 / b 8; examples a 4 / b 2.
  assert rates["source_token_fraction/a"] == rates["source_token_fraction/b"] == 0.5
  assert rates["source_example_fraction/a"] == pytest.approx(4 / 6)
  assert "; sources (tokens/examples): a 50%/67%, b 50%/33%" in text
  p.step_done(1.0, 8, {**base, "span": 0, "doc": 8, "source:b:tokens": 8, "source:b:examples": 2})
  rates, _ = p.report(step=3)  # a new window: b only
  assert rates["source_token_fraction/b"] == 1.0 and "source_token_fraction/a" not in rates
  summary = p.summary()  # the run: a 8 of 24 tokens, 4 of 8 examples
  assert summary["source_token_fraction/a"] == pytest.approx(8 / 24)
  assert summary["source_example_fraction/b"] == pytest.approx(4 / 8)
  assert p.totals_line().endswith("; sources (tokens/examples): a 33%/50%, b 67%/50%")


def test_plan_counts_each_named_source():
  """mode=plan's per-source epoch: records and tokens of each source, counted here by hand from
  the same records (every record sampled, so the counts are exact)."""
  from jaxicd import cost_model  # pylint: disable=g-import-not-at-top
  from jaxicd.data import windows  # pylint: disable=g-import-not-at-top
  config = three_sources()
  tok = ByteTokenizer()
  stats = cost_model.data_statistics(config.data, tok, sample_documents=0, sample_spans=0,
                                     packing_batches=1)
  parts = {p.name: p for p in mixture.components(config.data)}
  per_source = stats["epoch_tokens"]["sources"]
  assert set(per_source) == {"codes", "mdace", "mimic"}
  # Fixture sizes (tests/fixtures/README.md): 1 MIMIC-IV and 2 MDACE training admissions.
  assert per_source["mimic"]["records"] == 1 and per_source["mdace"]["records"] == 2
  assert per_source["codes"]["records"] == len(parts["codes"].records)
  for name in ("mimic", "mdace"):
    by_hand = sum(len(w.tokens) - 1 for d in parts[name].records for w in windows.document_windows(
        d, tok, seq_len=512, window_overlap=int(config.data.window_overlap),
        answer_format="code_first"))
    assert per_source[name]["tokens"] == by_hand
  by_hand = sum(len(windows.encode_span(tok, s, 512, answer_format="code_first")["tokens"]) - 1
                for s in parts["codes"].records)
  assert per_source["codes"]["tokens"] == by_hand
  assert stats["epoch_tokens"]["documents"] == per_source["mimic"]["tokens"] + per_source[
      "mdace"]["tokens"]
