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

from jaxicd import errors
from jaxicd.data import prompts
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
                       match=r"\n  base weights: gguf /elsewhere/other\.gguf \(sha256 000000000000\) "
                             r"-> preset tiny \(sha256 [0-9a-f]{12}\)\nUse a fresh --workdir"):
      t.restore_latest(with_data=False)
  finally:
    t.close()


def test_refuses_other_lora_shapes(trained, tokenizer_dir):
  from jaxicd.train import trainer
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  config.lora.rank = 8  # the checkpoint has rank 4
  t = trainer.Trainer(config, trained[0], print_fn=lambda s: None)
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"\n  lora\.rank: 4 -> 8\n  LoRA shapes .*shape changed "
                             r"\['layers\.down\.lora_a'"):
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


# What a resume must agree on (configs/tiny.py), recorded in every checkpoint's meta.
TINY_SETTINGS = {
    "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.0,
    "lora.targets": ["q", "k", "v", "o", "gate", "up", "down"],
    "data.answer_format": "evidence_first", "prompt_version": "see prompts.PROMPT_VERSION",
    "data.seq_len": 256, "data.window_overlap": 32, "data.code_space": "demo"}


def _checksums(state) -> dict[str, int]:
  """Each array's position-weighted sum of its bit patterns, mod 2**32 (numpy, by hand)."""
  import jax
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    x = np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
    weights = (np.arange(x.size, dtype=np.uint64) * 0x9E3779B1 + 1) % 2**32
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = int(
        np.sum((bits * weights) % 2**32) % 2**32)
  return out


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
        "settings": dict(TINY_SETTINGS, prompt_version=prompts.PROMPT_VERSION),
        "checksums": metas[step]["checksums"], "step": step}
    assert re.fullmatch(r"[0-9a-f]{64}", metas[step]["base_fingerprint"]["sha256"])
    # One checksum per saved array, recomputed here from the restored values.
    assert metas[step]["checksums"] == _checksums(state), step
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
              lora_shapes={"x": [1, 2]},
              settings={"lora.alpha": 8.0, "data.seq_len": 256, "prompt_version": "1-aa"})
  ckpt_lib.check_compatible(same, same, "dir")
  # The same file copied elsewhere (new path and mtime) is the same base.
  moved = dict(same, base_fingerprint={"kind": "gguf", "sha256": "a", "path": "/b/m.gguf",
                                       "mtime": 2})
  ckpt_lib.check_compatible(same, moved, "dir")
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"\n  base weights: gguf /a/m\.gguf \(sha256 a\) -> gguf /c/m\.gguf "
                           r"\(sha256 b\)\n"):
    ckpt_lib.check_compatible(same, dict(same, base_fingerprint={
        "kind": "gguf", "sha256": "b", "path": "/c/m.gguf"}), "dir")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="shape changed"):
    ckpt_lib.check_compatible(same, dict(same, lora_shapes={"x": [1, 3]}), "dir")
  other = dict(same, settings={"lora.alpha": 16.0, "data.seq_len": 128, "prompt_version": "1-bb"})
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt_lib.check_compatible(same, other, "ckpt/7", workdir="run")
  assert str(e.value).splitlines() == [
      "cannot resume --workdir=run: its checkpoint ckpt/7 was made with other settings "
      "(checkpoint -> this run):",
      "  data.seq_len: 256 -> 128", "  lora.alpha: 8.0 -> 16.0",
      "  prompt_version: '1-aa' -> '1-bb'",
      "Use a fresh --workdir, or rerun with the checkpoint's settings."]
  # Eval, predict and export may change what only shapes training examples.
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt_lib.check_compatible(same, other, "ckpt/7", resume=False)
  assert "seq_len" not in str(e.value) and "  lora.alpha: 8.0 -> 16.0" in str(e.value)
  # Settings the checkpoint did not record are unknown: one warning per checkpoint folder.
  warned = []
  legacy = {k: v for k, v in same.items() if k != "settings"}
  for step in (1, 2):
    ckpt_lib.check_compatible(legacy, other, f"by_hand/{step}", warn=warned.append)
  assert warned == ["warning: the checkpoints in by_hand predate recorded settings: "
                    "lora.alpha, data.seq_len, prompt_version cannot be checked; using this "
                    "run's values"]


# --- compatibility of a resume, corrupt and legacy checkpoints -----------------------------------


def _copy(trained, tmp_path) -> pathlib.Path:
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained[0], workdir)
  return workdir


def _saved_params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return {k: np.asarray(v) for k, v in state["params"].items()}


