"""End-to-end training runs of `python -m jaxicd.main` on the tiny model and the real pipeline.

A run killed with SIGKILL mid-training, restarted, stopped with SIGTERM (preemption) and
restarted again must end with exactly the LoRA params of an uninterrupted run: that needs the
optimizer state, the step and the grain iterator state all restored.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

STEPS = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


def _main_cmd(workdir, tokenizer_dir, *extra):
  return [sys.executable, "-m", "jaxicd.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.model.tokenizer={tokenizer_dir}",
          f"--config.train.steps={STEPS}", "--config.checkpoint.every=4",
          "--config.checkpoint.keep=2", "--config.train.eval_batches=0", *extra]


# `python -m jaxicd.main` that stops after printing the progress line of one step (argv[1], e.g.
# "step 6/"): it prints GATE and waits for a line on stdin. A signal sent while it waits lands at
# a known step (the step loop checks for SIGTERM after that line), so the test does not race the
# training loop.
_GATED_MAIN = """
import builtins, runpy, sys
gate = sys.argv.pop(1)
_print = builtins.print
def _gated_print(*args, **kwargs):
  _print(*args, **kwargs)
  if args and str(args[0]).startswith(gate):
    _print("GATE", flush=True)
    sys.stdin.readline()
builtins.print = _gated_print
sys.argv[0] = "jaxicd.main"
runpy.run_module("jaxicd.main", run_name="__main__", alter_sys=True)
"""


def _gated_cmd(gate, workdir, tokenizer_dir):
  return [sys.executable, "-c", _GATED_MAIN, gate] + _main_cmd(workdir, tokenizer_dir)[3:]


def _env():
  return train_worker.subprocess_env()


class _Run:
  """A main process whose stdout lines are collected by a thread."""

  def __init__(self, cmd):
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 cwd=str(train_worker.ROOT), env=_env())
    self.lines: list[str] = []
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))

  def wait_for(self, predicate, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if predicate():
        return True
      if self.proc.poll() is not None:
        return predicate()
      time.sleep(0.05)
    raise AssertionError("timed out; output:\n" + "\n".join(self.lines[-40:]))

  def release(self):
    """Lets a gated run (`_GATED_MAIN`) continue."""
    self.proc.stdin.write("\n")
    self.proc.stdin.flush()

  def finish(self, timeout=180.0) -> int:
    rc = self.proc.wait(timeout=timeout)
    self._thread.join(timeout=10)
    return rc

  @property
  def text(self) -> str:
    return "\n".join(self.lines)


def _summary(run: _Run) -> dict:
  """The JSON summary line that main prints last."""
  return json.loads([l for l in run.lines if l.startswith('{"mode"')][-1])


def _finalized_steps(workdir: pathlib.Path) -> list[int]:
  ckpt = workdir / "checkpoints"
  if not ckpt.exists():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()
                and (p / "state").exists())


def _final_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  step = max(_finalized_steps(workdir))
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return step, {k: np.asarray(v) for k, v in state["params"].items()}


def _tiny_config(tokenizer_dir, **train):
  config = train_worker.tiny_config(tokenizer_dir, steps=STEPS, eval_batches=0, **train)
  config.checkpoint.update(every=4, keep=2)
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_dir):
  """The reference run, in this process (same code path as main's train mode)."""
  from jaxicd.train import trainer
  workdir = tmp_path_factory.mktemp("straight")
  lines = []
  t = trainer.Trainer(_tiny_config(tokenizer_dir), workdir, print_fn=lines.append)
  try:
    summary = t.train()
  finally:
    t.close()
  assert summary["status"] == "done" and summary["step"] == STEPS
  return workdir, "\n".join(lines)


def test_progress_lines_and_metrics(uninterrupted):
  workdir, text = uninterrupted
  assert f"step {STEPS}/{STEPS}" in text
  assert "steps/s" in text and "tok/s" in text and "ETA" in text
  assert "100% span / 0% doc" in text  # tiny.py trains on spans only
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == list(range(1, STEPS + 1))
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # Small-run overfit check: the loss falls (tiny random base: it cannot fall far).
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses


def test_checkpoint_holds_no_base_weights(uninterrupted):
  import orbax.checkpoint as ocp
  workdir, _ = uninterrupted
  step, params = _final_params(workdir)
  assert step == STEPS
  assert params and all(".lora_" in k for k in params), sorted(params)
  meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
  assert meta["base_fingerprint"]["kind"] == "preset"
  assert meta["config"]["train"]["steps"] == STEPS
  assert list((workdir / "checkpoints" / str(step) / "data_iter").glob("process_0-of-1.json"))
  # keep=2: only the two newest checkpoints remain.
  assert _finalized_steps(workdir) == [STEPS - 4, STEPS]
  del ocp


def test_sigkill_and_sigterm_resume_exactly(uninterrupted, tmp_path, tokenizer_dir):
  workdir = tmp_path / "interrupted"
  # 1) SIGKILL at step 6, once the checkpoint of step 4 (checkpoint.every=4) is finalized: the
  #    run waits after its step-6 line until then.
  run = _Run(_gated_cmd("step 6/", workdir, tokenizer_dir))
  assert run.wait_for(lambda: "GATE" in run.lines), run.text
  assert run.wait_for(lambda: _finalized_steps(workdir) == [4]), run.text
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  assert _finalized_steps(workdir) == [4]
  # 2) Restart (from step 4); SIGTERM (preemption) while it waits after its step-6 line: it
  #    saves a checkpoint at step 6 and exits cleanly.
  run = _Run(_gated_cmd("step 6/", workdir, tokenizer_dir))
  assert run.wait_for(lambda: "GATE" in run.lines), run.text
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait_for(lambda: any("SIGTERM received" in l for l in run.lines)), run.text
  run.release()
  assert run.finish() == 0, run.text
  assert f"resumed from {workdir / 'checkpoints' / '4'} at step 4" in run.text
  assert [l for l in run.lines if l.startswith("preempted:")] == [
      "preempted: saved checkpoint at step 6; exiting"]
  assert not any(l.startswith("step 7/") or l.startswith("step 8/") for l in run.lines)
  assert _summary(run)["status"] == "preempted" and _summary(run)["step"] == 6
  assert _finalized_steps(workdir) == [4, 6]  # keep=2
  # 3) Restart (from step 6) and finish.
  run = _Run(_main_cmd(workdir, tokenizer_dir))
  assert run.finish() == 0, run.text
  assert f"resumed from {workdir / 'checkpoints' / '6'} at step 6" in run.text
  assert _summary(run)["status"] == "done" and _summary(run)["step"] == STEPS
  _, expected = _final_params(uninterrupted[0])
  step, got = _final_params(workdir)
  assert step == STEPS
  assert sorted(got) == sorted(expected)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-7, err_msg=k)
  assert any(not np.all(v == 0) for k, v in got.items() if k.endswith("lora_b"))


