"""LoRA adapters of the Llama model: selecting, extracting and merging them.

Adapters live inside ``jaxicd.model.llama.StackedLinear`` as ``nnx.LoRAParam`` variables
``lora_a [L, in, r]`` and ``lora_b [L, r, out]``; the adapted map is
``x @ kernel + scale * (dropout(x) @ lora_a) @ lora_b`` with ``scale = alpha / rank`` (PEFT's
convention). Only adapters are trained: use ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
differentiate with ``nnx.DiffState(0, nnx.LoRAParam)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxicd.model.config import LoraConfig
from jaxicd.model.llama import Llama, StackedLinear

# Filters: adapters, and base weights (LoRAParam subclasses Param, so exclude it explicitly).
LORA = nnx.LoRAParam
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def lora_state(model: Llama) -> nnx.State:
  """The adapters only, as an ``nnx.State`` (what a LoRA checkpoint saves and restores with
  ``nnx.update(model, state)``)."""
  return nnx.state(model, LORA)


def base_state(model: Llama) -> nnx.State:
  """The frozen base weights only."""
  return nnx.state(model, BASE)


def num_params(model: Llama, what=LORA) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, what)))


def _adapted_linears(model: Llama) -> list[StackedLinear]:
  return [m for _, m in nnx.iter_graph(model)
          if isinstance(m, StackedLinear) and m.lora_a is not None]


def merge(model: Llama) -> Llama:
  """Folds every adapter into its base kernel, in place, and removes the adapters.

  ``kernel <- kernel + scale * lora_a @ lora_b`` is computed in float32 and cast back to the
  kernel's dtype. Returns ``model`` (now without LoRA params and with ``cfg.lora.rank == 0``),
  ready for export or for decoding without the adapter matmuls.
  """
  scale = model.cfg.lora.scale
  for linear in _adapted_linears(model):
    kernel = linear.kernel.get_value()
    delta = jnp.einsum("lir,lro->lio", linear.lora_a.get_value().astype(jnp.float32),
                       linear.lora_b.get_value().astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    if hasattr(kernel, "sharding"):
      merged = jax.device_put(merged, kernel.sharding)
    linear.kernel.set_value(merged)
    linear.lora_a = linear.lora_b = None
  model.cfg = model.cfg.replace(lora=LoraConfig())
  model.dropout_rngs = None
  return model


def decoding_copy(model: Llama, dtype: str | None = None) -> Llama:
  """A copy of `model` for decoding: weights (and compute) cast to `dtype` when given, then every
  adapter folded into its kernel (`merge`), so a decode step runs no adapter matmuls. `model`
  is left as it is. On a CPU without bf16 units, float32 decodes ~1.8x faster than bfloat16
  (XLA:CPU widens bf16 weights at every step; SmolLM2 measured on a 2-core EPYC)."""
  copy = nnx.clone(model)
  if dtype:
    for _, v in nnx.iter_graph(copy):
      if isinstance(v, nnx.Param):
        v.set_value(v.get_value().astype(dtype))
    copy.cfg = copy.cfg.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
  return merge(copy)
