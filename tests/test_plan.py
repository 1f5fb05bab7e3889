"""The cost model (jaxicd.cost_model) and `--config.mode=plan`: parameter and FLOP counts against
arithmetic written out here from the presets' shapes, HBM per chip under the mesh, the window
estimate against the real planner, and the mode end to end on the demo corpus."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from jaxicd import cost_model, errors
from jaxicd.model.config import LoraConfig, preset

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_worker  # pylint: disable=wrong-import-position

ROOT = train_worker.ROOT
ALL7 = ("q", "k", "v", "o", "gate", "up", "down")


def test_tiny_preset_params_and_flops_by_hand():
  # tiny: vocab 512, hidden 64, mlp 128, 2 layers, 4 heads / 2 kv heads of 16; LoRA r4 on all 7.
  cfg = preset("tiny").replace(lora=LoraConfig(rank=4, alpha=8.0, targets=ALL7))
  # Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128 = 36,864
  # weights, 2 norms of 64; embedding and head 512x64 each; the final norm 64.
  assert cost_model.param_counts(cost_model.model_weights(cfg)) == {
      "base": 2 * (36_864 + 128) + 2 * 32_768 + 64, "lora": 8_192,
      "total": 139_584 + 8_192}
  # LoRA per layer: 4 x (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4,096.
  assert cost_model.matmul_weights(cfg) == {"layers": 73_728, "head": 32_768, "lora": 8_192}
  # T = 32: attention L*T*d_q = 2*32*64 = 4,096.
  flops = cost_model.train_flops_per_token(cfg, 32)
  assert flops["forward"] == 2 * 106_496 + 2 * 8_192 + 4 * 4_096 == 245_760
  assert flops["backward"] == 2 * 106_496 + 4 * 8_192 + 8 * 4_096 == 278_528
  assert flops["model"] == 524_288
  # remat=none recomputes only the attention scores; dots also the attention forward and each
  # adapter's x @ A (2 layers x 4 x (6 x 64 + 128) = 4,096 weights).
  assert flops["recompute"] == 2 * 4_096
  dots = cost_model.train_flops_per_token(cfg.replace(remat="dots"), 32)
  assert dots["recompute"] == 2 * 4_096 + 4 * 4_096 + 2 * 4_096
  # One decode token against 40 cache slots: all matmuls, the head, attention over 40 keys.
  assert cost_model.token_flops(cfg, 40, head=True) == 2 * (106_496 + 8_192) + 4 * 2 * 40 * 64
  assert cost_model.token_flops(cfg, 40, head=False) == 2 * (73_728 + 8_192) + 4 * 2 * 40 * 64


@pytest.fixture(scope="module")
def llama8b():
  cfg = preset("llama-3.1-8b").replace(param_dtype="bfloat16", dtype="bfloat16", remat="dots",
                                       lora=LoraConfig(rank=16, alpha=32.0, targets=ALL7))
  return cfg, cost_model.model_weights(cfg)


def test_known_totals(llama8b):
  cfg, weights = llama8b
  V, E, F, L, kv = 128_256, 4_096, 14_336, 32, 8 * 128
  layer = 2 * E * E + 2 * E * kv + 3 * E * F + 2 * E
  counts = cost_model.param_counts(weights)
  assert counts["base"] == 2 * V * E + L * layer + E
  assert round(counts["base"] / 1e7) == 803                     # "8.03B"
  assert counts["lora"] == L * 16 * (2 * E + 2 * (E + kv) + 2 * E + 3 * (E + F))
  T = 4_096
  expected = 4 * (L * (layer - 2 * E) + V * E) + 6 * counts["lora"] + 12 * L * T * 32 * 128
  assert cost_model.train_flops_per_token(cfg, T)["model"] == expected
  assert 3.6e10 < expected < 3.7e10
  # SmolLM2-135M: tied embeddings, 30 layers of hidden 576, mlp 1536, 9 heads / 3 kv heads of 64.
  small = preset("smollm2-135m")
  V, E, F, L, kv = 49_152, 576, 1_536, 30, 3 * 64
  base = V * E + L * (2 * E * E + 2 * E * kv + 3 * E * F + 2 * E) + E
  assert cost_model.param_counts(cost_model.model_weights(small))["base"] == base
  assert round(base / 1e6) == 135


def test_hbm_per_chip_scales_with_fsdp(llama8b):
  cfg, weights = llama8b
  base = sum(math.prod(w.shape) for w in weights if not w.trainable)
  norms = sum(math.prod(w.shape) for w in weights if not w.trainable and len(w.shape) <= 2
              and w.logical_axes[-1] == "norm")
  mesh = lambda fsdp, tensor=1: {"data": 1, "fsdp": fsdp, "tensor": tensor}  # noqa: E731
  for fsdp, tensor in ((1, 1), (4, 1), (16, 1), (4, 2)):
    held = cost_model.weight_bytes_per_chip(weights, mesh(fsdp, tensor))
    # Every matrix splits over fsdp (embed dim) and tensor (heads/mlp/vocab); norms replicate.
    assert held["base"] == 2 * ((base - norms) / (fsdp * tensor) + norms)
  kwargs = dict(global_rows=64, seq_len=4_096, grad_accum=1, chunk_tokens=1_024)
  totals = []
  for fsdp in (4, 8, 16, 32):
    mem = cost_model.train_memory(cfg, weights, mesh(fsdp), rows_per_chip=64 // fsdp, **kwargs)
    totals.append(mem["total"])
    same_rows = cost_model.train_memory(cfg, weights, mesh(fsdp), rows_per_chip=2, **kwargs)
    ref = cost_model.train_memory(cfg, weights, mesh(4), rows_per_chip=2, **kwargs)
    assert same_rows["base_weights"] == pytest.approx(ref["base_weights"] * 4 / fsdp, rel=1e-3)
    assert same_rows["saved_activations"] == ref["saved_activations"]
  assert totals == sorted(totals, reverse=True)
  # remat=dots keeps the 7 projections' outputs and each layer's input: 47,104 bf16 values per
  # token and layer for Llama-3.1-8B; remat=full only the input.
  mem = cost_model.train_memory(cfg, weights, mesh(32), rows_per_chip=2, **kwargs)
  assert mem["saved_activations"] == 32 * 2 * 4_096 * 47_104 * 2
  full = cost_model.train_memory(cfg.replace(remat="full"), weights, mesh(32), rows_per_chip=2,
                                 **kwargs)
  assert full["saved_activations"] == 32 * 2 * 4_096 * 4_096 * 2


def test_note_windows_match_the_inference_planner():
  from jaxicd.data import pipeline, prompts, windows
  from jaxicd.model.tokenizer import load_tokenizer
  from jaxicd.train.config import base_config
  tok = load_tokenizer("smollm2")
  probe = prompts.encode_prompt_with_note(tok, "Patient with chest pain.")
  prompt = len(probe.tokens) - (probe.note_hi - probe.note_lo)
  docs = [d for d in pipeline.load_documents(base_config().data) if d.split == "test"][:6]
  setup = cost_model.InferenceSetup(seq_len=512, window_overlap=128, max_new_tokens=96,
                                    prompt_tokens=prompt, shared_prefix=0, batch_size=8,
                                    recode_spans=0, span_prompt_tokens=0, code_tokens=0,
                                    recode_batch_size=32)
  est_total = real_total = 0
  for doc in docs:
    real = windows.inference_windows(doc, tok, seq_len=512, window_overlap=128,
                                     max_new_tokens=96, note_range=True)
    est = cost_model.note_windows(setup, len(tok.encode(doc.text)))
    assert abs(len(est) - len(real)) <= 1
    est_total += sum(est) + prompt * len(est)
    real_total += sum(len(w.tokens) for w in real)
  # Prompt tokens over the notes (what costs are made of): one extra short window in a note is
  # within the estimate's error, summed over notes it is close.
  assert est_total == pytest.approx(real_total, rel=0.05)
  assert cost_model.note_windows(setup, 100) == [100]


def test_config_errors():
  from jaxicd.train.config import base_config
  config = base_config()
  with pytest.raises(errors.ConfigError, match="plan.accelerator"):
    cost_model.accelerator("v9z")
  config.plan.mfu = 1.5
  with pytest.raises(errors.ConfigError, match="plan.mfu"):
    cost_model.plan(config)
  config.plan.mfu = 0.45
  config.mesh.update(data=1, fsdp=-1)
  config.plan.chips = 16
  config.data.batch_size = 8
  with pytest.raises(errors.ConfigError, match="batch_size=8"):
    cost_model.plan(config)
  assert cost_model.ACCELERATORS["v5p"].slice_name(16) == "v5p-32"
  assert cost_model.ACCELERATORS["v5e"].slice_name(16) == "v5litepod-16"


# Runs jaxicd.main with every weight reader refused and reports, at exit, whether any JAX
# backend was started and which platforms JAX was allowed.
_GUARDED_MAIN = """
import atexit, runpy, sys
from jaxicd.model import weights
def refuse(*args, **kwargs):
  raise AssertionError("mode=plan read model weights")
