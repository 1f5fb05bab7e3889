"""LoRA training throughput: jaxicd vs transformers + PEFT (torch CPU) on SmolLM2-135M.

Same batch (8 x 256 tokens, loss on every token but the first of each row), same LoRA targets
(q, k, v, o, gate, up, down) and rank (16, alpha 32), AdamW, measured in one run:

  .venv/bin/python bench/train_step.py [--steps=5] [--dtypes=bfloat16,float32] [--remat=dots]
      [--platform=cpu|gpu|tpu]

jaxicd runs with the settings configs/mixed.py uses (XLA:CPU's default matmuls, remat "dots"),
once per compute dtype, with the frozen base stored in that dtype: bfloat16 (its CPU default;
adapters and Adam stay float32) and float32. ``--onednn`` adds XLA's oneDNN flag instead (it
measured ~25% slower with jax 0.12 on this 2-core Sapphire Rapids). torch runs in float32 (the
target's baseline) and in bfloat16 under CPU autocast (for reference). Steps of all frameworks
are interleaved, round after round, so that each sees the same load from other jobs on a shared
machine. Prints training tokens/s (median step), the ratios to torch float32 and bfloat16,
model-FLOPs utilisation against a matmul peak measured here (2048^3, same dtype), and peak RSS
after each jaxicd variant is set up and has run two steps (before torch is imported; the bfloat16
variant runs first). Targets (``TARGETS``, judged on jaxicd bfloat16): >= 2x torch float32,
>= 1.5x torch bfloat16, MFU >= 50%, peak RSS <= 4 GB. The torch model has SmolLM2's exact
architecture with random weights (throughput does
not depend on the values); jaxicd loads the real embedded GGUF. The last line printed is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import _platform


# Judged on jaxicd bfloat16 (its CPU default): tokens/s over torch float32 and over torch
# bfloat16 autocast, model-FLOPs utilisation of the measured bf16 matmul peak, peak RSS (GB).
TARGETS = {"ratio_to_torch": 2.0, "ratio_to_torch_bfloat16": 1.5, "mfu": 0.50,
           "peak_rss_gb_after_setup": 4.0}


def _parse():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--remat", default="dots", choices=["none", "full", "dots"])
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--onednn", action="store_true", help="XLA:CPU's oneDNN matmuls (A/B)")
  p.add_argument("--torch-dtypes", default="float32,bfloat16",
                 help="float32 is the baseline of the target; bfloat16 (autocast) for reference")
  p.add_argument("--skip-torch", action="store_true")
  _platform.add_flag(p)
  return p.parse_args()


ARGS = _parse()
_platform.use(ARGS.platform)  # before JAX starts
if ARGS.onednn:  # before JAX starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_onednn=true").strip()

import numpy as np  # noqa: E402


def model_flops_per_token(cfg, rank: int, seq: int) -> float:
  """Forward + backward-to-activations FLOPs of LoRA training, per token (no remat recompute)."""
  E, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = [(E, q), (E, kv), (E, kv), (q, E), (E, F), (E, F), (F, E)]
  dense = sum(i * o for i, o in shapes) * L + E * cfg.vocab_size
  lora = sum(rank * (i + o) for i, o in shapes) * L
  attention = 2 * seq * q * L            # QK^T and AV per query token (full, unmasked)
  forward = 2 * (dense + lora) + 2 * attention
  # Backward: input gradients of every matmul (= forward), weight gradients of LoRA only,
  # and attention's two backward matmuls per forward one.
  backward = 2 * (dense + lora) + 2 * lora + 4 * attention
  return float(forward + backward)


def matmul_peak_gflops(dtype: str, n: int = 2048, reps: int = 5) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def make_batch(vocab: int, batch: int, seq: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  return tokens


def setup_jaxicd(tokens: np.ndarray, dtype: str) -> dict:
  """Loads and compiles; returns a blocking ``step()`` and what setting up took."""
  # Imported here: each stack loads only when measured (peak RSS is read before torch loads).
  import jax
  import ml_collections
  from jaxicd import sharding as shd
  from jaxicd.model import weights
  from jaxicd.model.config import LoraConfig
  from jaxicd.train import trainer
  from jaxicd.train.config import base_config

  t0 = time.time()
  model = weights.build_model("smollm2", lora=LoraConfig(rank=ARGS.rank, alpha=2.0 * ARGS.rank),
                              remat=ARGS.remat, dtype=dtype, param_dtype=dtype)
  cfg = model.cfg
  load_s = time.time() - t0
  parts = trainer.split_model(model)
  del model
  train_cfg = base_config().train
  train_cfg.update(steps=100, lr=1e-4, warmup_steps=0, clip_norm=1.0, weight_decay=0.0)
  tx = trainer.build_optimizer(train_cfg)
  fns = trainer.StepFunctions(parts, tx, shd.make_mesh(dict(data=1), jax.devices()[:1]))
  params, base, rest = fns.place_params(parts.params), fns.place_base(parts.base), \
      fns.place_rest(parts.rest)
  opt_state = fns.init_opt_state(params)
  B, T = tokens.shape[0], tokens.shape[1] - 1
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               loss_weights=np.ones((B, T), np.float32),
               segment_ids=np.ones((B, T), np.int32),
               positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
  gbatch = fns.place_batch(batch)
  state = dict(params=params, opt_state=opt_state, rest=rest)

  def step() -> float:
    state["params"], state["opt_state"], state["rest"], m = fns.train_step(
        state["params"], state["opt_state"], base, state["rest"], gbatch)
    return float(m["loss"])  # blocks

  t0 = time.time()
  step()
  compile_s = time.time() - t0
  step()  # a second step, so the peak RSS includes a steady-state step
  return dict(step=step, load_s=load_s, first_step_s=compile_s, cfg=cfg,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


def setup_torch(tokens: np.ndarray, dtype: str):
  """transformers + PEFT; returns a blocking ``step()`` after one warm-up step. ``bfloat16``
  runs the step under CPU autocast (bf16 matmuls, float32 weights, adapters and AdamW)."""
  # The optional reference stack (setup.py extras), loaded only for its measurement.
  import torch
  import transformers
  import peft
  torch.set_num_threads(ARGS.threads)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
      rope_theta=100_000.0, max_position_embeddings=8192, tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(config)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=ARGS.rank, lora_alpha=2 * ARGS.rank, lora_dropout=0.0,
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"]))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                          weight_decay=0.0)
  inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
  labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  step()  # warm-up
  return step


def main() -> None:
  tokens = make_batch(49152, ARGS.batch, ARGS.seq)
  B, T = ARGS.batch, ARGS.seq
  import jax
  result = dict(batch=B, seq=T, rank=ARGS.rank, threads=ARGS.threads, remat=ARGS.remat,
                onednn=ARGS.onednn, platform=jax.devices()[0].platform, jaxicd={})
  runners, peaks = {}, {}
  for dtype in ARGS.dtypes.split(","):
    peaks[dtype] = matmul_peak_gflops(dtype)
    jx = setup_jaxicd(tokens, dtype)
    runners[f"jaxicd {dtype}"] = jx["step"]
    result["jaxicd"][dtype] = dict(load_s=jx["load_s"], first_step_s=jx["first_step_s"],
                                   matmul_peak_gflops=peaks[dtype],
                                   peak_rss_gb_after_setup=jx["peak_rss_gb"])
    print(f"jaxicd {dtype}: load {jx['load_s']:.1f}s, first step (compile) "
          f"{jx['first_step_s']:.1f}s, peak RSS so far {jx['peak_rss_gb']:.2f} GB "
          f"(target <= 4)", flush=True)
    flops = model_flops_per_token(jx["cfg"], ARGS.rank, T)
  if not ARGS.skip_torch:
    for dtype in ARGS.torch_dtypes.split(","):
      runners[f"torch {dtype}"] = setup_torch(tokens, dtype)
  # Interleaved rounds: each framework sees the same machine load (other jobs share the CPU).
  times = {name: [] for name in runners}
  for _ in range(ARGS.steps):
    for name, step in runners.items():
      t0 = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - t0)
  speed = {name: B * T / float(np.median(t)) for name, t in times.items()}
  for name, tps in speed.items():
    print(f"{name}: median step {float(np.median(times[name])):.2f}s -> {tps:.1f} tokens/s "
          f"(steps {[round(t, 2) for t in times[name]]})", flush=True)
  for dtype, jx in result["jaxicd"].items():
    jx["tokens_per_s"] = speed[f"jaxicd {dtype}"]
    jx["mfu"] = jx["tokens_per_s"] * flops / (peaks[dtype] * 1e9)
    line = (f"jaxicd {dtype}: MFU {100 * jx['mfu']:.1f}% of a measured {dtype} matmul peak of "
            f"{peaks[dtype]:.0f} GFLOP/s ({flops / 1e6:.0f} MFLOP/token)")
    if "torch float32" in speed:
      jx["ratio_to_torch"] = jx["tokens_per_s"] / speed["torch float32"]
      line += f"; ratio to torch float32: {jx['ratio_to_torch']:.2f}x"
    if f"torch {dtype}" in speed and dtype != "float32":
      jx[f"ratio_to_torch_{dtype}"] = jx["tokens_per_s"] / speed[f"torch {dtype}"]
      line += f"; to torch {dtype}: {jx[f'ratio_to_torch_{dtype}']:.2f}x"
    print(line, flush=True)
  result["torch_tokens_per_s"] = {name.split()[1]: tps for name, tps in speed.items()
                                  if name.startswith("torch")}
  result["peak_rss_gb_with_torch"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  bf16 = result["jaxicd"].get("bfloat16", {})
  measured = {key: bf16.get(key) for key in TARGETS}
  result["targets"] = {
      key: {"wanted": f"{'<=' if key.startswith('peak') else '>='} {want}",
            "measured": measured[key],
            "met": None if measured[key] is None else bool(
                measured[key] <= want if key.startswith("peak") else measured[key] >= want)}
      for key, want in TARGETS.items()}
  result["targets_met"] = all(t["met"] for t in result["targets"].values())
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  sys.exit(main())
