"""A Llama-family decoder (Llama 2/3.x, SmolLM2, Qwen2) in Flax NNX.

Layers are stored stacked: every per-layer weight is one array with a leading ``layers`` axis and
the forward pass runs ``jax.lax.scan`` over it, so a 30-layer model compiles as fast as a 1-layer
one. Kernels are laid out ``[in, out]`` (``y = x @ kernel``).

Every parameter carries its logical axis names in the variable metadata ``logical_axes`` (names
from ``jaxicd.sharding``; the leading ``layers`` axis has no rule and stays replicated).
``jaxicd.sharding.param_shardings`` turns them into ``NamedSharding``s for a mesh.

Attention masks come from ``segment_ids`` (0 = padding): a token attends to itself and to earlier
tokens of its own segment, so packed rows work when ``positions`` restart per segment. A negative
segment also reads segment 1, a prompt prefix its row's examples share (their positions continue
after it): shared-prompt packing computes that prefix once per row instead of once per example.

Decoding uses a ``KVCache`` with per-row lengths: rows are right-padded, a call with ``cache=``
writes its tokens at slots ``lengths[b] + t`` of row ``b`` and advances ``lengths[b]`` by the
number of real tokens (``segment_ids != 0``) in the row, so one jitted prefill over prompts of
different lengths followed by a ``jax.lax.while_loop`` of one-token steps needs no re-padding.
The one-token steps run ``Llama.decoder``: the layers unrolled over per-layer weights and a
per-layer ``DecodeCache`` (a layer scan copies each layer's weights on every step on the CPU).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicd.model.config import LlamaConfig, LoraConfig, RopeScaling
from jaxicd.sharding import LOGICAL_AXES

_NEG_INF = -1e30  # Finite, so fully-masked (padding) rows give uniform, not NaN, attention.
_INIT_STD = 0.02  # transformers' initializer_range for Llama-family models.


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

def _param(value: jax.Array, axes: tuple[str | None, ...], cls=nnx.Param) -> nnx.Variable:
  return cls(value, **{LOGICAL_AXES: axes})


class StackedLinear(nnx.Module):
  """``num_layers`` linear maps ``[in] -> [out]`` in one ``[L, in, out]`` kernel, with an
  optional bias and an optional LoRA adapter (``lora_a [L, in, r]``, ``lora_b [L, r, out]``)."""

  def __init__(self, num_layers: int, in_features: int, out_features: int,
               axes: tuple[str, str], *, bias: bool, lora_rank: int, param_dtype: str,
               rngs: nnx.Rngs):
    in_axis, out_axis = axes
    shape = (num_layers, in_features, out_features)
    self.kernel = _param(
        _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32).astype(param_dtype),
        ("layers", in_axis, out_axis))
    self.bias = (_param(jnp.zeros((num_layers, out_features), param_dtype), ("layers", out_axis))
                 if bias else None)
    if lora_rank:
      # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0, so a
      # fresh adapter changes nothing. Adapters are kept in float32 whatever the base dtype.
      bound = 1.0 / math.sqrt(in_features)
      self.lora_a = _param(
          jax.random.uniform(rngs.params(), (num_layers, in_features, lora_rank), jnp.float32,
                             -bound, bound),
          ("layers", in_axis, "lora"), nnx.LoRAParam)
      self.lora_b = _param(jnp.zeros((num_layers, lora_rank, out_features), jnp.float32),
                           ("layers", "lora", out_axis), nnx.LoRAParam)
    else:
      self.lora_a = self.lora_b = None

  def arrays(self) -> dict[str, jax.Array]:
    out = {"kernel": self.kernel.get_value()}
    if self.bias is not None:
      out["bias"] = self.bias.get_value()
    if self.lora_a is not None:
      out["lora_a"] = self.lora_a.get_value()
      out["lora_b"] = self.lora_b.get_value()
    return out


class DecoderLayers(nnx.Module):
  """All decoder blocks, stacked on a leading ``layers`` axis."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    L, E, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    pd = cfg.param_dtype
    targets = set(cfg.lora.targets) if cfg.lora.rank else set()

    def linear(name, din, dout, axes, bias=False):
      return StackedLinear(L, din, dout, axes, bias=bias,
                           lora_rank=cfg.lora.rank if name in targets else 0,
                           param_dtype=pd, rngs=rngs)

    self.attn_norm = _param(jnp.ones((L, E), pd), ("layers", "norm"))
    self.q = linear("q", E, q_dim, ("embed", "heads"), cfg.attention_bias)
    self.k = linear("k", E, kv_dim, ("embed", "kv_heads"), cfg.attention_bias)
    self.v = linear("v", E, kv_dim, ("embed", "kv_heads"), cfg.attention_bias)
    self.o = linear("o", q_dim, E, ("heads", "embed"))
    self.mlp_norm = _param(jnp.ones((L, E), pd), ("layers", "norm"))
    self.gate = linear("gate", E, F, ("embed", "mlp"))
    self.up = linear("up", E, F, ("embed", "mlp"))
    self.down = linear("down", F, E, ("mlp", "embed"))

  def arrays(self) -> dict[str, Any]:
    out: dict[str, Any] = {"attn_norm": self.attn_norm.get_value(),
                           "mlp_norm": self.mlp_norm.get_value()}
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
      out[name] = getattr(self, name).arrays()
    return out


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------

