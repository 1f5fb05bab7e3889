"""Export for transformers and PEFT: the exported files load there and give jaxicd's logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_hf_llama, require_reference
from jaxicd.model import export
from jaxicd.model import lora as lora_lib
from jaxicd.model import weights
from jaxicd.model.config import LoraConfig, preset
from jaxicd.model.export import ExportError
from jaxicd.model.llama import Llama

torch = require_reference("torch")
transformers = require_reference("transformers")
peft = require_reference("peft")

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
TOKENS = np.random.RandomState(0).randint(0, 256, (2, 11)).astype(np.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _jax_logits(model, tokens=TOKENS):
  return np.asarray(_forward(model, jnp.asarray(tokens)))


def _torch_logits(model, tokens=TOKENS):
  with torch.inference_mode():
    return model(torch.tensor(tokens).long()).logits.float().numpy()


def _randomize_b(model, seed=0):
  """Gives every adapter a non-zero B so that adapters matter."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if var.get_value().shape[1] == model.cfg.lora.rank:  # lora_b: [layers, rank, out]
      var.set_value(0.05 * jax.random.normal(next(keys), var.get_value().shape))


def _lora_model(path, lora=LORA, seed=0):
  """The checkpoint at ``path`` with random non-zero adapters. (Built eagerly: what
  ``weights.build_model`` does, without its per-call jit compile of the initialiser.)"""
  tensors = weights.SafetensorsTensors(path)
  model = Llama(tensors.config.replace(lora=lora), rngs=nnx.Rngs(seed))
  weights.fill_from_tensors(model, tensors)
  _randomize_b(model, seed)
  return model