def test_divergence_stops_with_clear_message_and_keeps_checkpoint(tmp_path, tokenizer_dir):
  import orbax.checkpoint as ocp
  from jaxicd.train import trainer
  # An absurd learning rate blows the adapters up within a few steps.
  config = _tiny_config(tokenizer_dir, lr=1e30, clip_norm=0.0)
  config.checkpoint.every = 1
  t = trainer.Trainer(config, tmp_path, print_fn=lambda s: None)
  try:
    with pytest.raises(trainer.TrainingDivergedError,
                       match=r"non-finite loss .* at step \d+.*last good checkpoint \(step \d+\)"):
      t.train()
  finally:
    t.close()
  saved = _finalized_steps(tmp_path)
  assert saved
  for step in saved:  # every kept checkpoint is finite
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
    assert all(np.all(np.isfinite(np.asarray(v))) for v in state["params"].values())


def test_a_step_without_target_tokens_stops_training(tmp_path, tokenizer_dir, monkeypatch):
  """A batch whose answers were all cut off (loss weights all 0) used to train on as loss 0.0,
  and the optimizer still moved the adapters (Adam's momentum) at every such step."""
  import jax
  from jaxicd.data import pipeline
  from jaxicd.train import trainer
  make_train_iterator = pipeline.make_train_iterator

  def answerless_second_batch(*args, **kwargs):
    it = make_train_iterator(*args, **kwargs)

    class Wrapped:
      n = 0

      def __next__(self):
        batch = next(it)
        self.n += 1
        if self.n == 2:
          batch = dict(batch, loss_weights=np.zeros_like(batch["loss_weights"]))
        return batch

    return Wrapped()

  config = _tiny_config(tokenizer_dir)
  lines = []
  t = trainer.Trainer(config, tmp_path, print_fn=lines.append)
  after = []
  train_step = t.fns.train_step

  def recording_step(*args):
    out = train_step(*args)
    after.append({k: np.asarray(v) for k, v in jax.device_get(out[0]).items()})
    return out

  t.fns.train_step = recording_step
  monkeypatch.setattr(pipeline, "make_train_iterator", answerless_second_batch)
  try:
    with pytest.raises(Exception, match=r"step 2 has no answer tokens to learn from .*"
                       r"config\.data\.seq_len=256.*the update was skipped and training "
                       r"stopped") as stopped:
      t.train()
    params = t.lora_params_host()
  finally:
    t.close()
  assert len(after) == 2
  for k, v in after[0].items():  # the adapters of step 1, untouched by step 2
    np.testing.assert_array_equal(params[k], v, err_msg=k)
    np.testing.assert_array_equal(after[1][k], v, err_msg=k)
  assert _finalized_steps(tmp_path) == []
  from jaxicd import errors
  assert errors.is_expected(stopped.value)  # one line, exit status 2


def test_the_run_reports_what_training_changed(tmp_path, tokenizer_dir):
  """With coding evaluated before and after training, the last lines and the summary give each
  coding metric at step 0 and at the end, as the evaluation returned them."""
  from jaxicd.train import trainer
  config = _tiny_config(tokenizer_dir, eval_at_start=True)
  config.train.update(steps=2, eval_batches=1)
  config.checkpoint.every = 0
  returned = []

  def hook(t, step):  # stands in for the coding evaluation (jaxicd.train.coding_eval)
    returned.append({"coding/micro_f1": 0.1 + step / 8, "coding/span_exact": step / 4,
                     "coding/codes_per_note": 3.0 - step})
    return returned[-1]

  lines = []
  t = trainer.Trainer(config, tmp_path, print_fn=lines.append)
  t.eval_hooks.append(hook)
  try:
    summary = t.train()
  finally:
    t.close()
  assert len(returned) == 2  # step 0 and the end
  assert summary["learnt"] == {"note micro-F1": [0.1, 0.35], "span exact": [0.0, 0.5],
                               "codes per note": [3.0, 1.0]}
  assert lines[-1].startswith("learnt in steps 1..2 (coding the same ") and lines[-1].endswith(
      "untrained -> trained): note micro-F1 0.100 -> 0.350, span exact 0.000 -> 0.500, "
      "codes per note 3.000 -> 1.000")
