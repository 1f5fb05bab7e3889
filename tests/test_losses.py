"""The chunked head cross-entropy and the hand-written attention backward pass, against plain
autodiff of the textbook formulas (optax's cross-entropy, softmax attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxicd.model import llama
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