def _tiny(lora=LoraConfig()):
  return Llama(preset("tiny").replace(lora=lora), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random transformers Llama saved as an HF checkpoint dir, and its logits."""
  model = random_hf_llama(seed=3)
  path = tmp_path_factory.mktemp("tiny_llama")
  model.save_pretrained(path)
  return path, _torch_logits(model)


@pytest.mark.parametrize("lora", [LORA, LoraConfig(rank=2, alpha=3.0, targets=("q", "v", "down"))])
def test_peft_adapters_load_in_peft(hf_dir, tmp_path, lora):
  path, base_logits = hf_dir
  model = _lora_model(path, lora)
  expected = _jax_logits(model)
  assert np.abs(expected - base_logits).max() > 1e-3  # the adapters matter
  out = tmp_path / "adapter"
  summary = export.export_peft(model, out, base_model_name_or_path=str(path))
  assert sorted(summary["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
  assert summary["tensors"] == 2 * 2 * len(lora.targets)  # (A, B) x layers x targets

  config = json.loads((out / "adapter_config.json").read_text())
  assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "CAUSAL_LM", lora.rank)
  assert config["base_model_name_or_path"] == str(path)
  reference = peft.PeftModel.from_pretrained(random_hf_llama(seed=3), str(out)).eval()
  # Every adapter PEFT built was loaded from the file and nothing in the file went unused.
  from safetensors.numpy import load_file
  saved = load_file(out / "adapter_model.safetensors")
  loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(reference).items()}
  assert sorted(saved) == sorted(loaded)
  for name, value in saved.items():
    np.testing.assert_array_equal(value, loaded[name], err_msg=name)
  layer0 = "base_model.model.model.layers.0"
  assert saved[f"{layer0}.self_attn.q_proj.lora_A.weight"].shape == (lora.rank, 64)
  assert saved[f"{layer0}.mlp.down_proj.lora_B.weight"].shape == (64, lora.rank)
  np.testing.assert_allclose(_torch_logits(reference), expected, atol=1e-4)


def test_merged_checkpoint_loads_in_transformers_and_jaxicd(hf_dir, tmp_path):
  path, _ = hf_dir
  model = _lora_model(path, seed=1)
  expected = _jax_logits(model)
  out = tmp_path / "merged"
  summary = export.export_merged(model, out)
  assert sorted(summary["files"]) == ["config.json", "model.safetensors"]
  assert summary["tensors"] == 3 + 2 * 9 and "no tokenizer" in summary["tokenizer"]
  # The model itself keeps its adapters (the merge ran on a clone).
  assert model.cfg.lora.rank == LORA.rank and lora_lib.num_params(model) > 0
  np.testing.assert_array_equal(_jax_logits(model), expected)

  reference = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reference).__name__ == "LlamaForCausalLM"
  np.testing.assert_allclose(_torch_logits(reference), expected, atol=1e-4)
  round_trip = weights.build_model(str(out))
  assert round_trip.cfg.replace(lora=LORA) == model.cfg
  np.testing.assert_allclose(_jax_logits(round_trip), expected, atol=1e-5)


def test_merged_shards_and_bfloat16(hf_dir, tmp_path):
  path, _ = hf_dir
  model = _lora_model(path, seed=2)
  f32 = export.export_merged(model, tmp_path / "f32")
  sharded = export.export_merged(model, tmp_path / "sharded", max_shard_bytes=40_000)
  shards = [f for f in sharded["files"] if f.endswith(".safetensors")]
  assert len(shards) > 2 and "model.safetensors.index.json" in sharded["files"]
  assert sharded["bytes"] == f32["bytes"]
  bf16 = export.export_merged(model, tmp_path / "bf16", dtype="bfloat16")
  assert bf16["bytes"] * 2 == f32["bytes"]

  full = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32")).state_dict()
  from_shards = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "sharded")).state_dict()
  half = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "bf16"), dtype="auto").state_dict()
  assert half["model.embed_tokens.weight"].dtype == torch.bfloat16
  for name, value in full.items():
    torch.testing.assert_close(from_shards[name], value, rtol=0, atol=0, msg=name)
    # Rounded to nearest even by torch, independently of the exporter's cast.
    torch.testing.assert_close(half[name], value.to(torch.bfloat16), rtol=0, atol=0, msg=name)
  np.testing.assert_allclose(_jax_logits(weights.build_model(str(tmp_path / "sharded"))),
                             _jax_logits(model), atol=1e-5)


def test_qwen2_biases(tmp_path):
  hf_model = random_hf_llama(seed=5, model_type="qwen2", tie_word_embeddings=True)
  hf_model.save_pretrained(tmp_path / "base")
  model = _lora_model(tmp_path / "base", seed=5)
  expected = _jax_logits(model)
  export.export_merged(model, tmp_path / "merged")
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert type(reference).__name__ == "Qwen2ForCausalLM"
  assert reference.config.tie_word_embeddings
  np.testing.assert_allclose(_torch_logits(reference), expected, atol=1e-4)


def test_tokenizer_and_llama3_rope(tmp_path):
  """The embedded SmolLM2 tokenizer and Llama 3 RoPE scaling survive the trip to transformers."""
  from jaxicd.model.tokenizer import load_tokenizer
  tokenizer = load_tokenizer("smollm2")
  cfg = preset("tiny").replace(
      vocab_size=tokenizer.vocab_size, tie_word_embeddings=True,
      rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16))
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 40)).astype(np.int32)
  expected = _jax_logits(model, tokens)
  plain = Llama(cfg.replace(rope_scaling=None), rngs=nnx.Rngs(0))
  assert np.abs(_jax_logits(plain, tokens) - expected).max() > 1e-3  # the scaling matters

  out = tmp_path / "merged"
  summary = export.export_merged(model, out, tokenizer=tokenizer)
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
  assert summary["tokenizer"].startswith("written")
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert reference.config.eos_token_id == tokenizer.eos_id
  np.testing.assert_allclose(_torch_logits(reference, tokens), expected, atol=1e-4)

  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  reloaded = load_tokenizer(str(out))
  samples = ["Hello world, 12345 tokens!", "  two  spaces\nand a newline <|im_end|>"]
  for text in samples:
    ids = tokenizer.encode(text)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
    assert reloaded.encode(text) == ids
  messages = [{"role": "user", "content": samples[0]}]
  rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                          tokenize=False) == rendered
  assert (reloaded.eos_id, reloaded.end_of_turn_id) == (tokenizer.eos_id,
                                                        tokenizer.end_of_turn_id)


def test_bad_input(tmp_path):
  model = _tiny()
  with pytest.raises(ExportError, match="no LoRA adapters"):
    export.export_peft(model, tmp_path / "a", base_model_name_or_path="x")
  assert not (tmp_path / "a").exists()
  adapted = _tiny(LORA)
  with pytest.raises(ExportError, match="base_model_name_or_path"):
    export.export_peft(adapted, tmp_path / "a", base_model_name_or_path="")
  with pytest.raises(ExportError, match="dtype 'int8'"):
    export.export_merged(model, tmp_path / "b", dtype="int8")

  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "notes.txt").write_text("keep me")
  (busy / "model-00001-of-00002.safetensors").write_bytes(b"stale")
  with pytest.raises(ExportError, match="busy: directory is not empty"):
    export.export_merged(model, busy)
  summary = export.export_merged(model, busy, overwrite=True)
  assert summary["removed"] == ["model-00001-of-00002.safetensors"]
  assert sorted(p.name for p in busy.iterdir()) == ["config.json", "model.safetensors",
                                                     "notes.txt"]
  (tmp_path / "file").write_text("")
  with pytest.raises(ExportError, match="not a directory"):
    export.export_peft(adapted, tmp_path / "file", base_model_name_or_path="x")

  # float16 overflow is caught, and nothing half-written stays behind.
  huge = _tiny()
  huge.final_norm.set_value(huge.final_norm.get_value() * 1e6)
  with pytest.raises(ExportError, match="'model.norm.weight'.*not finite in float16"):
    export.export_merged(huge, tmp_path / "huge", dtype="float16")
  assert list((tmp_path / "huge").iterdir()) == []

  too_big = type("Tok", (), {"vocab_size": 10_000, "backend": None})()
  with pytest.raises(ExportError, match="10000 token ids but the model's vocab_size is 512"):
    export.export_merged(model, tmp_path / "c", tokenizer=too_big)
  gguf_llama3 = _tiny()
  gguf_llama3.cfg = gguf_llama3.cfg.replace(rope_freq_factors=(1.0,) * 8)
  with pytest.raises(ExportError, match="rope_freq_factors"):
    export.export_merged(gguf_llama3, tmp_path / "d")
