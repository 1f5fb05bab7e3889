"""LoRA adapters: zero-init, merge, training only adapters, parity with PEFT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import random_hf_llama, require_reference
from jaxicd.infer import generate as gen
from jaxicd.model import llama as llama_lib
from jaxicd.model import lora as lora_lib
from jaxicd.model import weights
from jaxicd.model.config import LoraConfig, preset

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random transformers Llama saved as an HF checkpoint dir (safetensors)."""
  model = random_hf_llama(seed=3)
  path = tmp_path_factory.mktemp("tiny_llama")
  model.save_pretrained(path)
  return model, path


@jax.jit
def _tokens():
  return jax.random.randint(jax.random.key(0), (2, 11), 0, 256, jnp.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _randomize_b(model, seed=0):
  """Gives every adapter a non-zero B so that adapters matter."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if var.get_value().shape[1] == LORA.rank:  # lora_b: [layers, rank, out]
      var.set_value(0.05 * jax.random.normal(next(keys), var.get_value().shape))


def _peft_reference(model):
  """transformers + PEFT on the same random base as ``hf_dir`` (seed 3), with ``model``'s
  adapters copied in; returns the PEFT model and its named parameters."""
  import peft
  import torch
  reference = peft.get_peft_model(
      random_hf_llama(seed=3),
      peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                      target_modules=[p.split(".")[1] for p in PROJECTIONS.values()]))
  params = dict(reference.named_parameters())
  with torch.no_grad():
    for short, long in PROJECTIONS.items():
      linear = getattr(model.layers, short)
      a, b = np.asarray(linear.lora_a.get_value()), np.asarray(linear.lora_b.get_value())
      for layer in range(a.shape[0]):
        prefix = f"base_model.model.model.layers.{layer}.{long}"
        params[f"{prefix}.lora_A.default.weight"].copy_(torch.from_numpy(a[layer].T.copy()))
        params[f"{prefix}.lora_B.default.weight"].copy_(torch.from_numpy(b[layer].T.copy()))
  return reference, params


def test_fresh_adapters_change_nothing(hf_dir):
  _, path = hf_dir
  base = weights.build_model(str(path))
  adapted = weights.build_model(str(path), lora=LORA)
  assert lora_lib.num_params(base) == 0
  # (q, k, v, o, gate, up, down) x (A, B), each stacked over the layers.
  assert len(jax.tree.leaves(lora_lib.lora_state(adapted))) == 7 * 2
  tokens = _tokens()
  np.testing.assert_array_equal(_forward(base, tokens), _forward(adapted, tokens))


def test_merge_equals_unmerged(hf_dir):
  _, path = hf_dir
  model = weights.build_model(str(path), lora=LORA)
  _randomize_b(model)
  tokens = _tokens()
  unmerged = np.asarray(_forward(model, tokens))
  base = weights.build_model(str(path))
  assert np.abs(unmerged - np.asarray(_forward(base, tokens))).max() > 1e-3
  merged_model = lora_lib.merge(model)
  assert lora_lib.num_params(merged_model) == 0 and merged_model.cfg.lora.rank == 0
  np.testing.assert_allclose(np.asarray(_forward(merged_model, tokens)), unmerged, atol=1e-5)


def test_optimizer_step_trains_only_adapters(hf_dir):
  _, path = hf_dir
  model = weights.build_model(str(path), lora=LORA)
  base_before = jax.tree.map(np.array, lora_lib.base_state(model))
  lora_before = jax.tree.map(np.array, lora_lib.lora_state(model))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.LoRAParam)
  tokens = _tokens()

  @nnx.jit
  def train_step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  loss0 = train_step(model, optimizer, tokens)
  for _ in range(3):
    loss = train_step(model, optimizer, tokens)
  assert float(loss) < float(loss0)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(lora_lib.base_state(model))):
    np.testing.assert_array_equal(a, np.asarray(b))  # bit-identical
  lora_after = jax.tree.leaves(lora_lib.lora_state(model))
  changed = [not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(lora_before), lora_after)]
  assert all(changed)


def test_lora_state_round_trip_and_targets(hf_dir):
  _, path = hf_dir
  model = weights.build_model(str(path), lora=LoraConfig(rank=2, alpha=4.0, targets=("q", "v")))
  state = lora_lib.lora_state(model)
  paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(state))
  assert paths == ["layers/q/lora_a", "layers/q/lora_b", "layers/v/lora_a", "layers/v/lora_b"]
  zeros = jax.tree.map(jnp.zeros_like, state)
  nnx.update(model, zeros)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(lora_lib.lora_state(model)))


def test_dropout_only_in_train_mode(hf_dir):
  _, path = hf_dir
  model = weights.build_model(str(path), lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5))
  _randomize_b(model)
  tokens = _tokens()
  twice = nnx.jit(lambda model, tokens: (model(tokens), model(tokens)))
  a, b = twice(model, tokens)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4  # fresh dropout masks per call
  model.eval()
  c, d = twice(model, tokens)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_matches_peft(hf_dir):
  require_reference("peft")
  torch = require_reference("torch")
  hf_model, path = hf_dir
  model = weights.build_model(str(path), lora=LORA)
  _randomize_b(model, seed=1)
  reference, _ = _peft_reference(model)
  tokens = np.asarray(_tokens())
  with torch.inference_mode():
    ref = reference(torch.tensor(tokens).long()).logits.numpy()
    plain = hf_model(torch.tensor(tokens).long()).logits.numpy()
  assert np.abs(ref - plain).max() > 1e-3  # the adapters matter
  np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(tokens))), ref, atol=1e-4)


def test_training_grads_match_peft(hf_dir):
  """Adapter gradients of the training loss (fused head cross-entropy, hand-written LoRA and
  attention backward passes) equal torch autograd through transformers + PEFT."""
  require_reference("peft")
  torch = require_reference("torch")
  from jaxicd.train import losses
  _, path = hf_dir
  model = weights.build_model(str(path), lora=LORA)
  _randomize_b(model, seed=4)
  reference, params = _peft_reference(model)
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, 256, (2, 13)).astype(np.int32)
  targets = rng.integers(0, 256, (2, 13)).astype(np.int32)
  loss_weights = (rng.random((2, 13)) > 0.4).astype(np.float32)

  logits = reference(torch.tensor(tokens).long()).logits
  ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         torch.tensor(targets).long().reshape(-1), reduction="none")
  (ce * torch.tensor(loss_weights).reshape(-1)).sum().backward()

  batch = dict(inputs=jnp.asarray(tokens), targets=jnp.asarray(targets),
               loss_weights=jnp.asarray(loss_weights),
               positions=jnp.broadcast_to(jnp.arange(13, dtype=jnp.int32), (2, 13)),
               segment_ids=jnp.ones((2, 13), jnp.int32))
  grads = nnx.jit(nnx.grad(lambda m: losses.loss_sums(m, batch, chunk_tokens=8)[0],
                           argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  for short, long in PROJECTIONS.items():
    g = getattr(grads.layers, short)
    for name, torch_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      ours = np.asarray(getattr(g, name).get_value())
      for layer in range(ours.shape[0]):
        ref = params[f"base_model.model.model.layers.{layer}.{long}.{torch_name}.default.weight"]
        np.testing.assert_allclose(ours[layer], ref.grad.numpy().T, atol=2e-5, rtol=1e-4,
                                   err_msg=f"{short}.{name}[{layer}]")


def test_decoding_copy_folds_adapters_and_casts_without_touching_the_model():
  cfg = preset("tiny").replace(dtype="bfloat16", param_dtype="bfloat16")
  model = llama_lib.create(cfg, seed=2, lora=LoraConfig(rank=4, alpha=8.0))
  for path, v in nnx.iter_graph(model):  # non-zero adapters (B starts at zero)
    if isinstance(v, nnx.LoRAParam):
      v[...] = jax.random.normal(jax.random.key(len(path)), v[...].shape) * 0.05
  copy = lora_lib.decoding_copy(model, "float32")
  assert copy.cfg.dtype == "float32" and copy.cfg.lora.rank == 0
  assert not list(nnx.state(copy, nnx.LoRAParam).flat_state())
  assert model.cfg.dtype == "bfloat16" and lora_lib.num_params(model) > 0  # the model is unchanged
  # Reference: the same weights widened to float32, adapters kept apart (x W + s (x A) B).
  wide = llama_lib.create(cfg.replace(dtype="float32", param_dtype="float32"), seed=2,
                          lora=LoraConfig(rank=4, alpha=8.0))
  nnx.update(wide, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)))
  np.testing.assert_allclose(np.asarray(copy(tokens)), np.asarray(wide(tokens)), atol=2e-5)
  prompts = [np.asarray(t) for t in np.asarray(tokens)]
  a = gen.generate(copy, prompts, max_new_tokens=6, stop_ids=[])
  b = gen.generate(wide, prompts, max_new_tokens=6, stop_ids=[])
  np.testing.assert_array_equal(a.tokens, b.tokens)
