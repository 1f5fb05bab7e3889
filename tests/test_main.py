"""`python -m jaxicd.main`: flags, config overrides, modes, metrics files."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

ROOT = train_worker.ROOT


def _main(*args, timeout=300):
  env = train_worker.subprocess_env()
  return subprocess.run([sys.executable, "-m", "jaxicd.main", *args], capture_output=True,
                        text=True, cwd=str(ROOT), env=env, timeout=timeout)


def test_unknown_mode_and_missing_flags(tmp_path):
  proc = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.mode=serve")
  assert proc.returncode != 0 and "config.mode='serve'" in proc.stderr
  proc = _main("--config=configs/tiny.py")
  assert proc.returncode != 0 and "--workdir" in proc.stderr


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  tok = train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))
  workdir = tmp_path_factory.mktemp("cli")
  proc = _main("--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.model.tokenizer={tok}", "--config.train.steps=3",
               "--config.train.lr=0.005", "--config.train.log_every=1",
               "--config.checkpoint.every=0")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return workdir, tok, proc


def test_train_from_the_command_line(cli_run):
  workdir, _, proc = cli_run
  saved = json.loads((workdir / "config.train.json").read_text())
  assert saved["train"]["steps"] == 3 and saved["train"]["lr"] == 0.005
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "train" and summary["status"] == "done" and summary["step"] == 3
  for step in (1, 2, 3):
    assert f"step {step}/3  loss " in proc.stdout
  assert "tokens trained this run" in proc.stdout
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
  assert any("eval/loss" in r for r in records)


def _read_events(path: pathlib.Path):
  """Parses a TensorBoard event file with tensorboardX's own protos and checks its CRCs."""
  import struct
  from tensorboardX.proto import event_pb2
  from jaxicd.train.metrics_writer import crc32c
  assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
  data, events, off = path.read_bytes(), [], 0
  while off < len(data):
    (length,) = struct.unpack("<Q", data[off:off + 8])
    payload = data[off + 12:off + 12 + length]
    (crc,) = struct.unpack("<I", data[off + 12 + length:off + 16 + length])
    c = crc32c(payload)
    assert crc == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    events.append(event_pb2.Event.FromString(payload))
    off += 16 + length
  return events


def test_tensorboard_event_file_is_readable(cli_run):
  workdir, _, _ = cli_run
  (path,) = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  events = _read_events(path)
  assert events[0].file_version == "brain.Event:2"
  losses = {e.step: v.simple_value for e in events for v in e.summary.value
            if v.tag == "train/loss"}
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  expected = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  assert losses.keys() == expected.keys()
  for step, value in expected.items():
    assert math.isclose(losses[step], value, rel_tol=1e-6)


def test_eval_mode_restores_the_checkpoint(cli_run):
  import ml_collections
  from jaxicd import main
  workdir, tok, _ = cli_run
  config = train_worker.tiny_config(tok, steps=3)
  config.mode = "eval"
  first = main.run(config, str(workdir))
  second = main.run(ml_collections.ConfigDict(config), str(workdir))
  assert first["step"] == 3 and first["batches"] == config.train.eval_batches
  assert math.isfinite(first["loss"]) and 0 < first["loss"] < 10
  assert first["loss"] == second["loss"]  # deterministic
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["eval/loss"] == second["loss"]


def test_eval_mode_codes_held_out_notes(cli_run):
  from jaxicd import main
  from jaxicd.data.demo import demo_corpus
  workdir, tok, _ = cli_run
  config = train_worker.tiny_config(tok, steps=3)
  config.mode = "eval"
  # The byte-level test tokenizer has no single " |" token, so decode unconstrained.
  config.eval_coding.update(documents=2, spans=3, max_new_tokens=6, batch_size=16,
                            constrained=False)
  result = main.run(config, str(workdir))
  assert result["coding/documents"] == 2 and result["coding/span_count"] == 3
  assert 0.0 <= result["coding/span_exact"] <= result["coding/span_category"] <= 1.0
  for key in ("coding/micro_f1", "coding/macro_f1", "coding/unseen_micro_f1",
              "coding/evidence_span_f1"):
    assert 0.0 <= result[key] <= 1.0, key
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["eval/coding/micro_f1"] == result["coding/micro_f1"]
  # "Unseen" is derived from the training split; the demo generator designed its own set.
  from jaxicd.train.coding_eval import CodingEval
  hook = CodingEval(config, None)
  corpus = demo_corpus(seed=config.data.demo_seed)
  val_codes = {c for d in corpus.split("val")[:2] for c in d.codes}
  assert hook.unseen == val_codes & corpus.unseen_codes


def test_export_mode_writes_the_checkpoint_as_peft_and_merged_hf(cli_run, tmp_path):
  """The merged export of the CLI run's checkpoint, loaded by transformers, gives the logits of
  the jaxicd model with the checkpoint's adapters."""
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from jaxicd import main
  from jaxicd.train import trainer as trainer_lib
  workdir, tok, _ = cli_run
  config = train_worker.tiny_config(tok, steps=3)
  config.mode, config.output = "export", str(tmp_path / "export")
  result = main.run(config, str(workdir))
  assert result["step"] == 3
  assert sorted(result["peft"]["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
  adapter_config = json.loads((tmp_path / "export/peft/adapter_config.json").read_text())
  assert adapter_config["r"] == config.lora.rank and adapter_config["base_model_name_or_path"]

  restored = trainer_lib.Trainer(config, str(workdir))
  assert restored.restore_latest(with_data=False) == 3
  model = restored.parts.merge(restored.params, restored.base, restored.rest)
  tokens = np.random.RandomState(0).randint(0, 256, (2, 12)).astype(np.int32)
  ours = np.asarray(model(jnp.asarray(tokens)))
  base = np.asarray(restored.parts.merge(restored.parts.params, restored.base,
                                         restored.rest)(jnp.asarray(tokens)))
  restored.close()
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export/merged")
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert np.abs(ours - base).max() > 1e-4  # three steps of training moved the adapters
  # Exporting again replaces the export files.
  assert main.run(config, str(workdir))["step"] == 3


def test_expected_errors_print_one_line_without_traceback(tmp_path):
  """Bad input, config and missing files used to end in a Python traceback (the message on its
  last line) and, for a mistyped override, before any check of the rest."""
  note = tmp_path / "n.txt"
  note.write_text("Essential hypertension.")
  predict = ["--config=configs/tiny.py", "--config.mode=predict", "--config.allow_untrained=True"]
  cases = [
      ([*predict, f"--config.input={tmp_path / 'missing.txt'}"],
       f"{tmp_path / 'missing.txt'}: no such file or folder (config.input)"),
      ([*predict, f"--config.input={note}", f"--config.output={note}"],
       f"{note} is the input note file {note}: writing it would overwrite the notes"),
      (["--config=configs/tiny.py", "--config.train.stepz=3"],
       "--config.train.stepz: the config has no key 'stepz' (Did you mean \"steps\""),
      (["--config=configs/missing.py"],
       "--config: [Errno 2] No such file or directory: 'configs/missing.py'"),
  ]
  workdir = tmp_path / "run"
  for args, message in cases:
    proc = _main(*args, f"--workdir={workdir}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), proc.stderr
    assert not workdir.exists()
  proc = _main(*cases[0][0], f"--workdir={workdir}", "--verbose")
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr
