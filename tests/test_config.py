"""Run config validation: a config that cannot work is refused before anything is written.

Each refusal used to surface late or not at all: `data.seq_len=16` trained to the end with 0
answer tokens (loss 0.0, val loss NaN, exit 0), `train.steps=-1` exited 0, a missing eval split
failed after every training step had run, a mistyped key in a config file was silently ignored,
and `config.<mode>.json` was written before any check (a refused run overwrote the record of
the good one).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

from jaxicd import errors  # pylint: disable=wrong-import-position

TEXT = "Essential hypertension. Type 2 diabetes mellitus without complications."
GOOD_RECORD = '{"recorded": "by the good run"}'


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


def _notes(path: pathlib.Path, *splits: str) -> str:
  """A JSONL source with one note per split in `splits`."""
  path.write_text("".join(json.dumps({
      "id": f"n{i}", "text": TEXT, "codes": ["I10", "E11.9"], "split": split,
      "evidence": [{"code": "I10", "begin": 0, "end": 22}]}) + "\n"
                          for i, split in enumerate(splits)))
  return str(path)


def _unknown_data_key(config, tmp_path):
  config.data.spans_per_cod = 4  # a typo in a config file: used to be ignored


def _unknown_section(config, tmp_path):
  config.trian = dict(steps=3)


def _no_val_split(config, tmp_path):
  config.data.update(source="jsonl", manual_dir=_notes(tmp_path / "d.jsonl", "train", "test"))


def _no_coding_split(config, tmp_path):
  config.data.update(source="jsonl", manual_dir=_notes(tmp_path / "d.jsonl", "train", "val"))
  config.eval_coding.update(documents=2, split="test")


def _no_span_source(config, tmp_path):
  config.data.update(spans_per_code=0, annotated_spans=False)


def _no_annotated_spans(config, tmp_path):
  # Annotated spans come from the evidence of training notes: these have none.
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"id": f"n{i}", "text": TEXT, "codes": ["I10"],
                                      "split": s}) + "\n" for i, s in enumerate(["train", "val"])))
  config.data.update(source="jsonl", manual_dir=str(path), spans_per_code=0,
                     annotated_spans=True)


def _no_train_documents(config, tmp_path):
  config.data.update(source="jsonl", manual_dir=_notes(tmp_path / "d.jsonl", "val", "test"),
                     span_weight=0.5, doc_weight=0.5)


CASES = {
    "unknown key": (_unknown_data_key,
                    r"config\.data\.spans_per_cod: unknown key \(did you mean "
                    r"'spans_per_code'\?\); valid keys of config\.data: annotated_spans, "
                    r"answer_format, .*spans_per_code, .*window_overlap"),
    "unknown section": (_unknown_section,
                        r"config\.trian: unknown key \(did you mean 'train'\?\); valid keys of "
                        r"config: .*eval_coding, .*train"),
    "seq_len": (lambda c, _: c.data.update(seq_len=16),
                r"config\.data\.seq_len=16 is too short: the prompt with an empty note and a "
                r"one-code answer \(data\.answer_format='evidence_first'\) takes \d+ tokens"),
    "steps 0": (lambda c, _: c.train.update(steps=0), r"config\.train\.steps=0: must be >= 1"),
    "steps -1": (lambda c, _: c.train.update(steps=-1), r"config\.train\.steps=-1: must be >= 1"),
    "no val split": (_no_val_split,
                     r"no 'val' documents in data\.source='jsonl' \(it has train, test\), but "
                     r"validation loss needs them \(config\.train\.eval_batches=1\)"),
    "no coding split": (_no_coding_split,
                        r"no 'test' documents in data\.source='jsonl' \(it has train, val\), but "
                        r"coding metrics need them \(config\.eval_coding\.split='test'"),
    "no span source": (_no_span_source,
                       r"config\.data\.span_weight=1\.0 but there is no span source: "
                       r"data\.spans_per_code=0, data\.annotated_spans=False and no "
                       r"data\.span_files"),
    "no annotated spans": (_no_annotated_spans,
                           r"config\.data\.span_weight=1\.0 but there is no span source: "
                           r"data\.spans_per_code=0, .*the 'train' documents of "
                           r"data\.source='jsonl' have no evidence to make annotated spans"),
    "no train documents": (_no_train_documents,
                           r"config\.data\.doc_weight=0\.5 but data\.source='jsonl' has no "
                           r"'train' documents \(it has val, test\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_train_config_is_refused_before_any_side_effect(case, tok, tmp_path):
  """Each case is a `jaxicd.errors.ConfigError` naming the key, raised before the workdir is
  created, and a refused run leaves the config recorded by a good one untouched."""
  from jaxicd import main
  change, message = CASES[case]
  config = train_worker.tiny_config(tok, steps=3)
  change(config, tmp_path)
  fresh = tmp_path / "fresh"
  with pytest.raises(errors.ConfigError, match=message):
    main.run(config, str(fresh))
  assert not fresh.exists()
  used = tmp_path / "used"
  used.mkdir()
  (used / "config.train.json").write_text(GOOD_RECORD)
  with pytest.raises(errors.ConfigError, match=message):
    main.run(config, str(used))
  assert [p.name for p in used.iterdir()] == ["config.train.json"]
  assert (used / "config.train.json").read_text() == GOOD_RECORD


def test_eval_mode_needs_the_val_split_and_room_for_answers(tok, tmp_path):
  from jaxicd import main
  config = train_worker.tiny_config(tok, steps=3)
  config.mode = "eval"
  _no_val_split(config, tmp_path)
  with pytest.raises(errors.ConfigError, match=r"no 'val' documents .*validation loss needs"):
    main.run(config, str(tmp_path / "run"))
  config = train_worker.tiny_config(tok, steps=3)
  config.mode = "eval"
  config.data.seq_len = 16
  with pytest.raises(errors.ConfigError, match=r"config\.data\.seq_len=16 is too short"):
    main.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_seq_len_bound_is_the_prompt_plus_a_one_code_answer(tok):
  """The bound in the message is exact: one token less is refused, the bound itself passes."""
  import re
  from jaxicd.model.tokenizer import load_tokenizer
  from jaxicd.train import config as config_lib
  tokenizer = load_tokenizer(str(tok))
  for answer_format in ("evidence_first", "code_first"):
    config = train_worker.tiny_config(tok, steps=3)
    config.data.update(seq_len=8, answer_format=answer_format)
    with pytest.raises(errors.ConfigError) as e:
      config_lib.validate_data(config, tokenizer, [])
    needed = int(re.search(r"takes (\d+) tokens", str(e.value)).group(1))
    # The chat template alone (system prompt, instruction, headers) is > 100 bytes.
    assert needed > 100, needed
    assert f"set config.data.seq_len >= {needed - 1}" in str(e.value)
    config.data.update(seq_len=needed - 2)
    with pytest.raises(errors.ConfigError, match="too short"):
      config_lib.validate_data(config, tokenizer, [])
    config.data.update(seq_len=needed - 1, span_weight=1.0, doc_weight=0.0,
                       spans_per_code=1)
    config.train.update(eval_batches=0)
    config_lib.validate_data(config, tokenizer, [])


CONFIG_FILES = sorted(p.name for p in (train_worker.ROOT / "configs").glob("*.py"))


def _shipped_config(config_file: str):
  """``get_config()`` of a configs/ file, loaded as ``--config=configs/<file>`` loads it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("_cfg", train_worker.ROOT / "configs" / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_shipped_configs_validate(config_file):
  """Every configs/ file passes the checks that need no data (keys, values)."""
  from jaxicd.train import config as config_lib
  config_lib.validate(_shipped_config(config_file))


def test_value_checks_name_the_key():
  from jaxicd.train import config as config_lib
  cases = [
      (dict(train=dict(lr=0.0)), r"config\.train\.lr=0\.0: must be > 0"),
      (dict(train=dict(grad_accum=0)), r"config\.train\.grad_accum=0: must be >= 1"),
      (dict(data=dict(batch_size=0)), r"config\.data\.batch_size=0: must be >= 1"),
      (dict(data=dict(window_overlap=-1)), r"config\.data\.window_overlap=-1: must be >= 0"),
      (dict(data=dict(answer_format="quote_first")),
       r"config\.data\.answer_format='quote_first': choose one of code_first, evidence_first"),
      (dict(data=dict(mixture_unit="bytes")),
       r"config\.data\.mixture_unit='bytes': choose one of examples, tokens"),
      (dict(data=dict(span_weight=0.0, doc_weight=0.0)),
       r"config\.data\.span_weight=0\.0, config\.data\.doc_weight=0\.0: at least one must be > 0"),
      (dict(data=dict(span_weight=-1.0)), r"config\.data\.span_weight=-1\.0: must be >= 0"),
      (dict(eval_coding=dict(split="dev")),
       r"config\.eval_coding\.split='dev': choose one of train, val, test"),
      (dict(eval_coding=dict(max_new_tokens=256, documents=2)),
       r"config\.eval_coding\.max_new_tokens=256 leaves no room for a prompt in "
       r"config\.data\.seq_len=256"),
  ]
  for changes, message in cases:
    config = config_lib.base_config()
    config.data.seq_len = 256
    for section, values in changes.items():
      config[section].update(values)
    with pytest.raises(errors.ConfigError, match=message):
      config_lib.validate(config)


@pytest.mark.parametrize("override,message", [
    ("--config.train.steps=-1", "error: config.train.steps=-1: must be >= 1"),
    ("--config.data.seq_len=16", "error: config.data.seq_len=16 is too short"),
])
def test_command_line_refusal_exits_2_with_one_line(override, message, tok, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxicd.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", f"--config.model.tokenizer={tok}", override],
      capture_output=True, text=True, cwd=str(train_worker.ROOT),
      env=train_worker.subprocess_env(), timeout=300)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
  assert not (tmp_path / "run").exists()


def _keys(config, prefix: str = "") -> set[str]:
  """Dotted names of every key of a config; an empty section counts as one key."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  out = set()
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      out |= _keys(value, name + ".")
    else:
      out.add(name)
  return out


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_configs_set_only_base_config_keys(config_file):
  """configs/ files change base_config() values; none adds a key (the one schema). Named data
  sources are entries of `data.sources`, each with exactly source_config()'s keys."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from jaxicd.train import config as config_lib
  config = _shipped_config(config_file)
  sources = dict(config.data.sources)
  config.data.sources = ml_collections.ConfigDict()
  assert _keys(config) == _keys(config_lib.base_config())
  for entry in sources.values():
    assert set(entry.keys()) == set(config_lib.source_config().keys())


def test_base_config_defaults_reach_the_code(tok):
  """Code reads base_config()'s defaults, not defaults of its own (values computed by hand)."""
  from jaxicd.data import pipeline
  from jaxicd.data.records import Document, Span
  from jaxicd.model.tokenizer import load_tokenizer
  from jaxicd.train import config as config_lib
  from jaxicd.train import trainer
  config = config_lib.base_config()
  # lr 2e-4, 10 warmup steps from lr / 11, cosine decay to final_lr_fraction 0.1 at step 100.
  schedule = trainer.learning_rate_schedule(config.train)
  assert float(schedule(0)) == pytest.approx(2e-4 / 11)
  assert float(schedule(10)) == pytest.approx(2e-4)
  assert float(schedule(100)) == pytest.approx(2e-5)
  # data.pack_bins=0 with batch_size=8 on one process: min(max(16 * 8, 64), 512) = 128 bins;
  # num_threads=2 and read_buffer=16 read the records.
  spans = [Span(f"essential hypertension {i}", "I10", "paraphrase") for i in range(4)]
  documents = [Document("d", TEXT, ("I10",), (), "train", "test")]
  _, _, summary = pipeline.build_train_dataset(
      config.data, load_tokenizer(tok), documents=documents, spans=spans)
  assert summary["pack_bins"] == 128 and summary["per_process_batch"] == 8
  assert summary["weights"] == {"spans": 0.8, "documents": 0.2}
  assert summary["seq_len"] == 1024 and summary["share_prompt"] is False
  options = pipeline._read_options(config.data)  # pylint: disable=protected-access
  assert (options.num_threads, options.prefetch_buffer_size) == (2, 16)
  assert config_lib.checkpoint_directory(config, "w") == str(pathlib.Path("w") / "checkpoints")