class KVCache(NamedTuple):
  """Keys/values ``[layers, batch, max_len, kv_heads, head_dim]`` and filled slots per row.

  A pytree, so it can be a ``jax.lax.while_loop`` carry and a jit argument/result.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array  # int32 [batch]: slots [0, lengths[b]) of row b hold real tokens.

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  # Logical axes of k and v, for sharding the cache like the activations.
  LOGICAL_AXES = ("layers", "batch", "length", "kv_heads", None)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for ``batch`` rows of at most ``max_len`` tokens (prompt + generated)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class DecodeCache(NamedTuple):
  """The cache of `Llama.decoder` steps: per layer, keys and values ``[batch, kv_heads, max_len,
  head_dim]`` as arrays of their own, and filled slots per row.

  Separate buffers let each step write its slot in place; slicing a stacked cache in the layer
  scan copied every layer's cache on every step. Heads come before slots so the attention dots
  read the cache as it lies, with no transposed copy.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array  # int32 [batch]


def decode_cache(cache: KVCache) -> DecodeCache:
  """A (prefilled) `KVCache` laid out for `Llama.decoder` steps (one copy)."""
  k, v = jnp.swapaxes(cache.k, 2, 3), jnp.swapaxes(cache.v, 2, 3)
  return DecodeCache(tuple(k), tuple(v), cache.lengths)


# --------------------------------------------------------------------------------------------
# Building blocks (pure functions of arrays; the scan body uses them)
# --------------------------------------------------------------------------------------------

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 (like transformers), returned in x's dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (scale.astype(x.dtype) * xf.astype(x.dtype))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None,
                  freq_factors: tuple[float, ...] | None = None) -> np.ndarray:
  """Inverse RoPE frequencies ``[head_dim // 2]`` (float32), with optional llama3 scaling
  (``scaling``, transformers' form, or ``freq_factors``, llama.cpp's form)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  inv_freq = inv_freq.astype(np.float32)
  if freq_factors is not None:
    inv_freq = (inv_freq / np.asarray(freq_factors, np.float32)).astype(np.float32)
  if scaling is None:
    return inv_freq
  # Llama 3: long wavelengths are slowed down by `factor`, short ones kept, and the band in
  # between interpolated smoothly.
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos/sin ``[B, T, head_dim]`` in the rotate-half layout of transformers."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: ``[B, T, heads, head_dim]``; rotate-half RoPE (computed in float32)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def _linear(p: dict[str, jax.Array], x: jax.Array, lora_scale: float,
            dropout: tuple[float, jax.Array] | None) -> jax.Array:
  """``x @ kernel + bias + scale * (dropout(x) @ lora_a) @ lora_b``."""
  dtype = x.dtype
  y = jnp.einsum("btd,df->btf", x, p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  if "lora_a" in p:
    xa = x
    if dropout is not None:
      rate, key = dropout
      keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
      xa = jnp.where(keep, x / (1.0 - rate), 0).astype(dtype)
    y = y + _lora_delta(xa, p["lora_a"].astype(dtype), p["lora_b"].astype(dtype), lora_scale)
  return checkpoint_name(y, "projection")


@jax.custom_vjp
def _lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale * (x @ a) @ b`` for x ``[B, T, in]``, a ``[in, r]``, b ``[r, out]``."""
  return _lora_delta_fwd(x, a, b, scale)[0]


