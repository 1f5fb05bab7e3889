"""Benchmark: forward tokens/s of jaxicd (jitted) vs transformers' PyTorch Llama on SmolLM2.

Same weights (copied from the embedded GGUF into both), same batch (default 8 x 256 tokens),
measured in one process, per dtype: bfloat16 (both frameworks on the CPU's bf16 matmul units;
target: ratio >= 1.0) and float32 (reported, no target: see "ratio_ceiling"). Warm-up calls (jit
compilation) are excluded. Also
prints each side's achieved GFLOP/s and what one 2048^3 matmul reaches in XLA and in torch: the
ratio cannot exceed XLA's matmul peak over torch's achieved rate ("ratio_ceiling").
Prints one JSON line per dtype, then, last, one JSON line with everything.

  .venv/bin/python bench/forward.py [--dtypes=float32,bfloat16] [--batch=8] [--seq=256] [--iters=5]
      [--platform=cpu|gpu|tpu]
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

import _platform


# jaxicd forward over torch's, per dtype: in bfloat16 (what inference runs in) at least as fast;
# float32 is reported without a target (XLA:CPU's float32 GEMM bounds it, "ratio_ceiling").
TARGET_RATIO = {"bfloat16": 1.0}


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
  hf.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in state.items()},
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


def forward_flops_per_token(cfg, seq: int) -> float:
  """Matmul FLOPs of one forward token: projections, MLP, output head, and attention's two
  matmuls over the full (unmasked) sequence, as both frameworks compute them."""
  E, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dense = L * (E * q + 2 * E * kv + q * E + 3 * E * F) + E * cfg.vocab_size
  return float(2 * dense + 2 * 2 * seq * q * L)


def matmul_peaks(dtype: str, n: int = 2048, reps: int = 5) -> dict[str, float]:
  """Best-of-``reps`` GFLOP/s of an n^3 matmul in XLA (jax) and in torch, same dtype."""
  import torch
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  x = jnp.asarray(a, dtype)
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  t = torch.from_numpy(a).to(getattr(torch, dtype))
  t @ t
  best = {"xla": float("inf"), "torch": float("inf")}
  for _ in range(reps):
    for name, fn in (("xla", lambda: f(x).block_until_ready()), ("torch", lambda: t @ t)):
      start = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - start)
  return {k: round(2 * n ** 3 / v / 1e9, 1) for k, v in best.items()}


def bench_dtype(args, dtype: str) -> dict:
  import torch
  from jaxicd.model import weights
  model = weights.build_model(args.source, dtype=dtype, param_dtype=dtype)
  tokens = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (args.batch, args.seq))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  jax_tokens = jnp.asarray(tokens, jnp.int32)

  torch_model = _torch_model(model).to(getattr(torch, dtype))
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
  diff = float(np.abs(np.asarray(forward(state, jax_tokens)[:1, :32], np.float32)
                      - torch_forward()[:1, :32].float().numpy()).max())
  n = args.batch * args.seq
  flops = forward_flops_per_token(model.cfg, args.seq)
  peaks = matmul_peaks(dtype)
  return {
      "jaxicd_tokens_per_s": round(n / jax_s, 1), "torch_tokens_per_s": round(n / torch_s, 1),
      "jaxicd_s": round(jax_s, 3), "torch_s": round(torch_s, 3),
      "ratio": round(torch_s / jax_s, 3), "target_ratio": TARGET_RATIO.get(dtype),
      "target_met": (torch_s / jax_s >= TARGET_RATIO[dtype]) if dtype in TARGET_RATIO else None,
      "ratio_of_medians": round(float(np.median(torch_times) / np.median(jax_times)), 3),
      "jaxicd_gflops": round(n * flops / jax_s / 1e9, 1),
      "torch_gflops": round(n * flops / torch_s / 1e9, 1),
      # What one n^3 matmul reaches in each library: the forward cannot beat its own library's
      # matmul rate, so xla_peak / torch_gflops bounds the reachable ratio in this dtype.
      "matmul_peak_gflops": peaks,
      "ratio_ceiling": round(peaks["xla"] / (n * flops / torch_s / 1e9), 3),
      "max_abs_logit_diff": diff,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="smollm2")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=min(2, os.cpu_count() or 1))
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="bfloat16 (the target's dtype) runs both frameworks on bf16 matmul "
                           "units where the CPU has them; float32 is reported")
  _platform.add_flag(parser)
  args = parser.parse_args()
  _platform.use(args.platform)

  import torch
  torch.set_num_threads(args.torch_threads)
  result = {
      "bench": "forward", "source": args.source, "batch": args.batch, "seq": args.seq,
      "devices": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
      "torch_threads": args.torch_threads,
  }
  for dtype in args.dtypes.split(","):
    result[dtype] = bench_dtype(args, dtype)
    print(json.dumps({dtype: result[dtype]}), flush=True)
  result["load_avg_1min"] = round(os.getloadavg()[0], 2)
  judged = [result[d]["target_met"] for d in args.dtypes.split(",") if d in TARGET_RATIO]
  result["targets_met"] = bool(judged) and all(judged)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
