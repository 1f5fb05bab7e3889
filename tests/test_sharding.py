"""Mesh construction, logical rules, and sharded-vs-single-device equality of the train step.

The 8-device checks run in a subprocess (tests/train_worker.py) so that the fake device count
does not leak into other test files.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

from jaxicd import sharding as shd


@pytest.mark.parametrize("sizes,devices,expected", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=-1, tensor=1), 32, (1, 32, 1)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (dict(fsdp=4), 4, (1, 4, 1)),
])
def test_resolve_mesh_shape(sizes, devices, expected):
  assert shd.resolve_mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes,devices,message", [
    (dict(data=-1, fsdp=-1), 8, "at most one axis"),
    (dict(data=3, fsdp=-1), 8, "not divisible"),
    (dict(data=2, fsdp=2, tensor=1), 8, "needs 4 devices"),
    (dict(data=0), 1, "positive or -1"),
])
def test_resolve_mesh_shape_errors(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    shd.resolve_mesh_shape(sizes, devices)


def test_logical_rules_by_hand():
  assert shd.logical_to_spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")
  assert shd.logical_to_spec(("layers", "embed", "lora")) == P(None, "fsdp", None)
  assert shd.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert shd.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
  # One mesh axis per spec: the second 'embed' is replicated.
  assert shd.logical_to_spec(("embed", "embed")) == P("fsdp", None)
  assert shd.logical_to_spec(None) == P()


class _FakeMesh:
  shape = {"data": 2, "fsdp": 2, "tensor": 2}


def test_fit_spec_drops_axes_that_do_not_divide():
  # 3 KV heads x 64 = 192 divides by 2; a dim of 3 does not.
  assert shd.fit_spec(P("fsdp", "tensor"), (576, 192), _FakeMesh) == P("fsdp", "tensor")
  assert shd.fit_spec(P("fsdp", "tensor"), (576, 3), _FakeMesh) == P("fsdp", None)
  assert shd.fit_spec(P(("data", "fsdp"), None), (6, 8), _FakeMesh) == P("data", None)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  tok = train_worker.write_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))
  return train_worker.run_worker("parity", dict(tokenizer_dir=str(tok), overfit_steps=20))


def test_loss_and_grads_match_single_device(parity):
  assert parity["devices"] == 8 and parity["mesh_shape"] == dict(data=2, fsdp=2, tensor=2)
  assert abs(parity["loss_single"] - parity["loss_mesh"]) <= 1e-5
  assert parity["max_grad_diff"] <= 1e-5
  # Not vacuous: every adapter gets a real gradient.
  assert parity["grads_nonzero"] == parity["num_params"] == 14
  assert parity["max_grad_abs"] > 1e-4


def test_gradient_accumulation_equals_one_big_batch(parity):
  # Microbatches of 4 rows on the (2, 2, 2) mesh: their rows split over data x fsdp = 4 shards.
  assert parity["accum_loss_diff"] <= 1e-5
  assert parity["accum_max_grad_diff"] <= 1e-5


# Hand-derived from the model's logical axes (jaxicd.model.llama) and DEFAULT_RULES.
EXPECTED_LORA = {
    "q": ("P(None, 'fsdp', None)", "P(None, None, 'tensor')"),
    "k": ("P(None, 'fsdp', None)", "P(None, None, 'tensor')"),
    "v": ("P(None, 'fsdp', None)", "P(None, None, 'tensor')"),
    "o": ("P(None, 'tensor', None)", "P(None, None, 'fsdp')"),
    "gate": ("P(None, 'fsdp', None)", "P(None, None, 'tensor')"),
    "up": ("P(None, 'fsdp', None)", "P(None, None, 'tensor')"),
    "down": ("P(None, 'tensor', None)", "P(None, None, 'fsdp')"),
}


def test_params_are_sharded_as_the_rules_say(parity):
  for name, (spec_a, spec_b) in EXPECTED_LORA.items():
    assert parity["param_specs"][f"layers.{name}.lora_a"] == spec_a
    assert parity["param_specs"][f"layers.{name}.lora_b"] == spec_b
    # Gradients come out with the params' shardings (explicit out_shardings).
    assert parity["grad_specs"][f"layers.{name}.lora_a"] == spec_a
  base = parity["base_specs"]
  assert base["embed"] == "P('tensor', 'fsdp')"            # (vocab, embed)
  assert base["lm_head"] == "P('fsdp', 'tensor')"          # (embed, vocab)
  assert base["layers.q.kernel"] == "P(None, 'fsdp', 'tensor')"
  assert base["layers.down.kernel"] == "P(None, 'tensor', 'fsdp')"
  assert base["layers.attn_norm"] == "P(None, None)"
  assert parity["batch_spec"] == "P(('data', 'fsdp'), None)"


def test_training_on_the_mesh_changes_only_adapters_and_overfits(parity):
  assert parity["base_unchanged"] and parity["params_changed"]
  losses = parity["overfit_losses"]
  assert losses[-1] < losses[0] - 0.2, losses
  assert all(b <= a + 0.05 for a, b in zip(losses, losses[1:])), losses


def test_nan_guard_skips_the_update(parity):
  assert parity["nan_step_finite"] == 0.0
  assert parity["nan_step_loss"] in ("nan", "inf")
  assert parity["nan_step_params_kept"]