def _lora_delta_fwd(x, a, b, scale):
  xa = jnp.einsum("btd,dr->btr", x, a)
  return scale * jnp.einsum("btr,rf->btf", xa, b), (x, a, b, xa, scale)


def _lora_delta_bwd(res, g):
  # Written out: on a SmolLM2 bf16 CPU training step, plain autodiff of the two einsums measured
  # ~25% slower, and materialising transposed operands for plain row-major GEMMs ~10% slower,
  # than this form, where each adapter-gradient dot contracts the token axes in one einsum,
  # accumulated in float32 (it sums over every token of the batch).
  x, a, b, xa, scale = res
  g = g * jnp.asarray(scale, g.dtype)
  gb = jnp.einsum("btf,rf->btr", g, b)
  dx = jnp.einsum("btr,dr->btd", gb, a)
  da = jnp.einsum("btd,btr->dr", x, gb, preferred_element_type=jnp.float32)
  db = jnp.einsum("btr,btf->rf", xa, g, preferred_element_type=jnp.float32)
  return dx, da.astype(a.dtype), db.astype(b.dtype), None


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention. q ``[B,T,H,D]``, k/v ``[B,S,Hkv,D]``, mask bool ``[B,T,S]``.

  Query head h reads kv head ``h // (H // Hkv)`` (transformers' ``repeat_kv`` order).
  """
  B, T, H, D = q.shape
  kv_heads = k.shape[2]
  if T == 1:
    return _one_token_attention(q[:, 0], jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                                mask[:, 0])[:, None]
  # Prefill/training: repeating k/v to all query heads makes plain [B, H]-batched matmuls, which
  # XLA:CPU runs ~2.5x faster than the grouped 5-D contraction (measured on SmolLM2 shapes).
  k = jnp.repeat(k, H // kv_heads, axis=2)
  v = jnp.repeat(v, H // kv_heads, axis=2)
  return _multi_head_attention(q, k, v, mask).reshape(B, T, H * D)


def _one_token_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """One query token per row: q ``[B,H,D]``, k/v ``[B,Hkv,S,D]``, mask bool ``[B,S]`` ->
  ``[B, H*D]``. The query heads are grouped by the kv head they read instead of repeating the
  (long) cache to every query head."""
  B, H, D = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(B, kv_heads, H // kv_heads, D)
  scores = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None, :], scores * (D ** -0.5), _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(B, H * D)


def _attention_scores(q, k, mask):
  """Masked, scaled scores float32 ``[B, H, T, S]``."""
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
  return jnp.where(mask[:, None, :, :], scores * (q.shape[-1] ** -0.5), _NEG_INF)


def softmax_stats(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Max and log-sum-exp relative to it over the last axis: ``softmax = exp(s - m - l)``,
  ``logsumexp = m + l``. Kept apart because ``m + l`` loses ``l`` when a row of attention
  scores is fully masked (``m = -1e30``)."""
  m = jnp.max(scores, axis=-1)
  return m, jnp.log(jnp.sum(jnp.exp(scores - m[..., None]), axis=-1))


