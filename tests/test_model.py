"""The Flax Llama against transformers' PyTorch Llama, packing, KV-cache decoding, dtype/remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicd.model import llama
from jaxicd.model.config import LoraConfig, preset

PROMPTS = [
    "Patient is a 67 y/o male with CHF (EF 30%), HTN and T2DM, admitted for acute on chronic "
    "systolic heart failure (I50.23). Furosemide 40 mg IV BID.",
    "Assessment: community-acquired pneumonia, RLL; sepsis ruled out. Plan: ceftriaxone.",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhich ICD-10-CM code fits 'essential hypertension'?<|im_end|>\n"
    "<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def prompt_ids():
  from jaxicd.model.tokenizer import load_tokenizer
  tok = load_tokenizer("smollm2")
  return [tok.encode(p) for p in PROMPTS]


@nnx.jit
def _forward(model, tokens, positions=None, segment_ids=None):
  return model(tokens, positions=positions, segment_ids=segment_ids)


@nnx.jit
def _forward_cached(model, tokens, cache, segment_ids=None):
  return model(tokens, segment_ids=segment_ids, cache=cache)


def _torch_logits(model, ids):
  import torch
  with torch.inference_mode():
    return model(torch.tensor([ids])).logits[0].numpy()


def test_smollm2_logits_match_transformers(jax_smollm2, torch_smollm2, prompt_ids):
  # All prompts in one right-padded batch on the jaxicd side, each alone on the torch side.
  width = max(len(ids) for ids in prompt_ids)
  tokens = np.zeros((len(prompt_ids), width), np.int32)
  segments = np.zeros_like(tokens)
  for row, ids in enumerate(prompt_ids):
    tokens[row, :len(ids)] = ids
    segments[row, :len(ids)] = 1
  logits = np.asarray(_forward(jax_smollm2, jnp.asarray(tokens), segment_ids=jnp.asarray(segments)))
  assert logits.shape == (len(prompt_ids), width, 49152) and logits.dtype == np.float32
  for row, ids in enumerate(prompt_ids):
    ref = _torch_logits(torch_smollm2, ids)
    diff = np.abs(logits[row, :len(ids)] - ref).max()
    assert diff <= 2e-3, (PROMPTS[row][:30], diff)
    # The comparison is not vacuous: logits are large and the argmax agrees.
    assert np.abs(ref).max() > 5
    np.testing.assert_array_equal(logits[row, :len(ids)].argmax(-1), ref.argmax(-1))


def test_packed_segments_equal_separate_runs(jax_smollm2, torch_smollm2, prompt_ids):
  a, b = prompt_ids[0], prompt_ids[1]
  pad = 5
  tokens = np.array([a + b + [0] * pad], np.int32)
  segments = np.array([[1] * len(a) + [2] * len(b) + [0] * pad], np.int32)
  positions = np.array([list(range(len(a))) + list(range(len(b))) + [0] * pad], np.int32)
  packed = np.asarray(_forward(jax_smollm2, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(segments)))[0]
  alone_a = np.asarray(_forward(jax_smollm2, jnp.asarray([a], jnp.int32)))[0]
  alone_b = np.asarray(_forward(jax_smollm2, jnp.asarray([b], jnp.int32)))[0]
  np.testing.assert_allclose(packed[:len(a)], alone_a, atol=5e-4)
  np.testing.assert_allclose(packed[len(a):len(a) + len(b)], alone_b, atol=5e-4)
  assert np.abs(packed[len(a):len(a) + len(b)] - _torch_logits(torch_smollm2, b)).max() <= 2e-3
  # Without segment ids the second prompt would see the first: the mask matters.
  unpacked = np.asarray(_forward(jax_smollm2, jnp.asarray(tokens), jnp.asarray(positions)))[0]
  assert np.abs(unpacked[len(a):len(a) + len(b)] - alone_b).max() > 1e-2


@pytest.fixture(scope="module")
def tiny():
  return llama.create(preset("tiny"), seed=1)


def test_cached_decoding_matches_full_forward(tiny):
  """Jitted prefill of right-padded prompts of different lengths, then one-token steps."""
  cfg = tiny.cfg
  rng = np.random.RandomState(0)
  lengths, total, width = [3, 7], 12, 7
  full = rng.randint(1, cfg.vocab_size, (2, total)).astype(np.int32)
  graphdef, state = nnx.split(tiny)

  @jax.jit
  def step(state, tokens, segment_ids, cache):
    return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, cache=cache)

  prompt = np.zeros((2, width), np.int32)
  seg = np.zeros((2, width), np.int32)
  for row, n in enumerate(lengths):
    prompt[row, :n] = full[row, :n]
    seg[row, :n] = 1
  cache = llama.init_cache(cfg, batch=2, max_len=16)
  logits, cache = step(state, prompt, seg, cache)
  np.testing.assert_array_equal(cache.lengths, lengths)
  got = [[logits[row, n - 1]] for row, n in enumerate(lengths)]
  for t in range(total - min(lengths)):
    nxt = np.array([[full[row, min(n + t, total - 1)]] for row, n in enumerate(lengths)],
                   np.int32)
    logits, cache = step(state, nxt, np.ones((2, 1), np.int32), cache)
    for row in range(2):
      got[row].append(logits[row, 0])
  for row, n in enumerate(lengths):
    ref = np.asarray(_forward(tiny, jnp.asarray(full[row:row + 1])))[0]
    steps = np.stack(got[row])[:total - n + 1]
    np.testing.assert_allclose(steps, ref[n - 1:], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_steps_match_full_forwards(batch):
  """`Llama.decoder` (unrolled layers, per-layer cache, two-row matmuls for one row) after a
  cached prefill of ragged prompts gives, at every step, the logits of a full forward without
  any cache over the same tokens; LoRA adapters (nonzero) and an untied output head included."""
  cfg = preset("tiny").replace(tie_word_embeddings=False)
  model = llama.create(cfg, seed=3, lora=LoraConfig(rank=4, alpha=8.0))
  rng = np.random.RandomState(4)
  for name in ("q", "v", "down"):
    b = getattr(model.layers, name).lora_b
    b.set_value(jnp.asarray(rng.normal(0, 0.05, b.get_value().shape), jnp.float32))
  model.deterministic = True
  lengths, total, steps = [5, 2, 6][:batch], 9, 4
  full = rng.randint(1, cfg.vocab_size, (batch, total)).astype(np.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, prompt, seg, feed):
    m = nnx.merge(graphdef, state)
    _, cache = m.hidden_states(prompt, segment_ids=seg, cache=llama.init_cache(cfg, batch, 12))
    step = m.decoder()
    cache = llama.decode_cache(cache)
    out = []
    for t in range(steps):
      logits, cache = step(feed[:, t], cache)
      out.append(logits)
    return jnp.stack(out, 1), cache.lengths

  prompt, seg = np.zeros((batch, 6), np.int32), np.zeros((batch, 6), np.int32)
  for row, n in enumerate(lengths):
    prompt[row, :n - 1], seg[row, :n - 1] = full[row, :n - 1], 1
  feed = np.stack([full[row, n - 1:n - 1 + steps] for row, n in enumerate(lengths)])
  got, ends = run(state, prompt, seg, feed)
  np.testing.assert_array_equal(ends, np.asarray(lengths) - 1 + steps)
  for row, n in enumerate(lengths):
    ref = np.asarray(_forward(model, jnp.asarray(full[row:row + 1, :n - 1 + steps])))[0]
    np.testing.assert_allclose(np.asarray(got[row]), ref[n - 1:], atol=1e-5)


def test_cache_positions_and_segment_mask_with_left_context(tiny):
  # A cache filled by two calls equals one call over the concatenation.
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, 512, (1, 10)), jnp.int32)
  cache = llama.init_cache(tiny.cfg, 1, 10)
  first, cache = _forward_cached(tiny, tokens[:, :6], cache)
  second, cache = _forward_cached(tiny, tokens[:, 6:], cache)
  full = _forward(tiny, tokens)
  np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=1e-5)
  assert int(cache.lengths[0]) == 10


_REMAT_TOKENS = np.random.RandomState(2).randint(1, 512, (2, 9)).astype(np.int32)


@nnx.jit
def _grads(model):
  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(jnp.asarray(_REMAT_TOKENS)))[..., 0])
  return nnx.grad(loss)(model)


@pytest.fixture(scope="module")
def tiny_grads(tiny):
  return _grads(tiny)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_neither_logits_nor_grads(tiny, tiny_grads, remat):
  other = llama.Llama(tiny.cfg.replace(remat=remat), rngs=nnx.Rngs(0))
  nnx.update(other, nnx.state(tiny))
  g_ref = tiny_grads
  g_remat = _grads(other)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_ref)) > 0


def _saved_activations(cfg, tokens):
  """Shapes of the per-layer, per-token arrays ``[layers, B, T, ...]`` a backward pass keeps."""
  graphdef, state = nnx.split(llama.create(cfg, seed=1))
  _, vjp = jax.vjp(lambda s: nnx.merge(graphdef, s).hidden_states(tokens)[0], state)
  return [l.shape for l in jax.tree.leaves(vjp) if l.shape[:3] == (cfg.num_layers,) + tokens.shape]


def test_remat_dots_keeps_projection_outputs_only():
  """``dots`` keeps at most one array per projection (base + LoRA) plus the residual stream,
  none of the rank-wide LoRA intermediates; ``full`` keeps only the residual stream."""
  from jaxicd.model.config import LoraConfig
  cfg = preset("tiny").replace(lora=LoraConfig(rank=4, alpha=8.0))
  tokens = jnp.asarray(_REMAT_TOKENS)
  full = _saved_activations(cfg.replace(remat="full"), tokens)
  dots = _saved_activations(cfg.replace(remat="dots"), tokens)
  none = _saved_activations(cfg.replace(remat="none"), tokens)
  assert len(full) == 1
  assert 1 < len(dots) <= 8 < len(none)
  assert all(shape[-1] != cfg.lora.rank for shape in dots)
  widths = {cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size,
            cfg.intermediate_size}
  assert all(len(shape) == 4 and shape[-1] in widths for shape in dots)


def test_bfloat16_policy(tiny):
  cfg = tiny.cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(tiny)))
  assert model.layers.q.kernel.get_value().dtype == jnp.bfloat16
  tokens = jnp.asarray(np.random.RandomState(3).randint(1, 512, (2, 9)), jnp.int32)
  logits = _forward(model, tokens)
  assert logits.dtype == jnp.float32
  ref = _forward(tiny, tokens)
  assert float(jnp.abs(logits - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 0.02


def test_every_param_has_logical_axes(tiny):
  from jaxicd.sharding import DEFAULT_RULES, variable_logical_axes
  known = {name for name, _ in DEFAULT_RULES} | {"layers"}
  for path, var in nnx.to_flat_state(nnx.state(tiny, nnx.Param)):
    axes = variable_logical_axes(var)
    assert axes is not None and len(axes) == var.get_value().ndim, path
    assert set(axes) <= known, (path, axes)


# Published parameter counts of the checkpoints the presets describe (model cards / safetensors
# metadata): a wrong width, tie or bias flag in a preset shows up here.
PUBLISHED_PARAMS = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400,
                    "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248,
                    "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts(name):
  cfg = preset(name)
  abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == PUBLISHED_PARAMS[name]


def test_greedy_decode_in_while_loop(tiny):
  """The cache is a valid while_loop carry: jitted prefill + while_loop greedy decoding of two
  prompts of different lengths gives the tokens of step-by-step full forwards."""
  cfg, steps = tiny.cfg, 4
  prompts = [[5, 17, 42], [7, 8, 9, 10, 11]]
  graphdef, state = nnx.split(tiny)

  @jax.jit
  def generate(state, tokens, segment_ids):
    model = nnx.merge(graphdef, state)
    cache = llama.init_cache(cfg, tokens.shape[0], tokens.shape[1] + steps)
    logits, cache = model(tokens, segment_ids=segment_ids, cache=cache)
    last = jnp.take_along_axis(logits, (segment_ids.sum(1) - 1)[:, None, None], axis=1)[:, 0]
    first = last.argmax(-1).astype(jnp.int32)
    out = jnp.zeros((tokens.shape[0], steps), jnp.int32).at[:, 0].set(first)

    def body(carry):
      i, out, cache = carry
      logits, cache = model(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache=cache)
      return i + 1, out.at[:, i].set(logits[:, 0].argmax(-1).astype(jnp.int32)), cache

    _, out, _ = jax.lax.while_loop(lambda c: c[0] < steps, body, (1, out, cache))
    return out

  tokens = np.zeros((2, 5), np.int32)
  seg = np.zeros((2, 5), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
    seg[row, :len(p)] = 1
  got = np.asarray(generate(state, tokens, seg))
  for row, p in enumerate(prompts):
    # Greedy means: each generated token is the argmax of a full forward over what precedes it.
    seq = np.array([p + got[row].tolist()], np.int32)
    predicted = np.asarray(_forward(tiny, jnp.asarray(seq)))[0].argmax(-1)
    assert predicted[len(p) - 1:-1].tolist() == got[row].tolist()
