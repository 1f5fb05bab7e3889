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
from conftest import require_reference  # pylint: disable=wrong-import-position

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


def _f1(tp: int, fp: int, fn: int) -> float:
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def test_eval_mode_codes_held_out_notes(cli_run, monkeypatch):
  """Eval mode codes the first 2 val notes and 3 gold spans; every reported coding metric equals
  a recount, written here, from what the coder returned and the demo corpus's gold."""
  from jaxicd import main
  from jaxicd.data.demo import DEMO_CODES, demo_corpus
  from jaxicd.infer.coder import Coder
  workdir, tok, _ = cli_run
  config = train_worker.tiny_config(tok, steps=3)
  config.mode = "eval"
  # The byte-level test tokenizer has no single " |" token, so decode unconstrained.
  config.eval_coding.update(documents=2, spans=3, max_new_tokens=6, batch_size=16,
                            constrained=False)
  # Record what the coder returns (the model's output is whatever 3 steps made of it).
  coded, spans_coded = [], []
  code_documents, code_spans = Coder.code_documents, Coder.code_spans

  def record_documents(self, docs):
    out = code_documents(self, docs)
    coded.append((list(docs), out, dict(self.stats)))
    return out

  def record_spans(self, texts):
    out = code_spans(self, texts)
    spans_coded.append((list(texts), out))
    return out

  monkeypatch.setattr(Coder, "code_documents", record_documents)
  monkeypatch.setattr(Coder, "code_spans", record_spans)
  result = main.run(config, str(workdir))

  corpus = demo_corpus(seed=config.data.demo_seed)
  val = corpus.split("val")
  trained = {c for d in corpus.split("train") for c in d.codes}
  # The notes: the first two of the val split, coded once.
  assert len(coded) == 1
  docs, predictions, stats = coded[0]
  assert [d.id for d in docs] == [d.id for d in val[:2]]
  gold = [set(d.codes) for d in val[:2]]
  predicted = [{p.code for p in ps} for ps in predictions]
  # The spans: the first 3 distinct (quote, code) gold evidence spans of the val notes, coded by
  # the last code_spans call (earlier ones, if any, re-code the notes' own evidence).
  gold_spans = []
  for d in val:
    for ev in d.evidence:
      if (d.text[ev.begin:ev.end], ev.code) not in gold_spans and len(gold_spans) < 3:
        gold_spans.append((d.text[ev.begin:ev.end], ev.code))
  texts, span_out = spans_coded[-1]
  assert texts == [t for t, _ in gold_spans]
  top = [code for code, _ in span_out]

  # Recounts.
  tp = sum(len(g & p) for g, p in zip(gold, predicted))
  fp = sum(len(p - g) for g, p in zip(gold, predicted))
  fn = sum(len(g - p) for g, p in zip(gold, predicted))
  per_code = {c: _f1(sum(c in g and c in p for g, p in zip(gold, predicted)),
                     sum(c in p and c not in g for g, p in zip(gold, predicted)),
                     sum(c in g and c not in p for g, p in zip(gold, predicted)))
              for c in set().union(*gold)}
  gold_ev = [{(e.code, e.begin, e.end) for e in d.evidence} for d in val[:2]]
  pred_ev = [{(p.code, p.begin, p.end) for p in ps if p.begin >= 0} for ps in predictions]
  ev_tp = sum(len(g & p) for g, p in zip(gold_ev, pred_ev))
  ev_fp = sum(len(p - g) for g, p in zip(gold_ev, pred_ev))
  ev_fn = sum(len(g - p) for g, p in zip(gold_ev, pred_ev))
  named = stats.get("predicted_lines", 0) + stats.get("rejected_malformed", 0) + \
      stats.get("rejected_invalid", 0)
  unseen_spans = [(t, c) for (t, c), _ in zip(gold_spans, top) if c not in trained]
  # Strict unseen codes: every code of the demo space or of these notes' gold not trained on.
  unseen = (set(DEMO_CODES) | set().union(*gold)) - trained
  u_gold, u_pred = [g & unseen for g in gold], [p & unseen for p in predicted]
  u_tp = sum(len(g & p) for g, p in zip(u_gold, u_pred))
  u_fp = sum(len(p - g) for g, p in zip(u_gold, u_pred))
  u_fn = sum(len(g - p) for g, p in zip(u_gold, u_pred))
  scores = [{} for _ in predictions]
  for s, ps in zip(scores, predictions):
    for p in ps:
      s[p.code] = max(s.get(p.code, -math.inf), p.score)
  p_at = lambda k: sum(len(set(sorted(s, key=lambda c: (-s[c], c))[:k]) & g) / k
                       for s, g in zip(scores, gold)) / 2
  expected = {
      "coding/documents": 2.0, "coding/span_count": 3.0,
      "coding/micro_f1": _f1(tp, fp, fn),
      "coding/micro_precision": tp / (tp + fp) if tp + fp else 0.0,
      "coding/micro_recall": tp / (tp + fn) if tp + fn else 0.0,
      "coding/macro_f1": sum(per_code.values()) / len(per_code),
      "coding/codes_in_gold": float(len(per_code)),
      "coding/evidence_documents": float(sum(bool(g) for g in gold_ev)),
      "coding/evidence_span_f1": _f1(ev_tp, ev_fp, ev_fn),
      "coding/valid_code_rate": stats.get("predicted_lines", 0) / named if named else 0.0,
      "coding/codes_per_note": sum(len(p) for p in predicted) / 2,
      "coding/threshold": 0.0,  # no calibration.json in the workdir: every code kept
      "coding/span_exact": sum(t == c for (_, c), t in zip(gold_spans, top)) / 3,
      "coding/span_category": sum(t is not None and t[:3] == c[:3]
                                  for (_, c), t in zip(gold_spans, top)) / 3,
      "coding/unseen_span_count": float(len(unseen_spans)),
      "coding/unseen_codes_in_gold": float(len(set().union(*u_gold))),
      "coding/unseen_micro_f1": _f1(u_tp, u_fp, u_fn),
      "coding/p@5": p_at(5), "coding/p@8": p_at(8), "coding/p@15": p_at(15),
      "coding/truncated_generation_rate": stats["truncated_generations"] / stats["windows"],
  }
  assert stats["documents"] == 2 and stats["generated_tokens"] <= 6 * stats["windows"]
  # The reported keys: val loss, and each coding metric once.
  coding = {"documents", "codes_per_note", "threshold", "valid_code_rate",
            "grounded_evidence_rate", "truncated_line_rate", "truncated_generation_rate",
            "evidence_documents", "span_count", "span_exact", "span_category",
            "unseen_span_count", "unseen_span_exact", "unseen_span_category",
            "p@5", "p@8", "p@15"}
  for prefix in ("", "unseen_"):
    coding |= {prefix + k for k in ("micro_precision", "micro_recall", "micro_f1", "macro_f1",
                                    "macro_f1_all", "codes_in_gold")}
  for kind in ("span", "char", "token"):
    coding |= {f"evidence_{kind}_{m}" for m in ("precision", "recall", "f1")}
  assert set(result) == {"loss", "accuracy", "batches", "target_tokens", "step"} | {
      f"coding/{k}" for k in coding}
  assert not (workdir / "calibration.json").exists()
  for key, value in expected.items():
    assert math.isclose(result[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, result[key], value)
  assert result["step"] == 3
  # Everything reported also went to metrics.jsonl, under eval/.
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] == 3
  for key, value in result.items():
    assert records[-1][f"eval/{key}"] == value, key
  # "Unseen" is derived from the training split; the demo generator designed its own set.
  from jaxicd.train.coding_eval import CodingEval
  hook = CodingEval(config, None)
  val_codes = {c for d in val[:2] for c in d.codes}
  assert hook.unseen == val_codes & corpus.unseen_codes == val_codes - trained