def _attention_forward(q, k, v, mask):
  scores = _attention_scores(q, k, mask)
  m, l = softmax_stats(scores)
  probs = jnp.exp(scores - m[..., None] - l[..., None])
  out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)
  return out, (m, l)


@jax.custom_vjp
def _multi_head_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(D), masked) v for q ``[B,T,H,D]``, k/v ``[B,S,H,D]``."""
  return _attention_forward(q, k, v, mask)[0]


def _multi_head_attention_fwd(q, k, v, mask):
  out, stats = _attention_forward(q, k, v, mask)
  return out, (q, k, v, mask, out, stats)


def _multi_head_attention_bwd(res, d_out):
  # The softmax backward written out: probabilities are recomputed from the saved row
  # statistics instead of being stored ([B, H, T, S] per layer), and each of the four matmuls
  # takes compute-dtype operands (autodiff would run the score gradients in float32).
  q, k, v, mask, out, (m, l) = res
  dtype = q.dtype
  probs = jnp.exp(_attention_scores(q, k, mask) - m[..., None] - l[..., None])
  d_v = jnp.einsum("bhts,bthd->bshd", probs.astype(dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bthd,bshd->bhts", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_scores = probs * (d_probs - row[..., None]) * (q.shape[-1] ** -0.5)
  # Masked scores are constants (nonzero only in fully masked padding rows, where probs are
  # uniform).
  d_scores = jnp.where(mask[:, None, :, :], d_scores, 0).astype(dtype)
  d_q = jnp.einsum("bhts,bshd->bthd", d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bhts,bthd->bshd", d_scores, q, preferred_element_type=jnp.float32)
  return d_q.astype(dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_multi_head_attention.defvjp(_multi_head_attention_fwd, _multi_head_attention_bwd)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # The 7 projections' outputs (base + LoRA, as `_linear` names them): saving every dot would
    # also keep each LoRA delta's [B, T, out] product next to the base product it is added to,
    # ~1.6x the activations (f32 SmolLM2 8 x 256 step: 4.1 -> 2.9 GB peak RSS, and ~10% faster).
    "dots": jax.checkpoint_policies.save_only_these_names("projection"),
}


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class Llama(nnx.Module):
  """Llama-family causal LM. ``model(tokens) -> logits [B, T, vocab]`` (float32)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = _param(
        _INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                      jnp.float32).astype(pd), ("vocab", "embed"))
    self.layers = DecoderLayers(cfg, rngs=rngs)
    self.final_norm = _param(jnp.ones((cfg.hidden_size,), pd), ("norm",))
    self.lm_head = None if cfg.tie_word_embeddings else _param(
        _INIT_STD * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
                                      jnp.float32).astype(pd), ("embed", "vocab"))
    # LoRA dropout is active unless `model.eval()` was called (NNX's train/eval convention).
    self.deterministic = False
    # XLA's RngBitGenerator ("rbg") compiles and runs much faster on CPU than threefry, and
    # dropout masks need no cross-platform reproducibility.
    self.dropout_rngs = (
        nnx.Rngs(dropout=jax.random.key(jax.random.randint(rngs.dropout(), (), 0, 2**31 - 1),
                                        impl="rbg"))
        if cfg.lora.rank and cfg.lora.dropout > 0 else None)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None):
    """Logits float32 ``[B, T, vocab]``; with ``cache=``, returns ``(logits, new_cache)``.

    ``logits(hidden_states(...))``; training computes its loss from ``hidden_states`` without
    materialising the logits.

    Args:
      tokens: int32 ``[B, T]``.
      positions: int32 ``[B, T]`` RoPE positions. Default: ``arange(T)`` without a cache,
        ``cache.lengths[:, None] + arange(T)`` with one.
      segment_ids: int32 ``[B, T]``; 0 marks padding. Without a cache, a token attends to
        earlier tokens of its own segment; a token of a negative segment also to segment 1 (a
        prompt prefix shared by the row's examples, placed first; shared-prompt packing). With
        a cache, nonzero marks the real tokens, which must come first in each row (right
        padding); only they advance ``cache.lengths``.
      cache: a ``KVCache`` from ``init_cache``.
    """
    x, new_cache = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids,
                                      cache=cache)
    logits = self.logits(x)
    return logits if cache is None else (logits, new_cache)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, cache: KVCache | None = None
                    ) -> tuple[jax.Array, KVCache | None]:
    """The final-normed hidden states ``[B, T, hidden]`` (compute dtype) and the new cache
    (None without ``cache=``). Arguments as for ``__call__``."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    B, T = tokens.shape
    steps = jnp.arange(T, dtype=jnp.int32)[None, :]
    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(steps, (B, T))
      seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
      causal = steps[:, :, None] >= steps[:, None, :]  # [1, T(query), T(key)]
      same = seg[:, :, None] == seg[:, None, :]
      # Negative segments also read segment 1: the prompt prefix their row shares.
      shared = (seg[:, :, None] < 0) & (seg[:, None, :] == 1)
      mask = causal & (same | shared) & (seg[:, None, :] != 0)
      slots = None
    else:
      slots = cache.lengths[:, None] + steps  # [B, T]: where this call's tokens are written.
      if positions is None:
        positions = slots
      # Slots are filled contiguously from 0, so "earlier or same slot" is the whole mask.
      key_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
      mask = key_slots[None, None, :] <= slots[:, :, None]  # [B, T, S]
    cos, sin = rope_tables(positions,
                           rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                         cfg.rope_freq_factors))

    x = jnp.take(self.embed.get_value(), tokens, axis=0).astype(dtype)
    layer_params = self.layers.arrays()
    dropout_keys = None
    if self.dropout_rngs is not None and not self.deterministic:
      dropout_keys = jax.random.split(self.dropout_rngs.dropout(), (cfg.num_layers, 7))
    lora_scale = cfg.lora.scale

    def block(x, layer):
      p, cache_k, cache_v, keys = layer
      drop = {}
      if keys is not None:
        drop = {name: (cfg.lora.dropout, keys[i])
                for i, name in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}
      h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
      q = _linear(p["q"], h, lora_scale, drop.get("q")).reshape(B, T, cfg.num_heads, cfg.head_dim)
      k = _linear(p["k"], h, lora_scale, drop.get("k")).reshape(
          B, T, cfg.num_kv_heads, cfg.head_dim)
      v = _linear(p["v"], h, lora_scale, drop.get("v")).reshape(
          B, T, cfg.num_kv_heads, cfg.head_dim)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      if cache_k is not None:
        rows = jnp.arange(B)[:, None]
        # mode="drop": writes past max_len are discarded instead of clobbering the last slot.
        cache_k = cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop")
        k, v = cache_k.astype(dtype), cache_v.astype(dtype)
      attn = _attention(q, k, v, mask)
      x = x + _linear(p["o"], attn, lora_scale, drop.get("o"))
      h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
      gate = _linear(p["gate"], h, lora_scale, drop.get("gate"))
      up = _linear(p["up"], h, lora_scale, drop.get("up"))
      x = x + _linear(p["down"], jax.nn.silu(gate) * up, lora_scale, drop.get("down"))
      return x, (cache_k, cache_v)

    if cfg.remat != "none":
      block = jax.checkpoint(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    xs = (layer_params,
          None if cache is None else cache.k,
          None if cache is None else cache.v,
          dropout_keys)
    x, (new_k, new_v) = jax.lax.scan(block, x, xs)

    x = rms_norm(x, self.final_norm.get_value(), cfg.rms_norm_eps)
    if cache is None:
      return x, None
    real = (jnp.ones((B, T), jnp.int32) if segment_ids is None
            else (segment_ids != 0).astype(jnp.int32))
    return x, KVCache(new_k, new_v, cache.lengths + real.sum(axis=1))

  def decoder(self):
    """``step(tokens [B], cache: DecodeCache) -> (logits float32 [B, vocab], DecodeCache)``: one
    token per row, the same computation as ``self(tokens[:, None], cache=...)``.

    Call it once, outside the decode loop: it slices each layer's weights out of the stacked
    arrays there, and the step runs the layers unrolled over them. In a layer scan XLA:CPU copies
    every layer's weights (and cache) on every step, which made one-token steps of SmolLM2 2-3x
    slower than their matmuls.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    stacked = self.layers.arrays()
    layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers)]
    embed, final_norm = self.embed.get_value(), self.final_norm.get_value()
    out_w, vocab_major = self.output_embedding()
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                             cfg.rope_freq_factors)
    H, K, D, scale = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.lora.scale

    def step(tokens: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
      B = tokens.shape[0]

      def two_rows(matmul, h):  # h [B, 1, in]
        if B == 1:
          # XLA:CPU runs a one-row bf16 matmul as a float32 conversion of the whole weight and
          # a matrix-vector product, several times slower than two rows: give it two.
          return matmul(jnp.concatenate([h, h], axis=1))[:, :1]
        return matmul(h)

      def linear(p, h):
        return two_rows(lambda h: _linear(p, h, scale, None), h)

      slots = cache.lengths  # where this step's token is written; also its position
      cos, sin = rope_tables(slots[:, None], inv_freq)
      mask = jnp.arange(cache.k[0].shape[2])[None, :] <= slots[:, None]  # [B, S]
      rows = jnp.arange(B)
      x = jnp.take(embed, tokens[:, None], axis=0).astype(dtype)  # [B, 1, hidden]
      new_k, new_v = [], []
      for p, ck, cv in zip(layers, cache.k, cache.v):
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        q = linear(p["q"], h).reshape(B, 1, H, D)
        k = linear(p["k"], h).reshape(B, 1, K, D)
        v = linear(p["v"], h).reshape(B, K, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ck = ck.at[rows, :, slots].set(k[:, 0].astype(ck.dtype), mode="drop")
        cv = cv.at[rows, :, slots].set(v.astype(cv.dtype), mode="drop")
        new_k.append(ck)
        new_v.append(cv)
        attn = _one_token_attention(q[:, 0], ck.astype(dtype), cv.astype(dtype), mask)
        x = x + linear(p["o"], attn[:, None])
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        x = x + linear(p["down"], jax.nn.silu(linear(p["gate"], h)) * linear(p["up"], h))
      x = rms_norm(x, final_norm, cfg.rms_norm_eps)
      logits = two_rows(lambda h: project_to_vocab(h, out_w, vocab_major), x)[:, 0]
      return logits, DecodeCache(tuple(new_k), tuple(new_v), cache.lengths + 1)

    return step

  def output_embedding(self) -> tuple[jax.Array, bool]:
    """The output projection and its layout: ``(embed [vocab, hidden], True)`` when tied,
    ``(lm_head [hidden, vocab], False)`` otherwise."""
    if self.lm_head is None:
      return self.embed.get_value(), True
    return self.lm_head.get_value(), False

  def logits(self, x: jax.Array) -> jax.Array:
    """float32 logits ``[..., vocab]`` of hidden states ``x [..., hidden]``."""
    w, vocab_major = self.output_embedding()
    return project_to_vocab(x, w, vocab_major)


def project_to_vocab(x: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
  """``x [..., hidden] -> float32 [..., vocab]`` through ``w`` laid out as ``output_embedding``
  says; matmul in x's dtype, accumulated in float32."""
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def create(cfg: LlamaConfig, *, seed: int = 0, lora: LoraConfig | None = None) -> Llama:
  """A randomly initialised model (``lora`` overrides ``cfg.lora``)."""
  if lora is not None:
    cfg = cfg.replace(lora=lora)
  return Llama(cfg, rngs=nnx.Rngs(seed))