def _restore(config, workdir, *, with_data: bool = True):
  """(step restored or the exception raised, params, printed lines) of a fresh trainer (a
  training resume) or, ``with_data=False``, of the inference restore (`TrainedModel`)."""
  from jaxicd.train import trainer
  from jaxicd.train.trained import TrainedModel
  lines: list[str] = []
  if with_data:
    t = trainer.Trainer(config, workdir, print_fn=lines.append)
    restore = t.restore_latest
  else:
    t = TrainedModel(config, workdir, print_fn=lines.append)
    restore = t.restore
  try:
    try:
      step = restore()
    except Exception as e:  # pylint: disable=broad-except
      step = e
    return step, {k: np.asarray(v) for k, v in t.params.items()}, lines
  finally:
    t.close()


def test_resume_with_other_settings_is_refused_with_a_diff(trained, tokenizer_dir, tmp_path):
  """LoRA alpha, answer format and the data settings that shape examples used to be free to
  change on a resume: training continued on other examples, or with other adapter scaling."""
  workdir = _copy(trained, tmp_path)
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  config.lora.alpha = 16.0
  config.data.update(seq_len=128, answer_format="code_first")
  error, _, _ = _restore(config, workdir)
  assert isinstance(error, ckpt_lib.CheckpointMismatchError) and errors.is_expected(error)
  lines = str(error).splitlines()
  assert lines[0] == (f"cannot resume --workdir={workdir}: its checkpoint "
                      f"{workdir / 'checkpoints' / '4'} was made with other settings "
                      "(checkpoint -> this run):")
  assert lines[1:4] == ["  data.answer_format: 'evidence_first' -> 'code_first'",
                        "  data.seq_len: 256 -> 128",
                        "  lora.alpha: 8.0 -> 16.0"]
  assert "fresh --workdir" in lines[4]


def test_inference_restores_ignore_training_only_settings(trained, tokenizer_dir, tmp_path):
  """Eval, predict and export may use other windows and code space, not another adapter
  scaling or answer format."""
  workdir = trained[0]
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  config.data.update(seq_len=128, window_overlap=8, code_space="all")
  config.lora.dropout = 0.1
  step, params, _ = _restore(config, workdir, with_data=False)
  assert step == 4
  for k, v in trained[1].items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"\n  data\.seq_len: 256 -> 128\n"):
    raise _restore(config, workdir)[0]
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  config.data.answer_format = "code_first"
  error = _restore(config, workdir, with_data=False)[0]
  assert isinstance(error, ckpt_lib.CheckpointMismatchError)
  assert "\n  data.answer_format: 'evidence_first' -> 'code_first'\n" in str(error)