def test_export_mode_writes_the_checkpoint_as_peft_and_merged_hf(cli_run, tmp_path):
  """The merged export of the CLI run's checkpoint, loaded by transformers, gives the logits of
  the jaxicd model with the checkpoint's adapters."""
  import jax.numpy as jnp
  import numpy as np
  from jaxicd import main
  from jaxicd.train.trained import TrainedModel
  torch = require_reference("torch")
  transformers = require_reference("transformers")
  workdir, tok, _ = cli_run
  config = train_worker.tiny_config(tok, steps=3)
  config.mode, config.output = "export", str(tmp_path / "export")
  result = main.run(config, str(workdir))
  assert result["step"] == 3
  assert sorted(result["peft"]["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
  adapter_config = json.loads((tmp_path / "export/peft/adapter_config.json").read_text())
  assert adapter_config["r"] == config.lora.rank and adapter_config["base_model_name_or_path"]

  restored = TrainedModel(config, str(workdir))
  assert restored.restore() == 3
  model = restored.model
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


def test_refused_resume_exits_2_and_keeps_the_recorded_config(cli_run, tmp_path):
  """A resume with other LoRA / data settings used to carry on (and overwrite
  config.train.json first); it is refused before the model loads, naming what changed."""
  import shutil
  workdir, tok, _ = cli_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  recorded = (copy / "config.train.json").read_text()
  proc = _main("--config=configs/tiny.py", f"--workdir={copy}", f"--config.model.tokenizer={tok}",
               "--config.train.steps=6", "--config.lora.alpha=16",
               "--config.data.window_overlap=16")
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  lines = proc.stderr[proc.stderr.index("error: "):].splitlines()
  assert lines[:3] == [
      f"error: cannot resume --workdir={copy}: its checkpoint {copy / 'checkpoints' / '3'} was "
      "made with other settings (checkpoint -> this run):",
      "  data.window_overlap: 32 -> 16",
      "  lora.alpha: 8.0 -> 16.0"]
  assert (copy / "config.train.json").read_text() == recorded
  assert "loaded in" not in proc.stdout  # refused before the model was loaded


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


def test_compilation_cache_path_hand_cases(monkeypatch):
  from jaxicd import main  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
  assert main.compilation_cache_path("auto") == pathlib.Path("/var/cache/me/jaxicd/jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert main.compilation_cache_path("auto") == pathlib.Path.home() / ".cache/jaxicd/jax"
  assert main.compilation_cache_path("") is None
  assert main.compilation_cache_path("~/x") == pathlib.Path.home() / "x"


def test_a_run_fills_the_configured_compilation_cache(tmp_path):
  """A second run (eval after train, predict) finds the compiled programs on disk."""
  tok = train_worker.write_byte_tokenizer(tmp_path / "tok")
  cache = tmp_path / "xla"
  env = train_worker.subprocess_env()
  env.pop("JAX_COMPILATION_CACHE_DIR")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxicd.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", f"--config.model.tokenizer={tok}",
       "--config.train.steps=1", "--config.checkpoint.every=0",
       f"--config.compilation_cache_dir={cache}"],
      capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert cache.is_dir() and len(list(cache.iterdir())) >= 1
