"""The chunked head cross-entropy and the hand-written attention backward pass, against plain
autodiff of the textbook formulas (optax's cross-entropy, softmax attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxicd.model import llama
from jaxicd.model.config import LoraConfig, preset
from jaxicd.train import losses


def _reference_sums(hidden, w, targets, weights, vocab_major):
  logits = llama.project_to_vocab(hidden, w, vocab_major)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(correct * weights)


@pytest.mark.parametrize("vocab_major,seq,chunk_tokens", [
    (True, 37, 64),     # 37 is not a multiple of the chunk: padded positions must add nothing
    (False, 40, 16),    # untied [hidden, vocab] head, 10 chunks
    (True, 9, 4096),    # one chunk
])
def test_head_cross_entropy_matches_optax(vocab_major, seq, chunk_tokens):
  rng = np.random.default_rng(seq)
  B, E, V = 4, 24, 97
  hidden = jnp.asarray(rng.standard_normal((B, seq, E)), jnp.float32)
  w = jnp.asarray(0.3 * rng.standard_normal((V, E) if vocab_major else (E, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, seq)), jnp.int32)
  weights = jnp.asarray(rng.random((B, seq)) > 0.3, jnp.float32)
  # Make some predictions right, so that the accuracy sum is not trivially 0.
  logits = llama.project_to_vocab(hidden, w, vocab_major)
  targets = jnp.where(rng.random((B, seq)) > 0.5, jnp.argmax(logits, -1), targets)

  fused = lambda h: losses.head_cross_entropy(h, w, targets, weights, vocab_major=vocab_major,
                                              chunk_tokens=chunk_tokens)
  ref = lambda h: _reference_sums(h, w, targets, weights, vocab_major)
  (ce, correct), (ce_ref, correct_ref) = jax.jit(fused)(hidden), ref(hidden)
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-5)
  assert float(correct) == float(correct_ref) > 0
  # The cotangent of the loss sum scales the gradient computed in the forward pass.
  grad = jax.jit(jax.grad(lambda h: 2.5 * fused(h)[0]))(hidden)
  grad_ref = jax.grad(lambda h: 2.5 * ref(h)[0])(hidden)
  np.testing.assert_allclose(grad, grad_ref, atol=2e-6)


def _reference_attention(q, k, v, mask):
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def test_attention_backward_matches_autodiff():
  rng = np.random.default_rng(0)
  B, T, H, D = 2, 7, 3, 8
  q, k, v, d_out = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(4))
  # Row 0: two packed segments; row 1: one segment then padding (fully masked query rows).
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]])
  steps = jnp.arange(T)
  mask = ((steps[:, None] >= steps[None, :]) & (segments[:, :, None] == segments[:, None, :])
          & (segments[:, None, :] != 0))
  out, vjp = jax.vjp(lambda q, k, v: llama._multi_head_attention(q, k, v, mask), q, k, v)
  out_ref, vjp_ref = jax.vjp(lambda q, k, v: _reference_attention(q, k, v, mask), q, k, v)
  np.testing.assert_allclose(out, out_ref, atol=1e-6)
  for ours, ref in zip(vjp(d_out), vjp_ref(d_out)):
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_shared_prompt_packing_has_the_unshared_loss_and_gradients():
  """A packed row [prefix | a | b] (a and b negative segments reading the prefix) gives the
  loss and gradients of the two examples laid out whole, each in its own row."""
  cfg = preset("tiny")
  model = llama.create(cfg, seed=1, lora=LoraConfig(rank=4, alpha=8.0))
  # Non-zero adapters, so their gradients are not trivially those of a zero B.
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.LoRAParam):
      v[...] = jax.random.normal(jax.random.key(len(path)), v[...].shape) * 0.05
  rng = np.random.default_rng(0)
  prefix, a, b = (rng.integers(1, cfg.vocab_size, n) for n in (9, 7, 5))
  wa, wb = (rng.integers(0, 2, n).astype(np.float32) for n in (6, 4))
  T = 32

  def row(parts):
    out = {k: np.zeros((1, T), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                    "positions")}
    out["loss_weights"] = np.zeros((1, T), np.float32)
    at = 0
    for inputs, targets, weights, seg, pos in parts:
      k = len(inputs)
      for name, x in (("inputs", inputs), ("targets", targets), ("loss_weights", weights),
                      ("segment_ids", seg), ("positions", pos)):
        out[name][0, at:at + k] = x
      at += k
    return out

  def whole(ex, w):  # one example, unshared: [prefix | ex] shifted, weights on ex's targets
    t = np.concatenate([prefix, ex])
    weights = np.concatenate([np.zeros(len(prefix)), w])
    return row([(t[:-1], t[1:], weights, np.ones(len(t) - 1), np.arange(len(t) - 1))])

  n = len(prefix)
  shared = row([(prefix, np.append(prefix[1:], a[0]), np.zeros(n), np.ones(n), np.arange(n)),
                (a[:-1], a[1:], wa, np.full(6, -2), n + np.arange(6)),
                (b[:-1], b[1:], wb, np.full(4, -3), n + np.arange(4))])
  # In the unshared rows the prefix's last input predicts the example's first token: weight 0.
  unshared = [whole(a, wa), whole(b, wb)]

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, batch):
    m = nnx.merge(graphdef, p, rest)
    return losses.loss_sums(m, {k: jnp.asarray(v) for k, v in batch.items()})[0]

  l_shared, g_shared = jax.value_and_grad(loss)(params, shared)
  parts = [jax.value_and_grad(loss)(params, u) for u in unshared]
  l_ref = sum(p[0] for p in parts)
  g_ref = jax.tree.map(lambda x, y: x + y, parts[0][1], parts[1][1])
  assert float(l_ref) > 0
  np.testing.assert_allclose(float(l_shared), float(l_ref), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)
