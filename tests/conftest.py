"""Shared test fixtures: the embedded SmolLM2 (jaxicd and transformers), tiny random checkpoints."""

from __future__ import annotations

import importlib
import os
import pathlib
import tempfile
import types
from typing import Callable, NoReturn

import numpy as np
import pytest

# Runs' "auto" compilation cache (config.compilation_cache_dir) goes to a temporary directory,
# not the home directory of whoever runs the tests.
os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(), "jaxicd-tests-cache")


def missing_requirement(message: str, env: str) -> NoReturn:
  """Skips the calling test (or module, at import time) for something missing on this machine,
  or fails it where that thing is required: under ``make test`` (which sets ``$env``) or CI
  (``$CI``). The one rule for every optional test dependency (the Chromium browser, the torch
  references)."""
  if os.environ.get("CI") or os.environ.get(env):
    pytest.fail(f"{message} (required here: ${env} or $CI is set)", pytrace=False)
  pytest.skip(message, allow_module_level=True)


def require_reference(module: str) -> types.ModuleType:
  """Imports a reference implementation that tests compare jaxicd against (torch, transformers,
  peft: the ``test`` extra). Missing, the test skips, except under ``make test``
  (``$JAXICD_REQUIRE_REFERENCES``) or CI, where it fails (`missing_requirement`)."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing_requirement(f"reference implementation {module!r} is not importable ({e}); "
                        "install the test extra: pip install -e '.[test]'",
                        "JAXICD_REQUIRE_REFERENCES")


# A tiny Llama: head_dim 16 and widths that are multiples of 32 (GGUF block quants need that).
TINY_HF_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rms_norm_eps=1e-5, rope_theta=10_000.0, max_position_embeddings=256,
                     tie_word_embeddings=False)


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
  from jaxicd.model.embedded import smollm2_gguf_path
  return smollm2_gguf_path()


@pytest.fixture(scope="session")
def jax_smollm2():
  """jaxicd's SmolLM2-135M-Instruct (f32), loaded from the embedded GGUF."""
  from jaxicd.model import weights
  return weights.build_model("smollm2")


def _torch_llama_from_gguf(path: pathlib.Path, hf_config):
  """transformers' LlamaForCausalLM with the weights of a llama GGUF, converted by reference code
  only: tensor names from gguf's own name map, values from ``gguf.quants.dequantize`` and Q/K
  rows un-permuted by transformers' GGUF converter (none of it is jaxicd's)."""
  import gguf
  torch = require_reference("torch")
  transformers = require_reference("transformers")
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
  from jaxicd.model.gguf_io import GgufFile  # only to slice out raw tensor bytes quickly

  model = transformers.LlamaForCausalLM(hf_config).eval()
  name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf_config.num_hidden_layers)
  processor = LlamaTensorProcessor(config=hf_config.to_dict())
  file = GgufFile(path)
  state = {}
  for hf_name in model.state_dict():
    if hf_name == "lm_head.weight" and hf_config.tie_word_embeddings:
      continue
    base = name_map.get_name(hf_name.rsplit(".", 1)[0])
    gguf_name = f"{base}.{hf_name.rsplit('.', 1)[1]}"
    info = file.tensors[gguf_name]
    w = gguf.quants.dequantize(np.asarray(file.raw(gguf_name)),
                               gguf.GGMLQuantizationType(info.type_id))
    w = processor.process(np.asarray(w, np.float32), gguf_name).weights
    state[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  if hf_config.tie_word_embeddings:
    model.tie_weights()
  return model


@pytest.fixture(scope="session")
def torch_smollm2(smollm2_path):
  """transformers' LlamaForCausalLM for SmolLM2-135M-Instruct with the GGUF's weights.

  The config is SmolLM2's published one, written out here. (transformers can also load the GGUF
  itself with ``gguf_file=``, but that takes ~45 s on this file; tests/test_weights.py checks
  that path end to end on tiny GGUF files instead.)
  """
  torch = require_reference("torch")
  transformers = require_reference("transformers")
  torch.set_num_threads(2)
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
      rope_theta=100_000.0, max_position_embeddings=8192, tie_word_embeddings=True,
      bos_token_id=1, eos_token_id=2)
  return _torch_llama_from_gguf(smollm2_path, config)


def random_hf_llama(seed: int = 0, **overrides):
  """A transformers LlamaForCausalLM (or Qwen2 with ``model_type='qwen2'``) with random weights,
  including non-trivial norm scales and biases so that every tensor matters."""
  torch = require_reference("torch")
  transformers = require_reference("transformers")
  kw = dict(TINY_HF_LLAMA, **overrides)
  model_type = kw.pop("model_type", "llama")
  if model_type == "qwen2":
    kw.pop("head_dim", None)
    config = transformers.Qwen2Config(**kw)
    cls = transformers.Qwen2ForCausalLM
  else:
    config = transformers.LlamaConfig(**kw)
    cls = transformers.LlamaForCausalLM
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter permutation of Q/K rows (rotate-half -> interleaved pairs)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_llama_gguf(path: pathlib.Path, state: dict[str, np.ndarray], hf_config,
                     qtype: str = "F32", extra: dict[str, np.ndarray] | None = None
                     ) -> pathlib.Path:
  """Writes transformers-named float32 Llama weights as a llama.cpp-style GGUF (permuted Q/K;
  2-D weights stored as ``qtype``, norms as F32) with gguf.GGUFWriter; ``extra`` tensors are
  written as they are, under their GGUF names."""
  import gguf
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(hf_config.num_hidden_layers)
  writer.add_context_length(hf_config.max_position_embeddings)
  writer.add_embedding_length(hf_config.hidden_size)
  writer.add_feed_forward_length(hf_config.intermediate_size)
  writer.add_head_count(hf_config.num_attention_heads)
  writer.add_head_count_kv(hf_config.num_key_value_heads)
  writer.add_rope_freq_base(hf_config.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
  writer.add_rope_dimension_count(hf_config.head_dim)
  writer.add_vocab_size(hf_config.vocab_size)
  writer.add_file_type(0)
  quant = gguf.GGMLQuantizationType[qtype]
  for name, w in state.items():
    w = np.asarray(w, np.float32)
    if name == "model.embed_tokens.weight":
      gname = "token_embd.weight"
    elif name == "model.norm.weight":
      gname = "output_norm.weight"
    elif name == "lm_head.weight":
      gname = "output.weight"
    else:
      _, _, layer, rest = name.split(".", 3)
      gname = f"blk.{layer}.{_GGUF_NAMES[rest]}"
      if rest.startswith("self_attn.q_proj"):
        w = llama_cpp_permute(w, hf_config.num_attention_heads)
      elif rest.startswith("self_attn.k_proj"):
        w = llama_cpp_permute(w, hf_config.num_key_value_heads)
    if w.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
      writer.add_tensor(gname, gguf.quants.quantize(w, quant), raw_dtype=quant)
    else:
      writer.add_tensor(gname, w)
  for gname, w in (extra or {}).items():
    writer.add_tensor(gname, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture
def gguf_writer() -> Callable[..., pathlib.Path]:
  return write_llama_gguf