def _strip_settings(workdir: pathlib.Path) -> None:
  """Makes the checkpoints look like those written before settings and checksums were
  recorded (their meta had exactly the other keys: see test_saved_items' history)."""
  for meta_file in workdir.glob("checkpoints/*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    del meta["settings"], meta["checksums"]
    meta_file.write_text(json.dumps(meta))


def test_checkpoints_without_recorded_settings_restore_with_one_warning(trained, tokenizer_dir,
                                                                        tmp_path):
  from jaxicd.train import trainer
  workdir = _copy(trained, tmp_path)
  _strip_settings(workdir)
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  config.lora.alpha = 16.0  # unknown to such a checkpoint: cannot be checked
  lines: list[str] = []
  t = trainer.Trainer(config, workdir, print_fn=lines.append)
  try:
    assert t.restore_latest(with_data=False, step=2) == 2
    assert t.restore_latest() == 4
  finally:
    t.close()
  warnings = [line for line in lines if line.startswith("warning: ")]
  assert len(warnings) == 1, lines
  assert warnings[0].startswith(f"warning: the checkpoints in {workdir / 'checkpoints'} predate "
                                "recorded settings: ")
  assert "lora.alpha" in warnings[0] and "data.seq_len" in warnings[0]
  for k, v in trained[1].items():
    np.testing.assert_array_equal(np.asarray(t.params[k]), v, err_msg=k)
  # The LoRA shapes such checkpoints did record are still checked.
  config.lora.rank = 8
  assert isinstance(_restore(config, workdir)[0], ckpt_lib.CheckpointMismatchError)


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(path: pathlib.Path) -> None:
  """Flips 64 bytes in the middle of the file (its length stays)."""
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  path.write_bytes(bytes(data))


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _change_one_value(step_dir: pathlib.Path) -> None:
  """Moves one float of params/layers.q.lora_b up one ulp, written through tensorstore: the
  files stay valid, as after bit rot inside a compressed block that still decodes, and Orbax
  restores the changed value without complaint."""
  import tensorstore as ts
  array = ts.open({"driver": "zarr", "kvstore": {
      "driver": "ocdbt", "base": f"file://{step_dir / 'state'}/",
      "path": "params.layers.q.lora_b/"}}).result()
  values = array.read().result()
  values.flat[5] = np.nextafter(values.flat[5], np.float32(np.inf))
  array.write(values).result()


# name -> (corrupt the step folder, the file the message names, relative to it)
CORRUPTIONS = {
    "meta truncated": (lambda s: _truncate(s / "meta" / "metadata"), "meta/metadata"),
    "meta garbled": (lambda s: (s / "meta" / "metadata").write_bytes(b"\x00\xff{garbage"),
                     "meta/metadata"),
    "state metadata truncated": (lambda s: _truncate(s / "state" / "_METADATA"),
                                 "state/_METADATA"),
    "array file truncated": (lambda s: _truncate(_largest_array_file(s)), "state"),
    "array file garbled": (lambda s: _garble(_largest_array_file(s)), "state"),
    # Only the checksums recorded at save time catch this one.
    "array value changed": (_change_one_value, "state"),
    "data iterator truncated": (lambda s: _truncate(s / "data_iter" / "process_0-of-1.json"),
                                "data_iter/process_0-of-1.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(case, trained, tokenizer_dir,
                                                              tmp_path):
  corrupt, name = CORRUPTIONS[case]
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / "checkpoints" / "4"
  corrupt(step_dir)
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  step, params, lines = _restore(config, workdir)
  assert step == 2, (step, lines)
  expected = _saved_params(trained[0], 2)
  assert sorted(params) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  warnings = [line for line in lines if line.startswith("warning: ")]
  assert len(warnings) == 1, lines
  assert warnings[0].startswith(f"warning: {step_dir / name}"), warnings
  assert f"using step 2 ({workdir / 'checkpoints' / '2'}) instead" in warnings[0]
  # A training resume moves the unreadable checkpoint aside (step 4 will be saved again).
  assert f"moved to {workdir / 'checkpoints' / '4.unreadable'}" in warnings[0]
  assert (workdir / "checkpoints" / "4.unreadable").is_dir() and not step_dir.exists()


def test_resume_after_a_corrupt_checkpoint_ends_like_an_uninterrupted_run(trained, tokenizer_dir,
                                                                          tmp_path):
  from jaxicd.train import trainer
  workdir = _copy(trained, tmp_path)
  _change_one_value(workdir / "checkpoints" / "4")
  config = train_worker.tiny_config(tokenizer_dir, steps=4, eval_batches=0)
  lines: list[str] = []
  t = trainer.Trainer(config, workdir, print_fn=lines.append)
  try:
    assert t.train()["step"] == 4
    params = t.lora_params_host()
  finally:
    t.close()
  assert any(line.startswith("warning: ") and "using step 2" in line for line in lines), lines
  for k, v in trained[1].items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "4.unreadable"]


@pytest.mark.parametrize("case", ["meta truncated", "array value changed"])
def test_inference_restore_falls_back_without_moving_anything(case, trained, tokenizer_dir,
                                                              tmp_path):
  """The inference restore reads the adapters only: their checksums are still checked."""
  workdir = _copy(trained, tmp_path)
  CORRUPTIONS[case][0](workdir / "checkpoints" / "4")
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  step, params, lines = _restore(config, workdir, with_data=False)
  assert step == 2
  expected = _saved_params(trained[0], 2)
  for k, v in expected.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  assert any("using step 2" in line and "moved" not in line for line in lines), lines


@pytest.mark.parametrize("case", ["meta truncated", "array value changed"])
def test_corrupt_checkpoint_without_a_previous_one_names_its_file(case, trained, tokenizer_dir,
                                                                  tmp_path):
  import shutil
  corrupt, name = CORRUPTIONS[case]
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "2")
  corrupt(workdir / "checkpoints" / "4")
  config = train_worker.tiny_config(tokenizer_dir, steps=4)
  error = _restore(config, workdir)[0]
  assert isinstance(error, Exception) and errors.is_expected(error), error
  text = errors.message(error)
  assert text.startswith(str(workdir / "checkpoints" / "4" / name)), text
  assert "no earlier checkpoint to fall back to" in text
  if case == "array value changed":
    assert text == (f"{workdir / 'checkpoints' / '4' / 'state'}: 1 arrays differ from their "
                    "checksums at save time (a garbled array file): params/layers.q.lora_b; no "
                    "earlier checkpoint to fall back to. Move "
                    f"{workdir / 'checkpoints' / '4'} away to start over"), text
  # Nothing was moved: there is no good checkpoint to continue from.
  assert (workdir / "checkpoints" / "4").is_dir()


def test_a_run_whose_checkpoints_are_all_unreadable_writes_nothing(trained, tokenizer_dir,
                                                                   tmp_path):
  """Refused before the model loads, like any refused run: no config.train.json."""
  import shutil
  from jaxicd import main
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "2")
  _truncate(workdir / "checkpoints" / "4" / "meta" / "metadata")
  before = sorted(p.name for p in workdir.iterdir())
  config = train_worker.tiny_config(tokenizer_dir, steps=6)
  with pytest.raises(ckpt_lib.CheckpointCorruptError,
                     match=rf"^{re.escape(str(workdir / 'checkpoints' / '4' / 'meta' / 'metadata'))}"
                           r": not valid JSON .*; no earlier checkpoint to fall back to"):
    main.run(config, str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == before
  assert not (workdir / "config.train.json").exists()
