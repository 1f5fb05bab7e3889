"""Orbax checkpoints: restore onto another mesh, base-weight identity checks, what is saved."""

from __future__ import annotations

import json
import pathlib
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
  """A 4-step tiny run on one device; returns its workdir and final LoRA params."""
  from jaxicd.train import trainer
  workdir = tmp_path_factory.mktemp("run")
  config = train_worker.tiny_config(tokenizer_dir, steps=4, eval_batches=0)
  t = trainer.Trainer(config, workdir, print_fn=lambda s: None)
  try:
    t.train()
    params = t.lora_params_host()
    base_bytes = sum(np.asarray(x).nbytes for x in __import__("jax").tree.leaves(t.base))
  finally:
    t.close()
  return workdir, params, base_bytes


def test_restores_onto_a_different_mesh(trained, tokenizer_dir, tmp_path):
  workdir, params, base_bytes = trained
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


def test_saved_items(trained):
  workdir, params, base_bytes = trained
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]  # every=2, keep=2
  step_dir = workdir / "checkpoints" / "4"
  assert {p.name for p in step_dir.iterdir()} >= {"state", "data_iter", "meta"}
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  assert meta["step"] == 4 and meta["config"]["lora"]["rank"] == 4
  assert meta["lora_shapes"] == {k: list(v.shape) for k, v in params.items()}
  # Base weights are not in the checkpoint: all of it is smaller than the base weights alone.
  state_bytes = sum(p.stat().st_size for p in (step_dir / "state").rglob("*") if p.is_file())
  assert state_bytes < base_bytes / 2, (state_bytes, base_bytes)
  it_state = json.loads((step_dir / "data_iter" / "process_0-of-1.json").read_text())
  assert it_state  # the grain iterator's position


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
