"""Token cross-entropy of a causal LM, computed without materialising the logits.

The output projection of a 49k-word (SmolLM2) or 128k-word (Llama 3) vocabulary is the largest
activation of a training step: 8 x 256 tokens of float32 logits are 400 MB, written by the
forward matmul, read by the softmax, written again as their gradient and read by the backward
matmul. ``head_cross_entropy`` instead walks the sequence in chunks and, for each chunk, computes
the logits, the loss and, when differentiated, the gradient of the hidden states straight away,
so only one chunk of logits exists at a time.

The output embedding is frozen (LoRA fine-tuning never trains it), so it gets no gradient: the
hidden states' gradient is all the backward pass needs, and it is complete once the forward
pass has seen every chunk. That gradient is therefore computed in the forward pass and the
backward pass only scales it by the incoming cotangent.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxicd.model.llama import project_to_vocab, softmax_stats

# Tokens of the global batch per chunk: [chunk, vocab] float32 logits are ~200 MB for
# SmolLM2's vocabulary, small next to the model, large enough to keep the matmul efficient.
DEFAULT_CHUNK_TOKENS = 1024


def loss_sums(model, batch: Mapping[str, jax.Array], *,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropy x loss weight, sum of weight x correct) over a [B, T] batch."""
  hidden, _ = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
  w, vocab_major = model.output_embedding()
  return head_cross_entropy(hidden, w, batch["targets"],
                            batch["loss_weights"].astype(jnp.float32),
                            vocab_major=vocab_major, chunk_tokens=chunk_tokens)


def head_cross_entropy(hidden: jax.Array, w: jax.Array, targets: jax.Array,
                       weights: jax.Array, *, vocab_major: bool,
                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[jax.Array, jax.Array]:
  """Weighted cross-entropy and weighted argmax-accuracy sums of ``logits(hidden)``.

  Args:
    hidden: ``[B, T, hidden]`` final hidden states (their dtype is the matmul dtype).
    w: the output embedding, ``[vocab, hidden]`` if ``vocab_major`` else ``[hidden, vocab]``.
      Treated as a constant: it receives no gradient.
    targets: int ``[B, T]`` next-token ids.
    weights: float32 ``[B, T]`` loss weights (0 = not a target).
    vocab_major: the layout of ``w``.
    chunk_tokens: about how many tokens (over the batch) share one chunk of logits.

  Returns:
    ``(sum(ce * weights), sum((argmax == target) * weights))``, float32 scalars; only the first
    is differentiable (with respect to ``hidden``).
  """
  B, T = targets.shape
  chunk_len = max(1, min(T, chunk_tokens // max(B, 1)))
  chunks = -(-T // chunk_len)
  pad = chunks * chunk_len - T
  if pad:  # Padded positions carry weight 0, so they add nothing to either sum.
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  w = jax.lax.stop_gradient(w).astype(hidden.dtype)  # cast once, not once per chunk
  ce, correct = _chunked_ce(hidden, w, targets, weights,
                            vocab_major, chunks)
  return ce, correct


def _split(x: jax.Array, chunks: int) -> jax.Array:
  """``[B, chunks * c, ...] -> [chunks, B, c, ...]``: chunks along the sequence, so the batch
  axis (sharded over data/fsdp) stays where it is."""
  B, T = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, chunks, T // chunks, *x.shape[2:]), 1, 0)


def _merge(x: jax.Array) -> jax.Array:
  """Inverse of ``_split``."""
  chunks, B, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, chunks * c, *x.shape[3:])


def _chunk_loss(h, w, targets, weights, vocab_major, with_grad):
  """Loss sums of one chunk and, if ``with_grad``, d(ce sum)/d(h) ``[B, c, hidden]``."""
  logits = project_to_vocab(h, w, vocab_major)                     # float32 [B, c, V]
  top, rel_lse = softmax_stats(logits)
  lse = top + rel_lse
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = jnp.sum((lse - target_logit) * weights)
  # "The target has the highest logit", from the max already at hand: an argmax would be one
  # more pass over [B, c, V] (only exact ties count differently, as correct).
  correct = jnp.sum((target_logit >= top).astype(jnp.float32) * weights)
  if not with_grad:
    return ce, correct, None
  # d ce / d logits = (softmax - one_hot(target)) * weight, one fused elementwise pass.
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  dlogits = (jnp.exp(logits - lse[..., None]) - (vocab == targets[..., None])) * weights[..., None]
  spec = "btv,vd->btd" if vocab_major else "btv,dv->btd"
  dh = jnp.einsum(spec, dlogits.astype(h.dtype), w.astype(h.dtype),
                  preferred_element_type=jnp.float32)
  return ce, correct, dh.astype(h.dtype)


def _scan_chunks(hidden, w, targets, weights, vocab_major, chunks, with_grad):
  def body(carry, xs):
    ce_acc, correct_acc = carry
    h, t, wt = xs
    ce, correct, dh = _chunk_loss(h, w, t, wt, vocab_major, with_grad)
    return (ce_acc + ce, correct_acc + correct), dh

  zero = jnp.zeros((), jnp.float32)
  xs = (_split(hidden, chunks), _split(targets, chunks), _split(weights, chunks))
  (ce, correct), dh = jax.lax.scan(body, (zero, zero), xs)
  return ce, correct, (None if dh is None else _merge(dh))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_ce(hidden, w, targets, weights, vocab_major, chunks):
  ce, correct, _ = _scan_chunks(hidden, w, targets, weights, vocab_major, chunks, False)
  return ce, correct


def _chunked_ce_fwd(hidden, w, targets, weights, vocab_major, chunks):
  ce, correct, dh = _scan_chunks(hidden, w, targets, weights, vocab_major, chunks, True)
  return (ce, correct), dh


def _chunked_ce_bwd(vocab_major, chunks, dh, cotangents):
  del vocab_major, chunks
  g_ce, _ = cotangents  # The accuracy sum is a metric: it passes no gradient.
  # No gradient for w (frozen), targets (integers) or weights (data).
  return (dh * g_ce.astype(dh.dtype), None, None, None)


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
