"""Multi-host training on one machine: 2 processes of `python -m jaxicd.main` x 2 CPU devices.

The processes meet through `jax.distributed` (CPU collectives: gloo), each reads its own
pipeline shard, and all save Orbax checkpoints into one shared workdir. The reference is one
process with 4 devices fed the same global batches (`train_worker.scenario_process_shards`):
the LoRA params of both must agree after every checkpoint, also after a restart that resumes
from a checkpoint of the 2-process run.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 6
EVERY = 2
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_processes(workdir: pathlib.Path, tokenizer_dir, *, eval_batches: int = 0) -> list[str]:
  """Runs all processes of one multi-host run to the end; returns each one's output."""
  port = _free_port()
  procs = []
  for process_id in range(PROCESSES):
    cmd = [sys.executable, "-m", "jaxicd.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.model.tokenizer={tokenizer_dir}",
           f"--config.train.steps={STEPS}", f"--config.checkpoint.every={EVERY}",
           "--config.checkpoint.keep=3", f"--config.train.eval_batches={eval_batches}",
           "--config.distributed.enabled=True",
           f"--config.distributed.coordinator_address=localhost:{port}",
           f"--config.distributed.num_processes={PROCESSES}",
           f"--config.distributed.process_id={process_id}"]
    procs.append(subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=str(train_worker.ROOT), env=train_worker.subprocess_env(DEVICES_PER_PROCESS)))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:  # one failed process leaves the other waiting in a collective
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    hint = ("" if "Gloo" in "".join(outputs) else
            "\n(no gloo connection was made: jax's CPU collectives, "
            "jax_cpu_collectives_implementation='gloo', may be unavailable in this jaxlib)")
    raise AssertionError(
        f"process(es) {failed} of the {PROCESSES}-process run failed{hint}:\n"
        + "\n".join(f"--- process {i} (rc {p.returncode}) ---\n{outputs[i][-4000:]}"
                    for i, p in enumerate(procs)))
  return outputs


def _summary(output: str) -> dict:
  return json.loads([l for l in output.splitlines() if l.startswith("{")][-1])


def _params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """The checkpoint's state, restored onto this process's one device (its saved shardings name
  the devices of the 2-process run, which do not exist here)."""
  import jax
  import orbax.checkpoint as ocp
  path = workdir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  state = checkpointer.restore(path, target)
  assert int(state["step"]) == step
  return {k: np.asarray(v) for k, v in state["params"].items()}


def _assert_params_match(got: dict, reference, step: int) -> None:
  expected = {k.split(".", 1)[1]: reference[k] for k in reference.files
              if k.startswith(f"step{step}.")}
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_allclose(got[k], v, rtol=0, atol=TOLERANCE, err_msg=f"step {step}: {k}")
  # Not vacuous: the adapters moved away from their init (lora_b starts at zero).
  assert any(np.abs(v).max() > 1e-3 for k, v in got.items() if k.endswith("lora_b"))


def _reference(tmp: pathlib.Path, tokenizer_dir):
  """One process, PROCESSES * DEVICES_PER_PROCESS devices, the 2-process run's global batches."""
  out = tmp / "params.npz"
  result = train_worker.run_worker(
      "process_shards", dict(tokenizer_dir=str(tokenizer_dir), workdir=str(tmp / "run"),
                             steps=STEPS, processes=PROCESSES,
                             save_steps=list(range(EVERY, STEPS + 1, EVERY)), out=str(out)),
      devices=PROCESSES * DEVICES_PER_PROCESS)
  assert result["processes"] == 1 and result["devices"] == PROCESSES * DEVICES_PER_PROCESS
  return result["losses"], np.load(out)


def test_gloo_collectives_available():
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  assert hasattr(_jax, "make_gloo_tcp_collectives"), (
      "this jaxlib has no gloo CPU collectives: multi-process CPU runs (and this test) need them")


def test_two_processes_match_one_and_resume(tmp_path, tokenizer_dir):
  workdir = tmp_path / "shared"
  # 1) A fresh run of both processes (with an evaluation at the end), and meanwhile the
  # reference: the run is partly waiting on its peer, so overlapping them saves time.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    reference = pool.submit(_reference, tmp_path / "reference", tokenizer_dir)
    outputs = _run_processes(workdir, tokenizer_dir, eval_batches=1)
    ref_losses, ref_params = reference.result()
  for out in outputs:
    assert _summary(out)["step"] == STEPS and _summary(out)["status"] == "done"
  assert f"({PROCESSES * DEVICES_PER_PROCESS} cpu devices, {PROCESSES} processes)" in outputs[0]
  # Progress lines come from process 0 only.
  assert f"step {STEPS}/{STEPS}" in outputs[0] and f"step {STEPS}/" not in outputs[1]
  ckpt = workdir / "checkpoints"
  assert sorted(int(p.name) for p in ckpt.iterdir()) == list(range(EVERY, STEPS + 1, EVERY))
  for step in range(EVERY, STEPS + 1, EVERY):
    _assert_params_match(_params(workdir, step), ref_params, step)
    assert sorted(p.name for p in (ckpt / str(step) / "data_iter").glob("*.json")) == [
        f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]
  # Metrics are written once (by process 0) and are the reference's global losses.
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["train/loss"] for r in train], ref_losses, rtol=1e-5)
  assert [r["step"] for r in records if "eval/loss" in r] == [STEPS]
  assert len(list((workdir / "tensorboard").iterdir())) == 1

  # 2) As if the run had died after the checkpoint at STEPS - EVERY: restart both processes.
  shutil.rmtree(ckpt / str(STEPS))
  outputs = _run_processes(workdir, tokenizer_dir)
  assert f"resumed from {ckpt / str(STEPS - EVERY)} at step {STEPS - EVERY}" in outputs[0]
  assert f"training steps {STEPS - EVERY + 1}..{STEPS}" in outputs[0]
  for out in outputs:
    assert _summary(out)["step"] == STEPS
  _assert_params_match(_params(workdir, STEPS), ref_params, STEPS)
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  resumed = [r for r in records if "train/loss" in r][STEPS:]
  assert [r["step"] for r in resumed] == list(range(STEPS - EVERY + 1, STEPS + 1))
  np.testing.assert_allclose([r["train/loss"] for r in resumed], ref_losses[-EVERY:], rtol=1e-5)
  assert len(list((workdir / "tensorboard").iterdir())) == 2