weights.build_model = weights.load_model = refuse
weights.GgufTensors.get = weights.SafetensorsTensors.get = refuse
def report():
  import jax
  from jax._src import xla_bridge
  print(f"backends_initialized={xla_bridge.backends_are_initialized()} "
        f"platforms={jax.config.jax_platforms}", file=sys.stderr)
atexit.register(report)
sys.argv = ["jaxicd.main"] + sys.argv[1:]
runpy.run_module("jaxicd.main", run_name="__main__", alter_sys=True)
"""


def test_plan_mode_end_to_end_on_the_demo_corpus():
  env = train_worker.subprocess_env()
  env.pop("JAX_PLATFORMS")                    # the mode itself keeps JAX on the CPU
  proc = subprocess.run(
      [sys.executable, "-c", _GUARDED_MAIN, "--config=configs/mixed.py", "--config.mode=plan",
       "--config.plan.sample_documents=3", "--config.plan.sample_spans=60",
       "--config.plan.packing_batches=1", "--config.data.mixture_unit=examples"],
      capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "backends_initialized=False platforms=cpu" in proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "plan"
  assert summary["accelerator"]["name"] == "v5e" and summary["accelerator"]["mfu"] == 0.45
  assert summary["model"]["params"]["base"] == 134_515_008
  data = summary["data"]
  assert [data["splits"][s]["documents"] for s in ("train", "val", "test")] == [200, 50, 50]
  assert data["splits"]["train"]["sampled"] == 3
  assert data["spans"]["spans"] > 1000 and data["epoch_tokens"]["total"] > 0
  assert 0.5 < data["packing"]["non_pad_fraction"] <= 1
  t = summary["training"]
  assert t["tokens"] == 288 * 2 * 256  # configs/mixed.py: steps x rows x seq_len
  assert t["flops"] == t["tokens"] * t["flops_per_token"]["model"]
  assert t["hours"] > 0 and t["chip_hours"] == pytest.approx(t["hours"])
  assert set(t["tokens_by_kind"]) == {"spans", "documents"}
  assert summary["memory"]["fits"] and summary["memory"]["gb"]["total"] > 0
  note = summary["inference"]["notes"][0]
  assert note["windows"] > 1 and note["notes_per_hour_per_chip"]["at_mfu"] > 0
  assert "HBM per chip" in proc.stdout
