"""Benchmark: forward tokens/s of jaxicd (jitted) vs transformers' PyTorch Llama on SmolLM2.

Same weights (copied from the embedded GGUF into both), same batch (default 8 x 256 tokens, f32),
measured in one process; warm-up calls (jit compilation) are excluded. Target: ratio >= 1.5.
Prints one JSON object.

  .venv/bin/python bench/forward.py [--batch=8] [--seq=256] [--iters=5] [--torch_threads=2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _torch_model(model):
  """transformers' LlamaForCausalLM with the jaxicd model's weights (kernels transposed)."""
  import torch
  import transformers
  cfg = model.cfg
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_word_embeddings)).eval()
  names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
  state = {"model.embed_tokens.weight": np.asarray(model.embed.get_value()),
           "model.norm.weight": np.asarray(model.final_norm.get_value())}
  for i in range(cfg.num_layers):
    prefix = f"model.layers.{i}"
    state[f"{prefix}.input_layernorm.weight"] = np.asarray(model.layers.attn_norm.get_value()[i])
    state[f"{prefix}.post_attention_layernorm.weight"] = np.asarray(
        model.layers.mlp_norm.get_value()[i])
    for short, long in names.items():
      state[f"{prefix}.{long}.weight"] = np.asarray(
          getattr(model.layers, short).kernel.get_value()[i]).T
  hf.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()},
                     strict=False)
  hf.tie_weights()
  return hf


def _time_interleaved(fns, iters: int) -> list[list[float]]:
  """Seconds of each call of each fn; calls alternate so that load from other processes on a
  shared machine hits all contestants alike. One warm-up call each (compilation) is excluded."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, record in zip(fns, times):
      start = time.perf_counter()
      fn()
      record.append(time.perf_counter() - start)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="smollm2")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=min(2, os.cpu_count() or 1))
  args = parser.parse_args()

  import torch
  from jaxicd.model import weights
  torch.set_num_threads(args.torch_threads)
  model = weights.build_model(args.source, dtype="float32", param_dtype="float32")
  tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (args.batch, args.seq))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  jax_tokens = jnp.asarray(tokens, jnp.int32)

  torch_model = _torch_model(model)
  torch_tokens = torch.from_numpy(tokens).long()

  def torch_forward():
    with torch.inference_mode():
      return torch_model(torch_tokens).logits

  jax_times, torch_times = _time_interleaved(
      [lambda: forward(state, jax_tokens).block_until_ready(), torch_forward], args.iters)
  # Best of N is the primary figure (least disturbed by other processes, as timeit advises);
  # the median is reported too.
  jax_s, torch_s = min(jax_times), min(torch_times)
  # Same weights, same answer (a benchmark of a wrong model would be meaningless).
  diff = float(np.abs(np.asarray(forward(state, jax_tokens)[:1, :32])
                      - torch_forward()[:1, :32].numpy()).max())
  n = args.batch * args.seq
  result = {
      "bench": "forward", "source": args.source, "batch": args.batch, "seq": args.seq,
      "dtype": "float32", "devices": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
      "torch_threads": args.torch_threads,
      "jaxicd_tokens_per_s": round(n / jax_s, 1), "torch_tokens_per_s": round(n / torch_s, 1),
      "jaxicd_s": round(jax_s, 3), "torch_s": round(torch_s, 3),
      "ratio": round(torch_s / jax_s, 3), "target_ratio": 1.5,
      "ratio_of_medians": round(float(np.median(torch_times) / np.median(jax_times)), 3),
      "load_avg_1min": round(os.getloadavg()[0], 2),
      "max_abs_logit_diff": diff,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
