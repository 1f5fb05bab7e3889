"""Orbax checkpoints: restore onto another mesh, base-weight identity checks, what is saved."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

from jaxicd.train import checkpoint as ckpt_lib


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
  """A 4-step tiny run on one device: its workdir, final LoRA params, base weight bytes, and
  final optimizer state (leaves) and config."""
  import jax
  from jaxicd.train import trainer
  workdir = tmp_path_factory.mktemp("run")
  config = train_worker.tiny_config(tokenizer_dir, steps=4, eval_batches=0)
  t = trainer.Trainer(config, workdir, print_fn=lambda s: None)
  try:
    t.train()
    params = t.lora_params_host()
    base_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(t.base))
    opt_state = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(t.opt_state))]
  finally:
    t.close()
  return workdir, params, base_bytes, opt_state, config


def test_restores_onto_a_different_mesh(trained, tokenizer_dir, tmp_path):
  workdir, params = trained[:2]
  out = tmp_path / "restored.npz"
  result = train_worker.run_worker("restore", dict(
      tokenizer_dir=str(tokenizer_dir), workdir=str(workdir), out=str(out),
      mesh=dict(data=2, fsdp=2, tensor=2)))
  assert result["devices"] == 8 and result["step"] == 4
  assert result["mesh"] == dict(data=2, fsdp=2, tensor=2)
  # Saved on a 1-device mesh, now laid out by the (2, 2, 2) mesh's rules.
  assert result["specs"]["layers.q.lora_a"] == "P(None, 'fsdp', None)"
  assert result["specs"]["layers.o.lora_b"] == "P(None, None, 'fsdp')"
  restored = dict(np.load(out))
  assert sorted(restored) == sorted(params)
  for k, v in params.items():
    np.testing.assert_array_equal(restored[k], v, err_msg=k)
  assert any(np.any(v != 0) for k, v in params.items() if k.endswith("lora_b"))


def _tamper_meta(workdir: pathlib.Path, **changes) -> None:
  for meta_file in workdir.glob("checkpoints/*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta.update(changes)
    meta_file.write_text(json.dumps(meta))


def test_refuses_other_base_weights(trained, tokenizer_dir, tmp_path):
  import shutil
  from jaxicd.train import trainer
  workdir = tmp_path / "copy"
  shutil.copytree(trained[0], workdir)
  _tamper_meta(workdir, base_fingerprint={"kind": "gguf", "path": "/elsewhere/other.gguf",
                                          "sha256": "0" * 64})
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  t = trainer.Trainer(config, workdir, print_fn=lambda s: None)
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"base weights differ.*other\.gguf.*fresh --workdir"):
      t.restore_latest(with_data=False)
  finally:
    t.close()


def test_refuses_other_lora_shapes(trained, tokenizer_dir):
  from jaxicd.train import trainer
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  config.lora.rank = 8  # the checkpoint has rank 4
  t = trainer.Trainer(config, trained[0], print_fn=lambda s: None)
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"LoRA adapters differ"):
      t.restore_latest(with_data=False)
  finally:
    t.close()


# The tiny preset (2 layers, hidden 64, 4 heads and 2 KV heads of 16, MLP 128) at LoRA rank 4:
# lora_a is [layers, in, rank], lora_b [layers, rank, out].
TINY_LORA_SHAPES = {
    "layers.q.lora_a": [2, 64, 4], "layers.q.lora_b": [2, 4, 64],
    "layers.k.lora_a": [2, 64, 4], "layers.k.lora_b": [2, 4, 32],
    "layers.v.lora_a": [2, 64, 4], "layers.v.lora_b": [2, 4, 32],
    "layers.o.lora_a": [2, 64, 4], "layers.o.lora_b": [2, 4, 64],
    "layers.gate.lora_a": [2, 64, 4], "layers.gate.lora_b": [2, 4, 128],
    "layers.up.lora_a": [2, 64, 4], "layers.up.lora_b": [2, 4, 128],
    "layers.down.lora_a": [2, 128, 4], "layers.down.lora_b": [2, 4, 64],
}


def test_saved_items(trained, tokenizer_dir):
  """Each checkpoint holds exactly the run's state at its step: params and optimizer state equal
  the trainer's, the step, meta as written out here, and the data position: restoring it into a
  fresh pipeline yields the batch an uninterrupted pipeline yields after `step` batches."""
  import jax
  import orbax.checkpoint as ocp
  from jaxicd.data import pipeline
  from jaxicd.model.tokenizer import load_tokenizer
  workdir, params, base_bytes, opt_state, config = trained
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]  # every=2, keep=2
  states = {s: ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(s) / "state")
            for s in steps}
  metas = {s: json.loads((workdir / "checkpoints" / str(s) / "meta" / "metadata").read_text())
           for s in steps}
  for step in steps:
    step_dir = workdir / "checkpoints" / str(step)
    assert {p.name for p in step_dir.iterdir() if p.is_dir()} == {"state", "data_iter", "meta"}
    state = states[step]
    assert set(state) == {"params", "opt_state", "step"} and int(state["step"]) == step
    assert sorted(state["params"]) == sorted(TINY_LORA_SHAPES)
    for k, shape in TINY_LORA_SHAPES.items():
      assert list(state["params"][k].shape) == shape, k
    # Adam's and the schedule's step counters.
    counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
    assert counts == [step, step]
    assert metas[step] == {
        "config": json.loads(json.dumps(config.to_dict())), "base_source": "tiny",
        "base_fingerprint": {"kind": "preset", "name": "tiny",
                             "sha256": metas[step]["base_fingerprint"]["sha256"]},
        "lora_shapes": TINY_LORA_SHAPES, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "step": step}
    assert re.fullmatch(r"[0-9a-f]{64}", metas[step]["base_fingerprint"]["sha256"])
  assert metas[2]["base_fingerprint"] == metas[4]["base_fingerprint"]
  # The last checkpoint is the run's end state, exactly.
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(states[4]["params"][k]), v, err_msg=k)
  got = [np.asarray(x) for x in jax.tree.leaves(states[4]["opt_state"])]
  assert len(got) == len(opt_state)
  for a, b in zip(got, opt_state):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(np.asarray(states[2]["params"][k]) != v) for k, v in params.items())
  # Base weights are not in the checkpoint: all of it is smaller than the base weights alone.
  state_bytes = sum(p.stat().st_size for p in (workdir / "checkpoints/4/state").rglob("*")
                    if p.is_file())
  assert state_bytes < base_bytes / 2, (state_bytes, base_bytes)
  # The data position: one batch per step (one process, no gradient accumulation).
  tok = load_tokenizer(str(tokenizer_dir))
  fresh = lambda: pipeline.make_train_iterator(config.data, tok, with_sources=True, prefetch=0)
  straight = fresh()
  batches = [next(straight) for _ in range(5)]
  for step in steps:
    files = sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data_iter").iterdir()
                   if p.suffix == ".json")
    assert files == ["process_0-of-1.json"]
    it_state = json.loads((workdir / "checkpoints" / str(step) / "data_iter" / files[0])
                          .read_text())
    restored = fresh()
    restored.set_state(it_state)
    want = batches[step]
    got = next(restored)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=(step, k))
  assert any(np.any(batches[2][k] != batches[4][k]) for k in batches[2])


def test_check_compatible_by_hand():
  same = dict(base_fingerprint={"kind": "gguf", "sha256": "a", "path": "/a/m.gguf", "mtime": 1},
              lora_shapes={"x": [1, 2]})
  ckpt_lib.check_compatible(same, same, "dir")
  # The same file copied elsewhere (new path and mtime) is the same base.
  moved = dict(same, base_fingerprint={"kind": "gguf", "sha256": "a", "path": "/b/m.gguf",
                                       "mtime": 2})
  ckpt_lib.check_compatible(same, moved, "dir")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="base weights differ"):
    ckpt_lib.check_compatible(same, dict(same, base_fingerprint={"kind": "gguf", "sha256": "b"}),
                              "dir")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="shape changed"):
    ckpt_lib.check_compatible(same, dict(same, lora_shapes={"x": [1, 3]}), "dir")
