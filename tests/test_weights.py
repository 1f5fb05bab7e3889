"""Weight loading: GGUF (tiny files written with gguf.GGUFWriter), HF safetensors dirs, errors."""

from __future__ import annotations

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_hf_llama, require_reference, write_llama_gguf
from jaxicd.model import gguf_io
from jaxicd.model import weights
from jaxicd.model.weights import WeightsError

torch = require_reference("torch")
transformers = require_reference("transformers")

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 13)).astype(np.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _torch_logits(model, tokens=TOKENS):
  with torch.inference_mode():
    return model(torch.tensor(tokens).long()).logits.numpy()


def _jax_logits(model, tokens=TOKENS):
  return np.asarray(_forward(model, jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def tiny_hf():
  model = random_hf_llama(seed=0)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, state


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_gguf_matches_transformers_gguf_loader(tiny_hf, tmp_path, qtype):
  """Written like llama.cpp (permuted Q/K, block-quantized), read back by transformers' own GGUF
  loader and by jaxicd: same logits."""
  hf_model, state = tiny_hf
  path = write_llama_gguf(tmp_path / f"tiny-{qtype}.gguf", state, hf_model.config, qtype)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
  model = weights.build_model(str(path))
  assert model.cfg.num_layers == 2 and model.cfg.num_kv_heads == 2
  assert not model.cfg.tie_word_embeddings
  got = _jax_logits(model)
  np.testing.assert_allclose(got, _torch_logits(reference), atol=1e-4)
  if qtype == "F32":  # lossless: the original model too
    np.testing.assert_allclose(got, _torch_logits(hf_model), atol=1e-4)


def test_gguf_reader_and_dequantize_match_gguf_library(tiny_hf, tmp_path):
  import gguf
  hf_model, state = tiny_hf
  path = write_llama_gguf(tmp_path / "tiny.gguf", state, hf_model.config, "Q4_1")
  ours = gguf_io.GgufFile(path)
  theirs = gguf.GGUFReader(str(path))
  assert ours.metadata["llama.embedding_length"] == 64
  assert ours.metadata["general.architecture"] == "llama"
  for tensor in theirs.tensors:
    info = ours.tensors[tensor.name]
    assert info.type_id == int(tensor.tensor_type)
    np.testing.assert_array_equal(np.asarray(ours.raw(tensor.name)).reshape(-1),
                                  np.asarray(tensor.data).view(np.uint8).reshape(-1))
  rng = np.random.RandomState(1)
  for qtype in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "F16"):
    data = rng.randn(8, 96).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(data, t).view(np.uint8).reshape(8, -1)
    np.testing.assert_array_equal(gguf_io.dequantize(raw, int(t)),
                                  gguf.quants.dequantize(raw, t))


@pytest.mark.parametrize("shard", [False, True])
def test_hf_safetensors_dir_round_trip(tiny_hf, tmp_path, shard):
  hf_model, _ = tiny_hf
  hf_model.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
  assert (tmp_path / "model.safetensors.index.json").is_file() == shard
  model = weights.build_model(str(tmp_path))
  np.testing.assert_allclose(_jax_logits(model), _torch_logits(hf_model), atol=1e-4)
  # bf16 storage: the same weights, rounded.
  model16 = weights.build_model(str(tmp_path), param_dtype="bfloat16")
  assert model16.layers.q.kernel.get_value().dtype == jnp.bfloat16
  assert np.abs(_jax_logits(model16) - _torch_logits(hf_model)).max() < 0.1


def test_qwen2_bias_matches_transformers(tmp_path):
  hf_model = random_hf_llama(seed=1, model_type="qwen2", tie_word_embeddings=True)
  hf_model.save_pretrained(tmp_path)
  model = weights.build_model(str(tmp_path))
  assert model.cfg.attention_bias and model.layers.q.bias is not None
  assert model.layers.o.bias is None
  np.testing.assert_allclose(_jax_logits(model), _torch_logits(hf_model), atol=1e-4)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  rope = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)
  hf_model = random_hf_llama(seed=2, rope_parameters=rope, max_position_embeddings=256)
  hf_model.save_pretrained(tmp_path)
  model = weights.build_model(str(tmp_path))
  assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.factor == 8.0
  tokens = np.random.RandomState(3).randint(0, 256, (1, 40)).astype(np.int32)
  got = _jax_logits(model, tokens)
  np.testing.assert_allclose(got, _torch_logits(hf_model, tokens), atol=1e-4)
  plain = weights.build_model(str(tmp_path))
  plain.cfg = plain.cfg.replace(rope_scaling=None)
  assert np.abs(_jax_logits(plain, tokens) - got).max() > 1e-3  # the scaling matters


def test_llama3_gguf_rope_freqs_matches_transformers(tmp_path):
  """llama.cpp stores llama3 scaling as per-frequency divisors (tensor rope_freqs.weight)."""
  rope = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)
  hf_model = random_hf_llama(seed=2, rope_parameters=rope, max_position_embeddings=256)
  head_dim = hf_model.config.head_dim
  plain_inv_freq = 1.0 / (10_000.0 ** (np.arange(0, head_dim, 2) / head_dim))
  factors = (plain_inv_freq / hf_model.model.rotary_emb.inv_freq.numpy()).astype(np.float32)
  assert factors.max() > 2  # the scaling is active on the low frequencies
  state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  path = write_llama_gguf(tmp_path / "llama3.gguf", state, hf_model.config,
                          extra={"rope_freqs.weight": factors})
  model = weights.build_model(str(path))
  assert model.cfg.rope_freq_factors is not None
  tokens = np.random.RandomState(3).randint(0, 256, (1, 40)).astype(np.int32)
  np.testing.assert_allclose(_jax_logits(model, tokens), _torch_logits(hf_model, tokens),
                             atol=1e-4)


def test_mesh_placement_and_preset(tiny_hf, tmp_path):
  from jaxicd.sharding import DEFAULT_RULES, logical_to_spec, param_shardings
  hf_model, _ = tiny_hf
  hf_model.save_pretrained(tmp_path)
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = weights.build_model(str(tmp_path), mesh=mesh, rules=DEFAULT_RULES,
                              lora=dict(rank=2, alpha=4.0, targets=["q"]))
  kernel = model.layers.q.kernel.get_value()
  assert kernel.sharding.spec == logical_to_spec(("layers", "embed", "heads"))
  assert model.layers.q.lora_a.get_value().sharding.mesh == mesh
  np.testing.assert_allclose(_jax_logits(model), _torch_logits(hf_model), atol=1e-4)
  tiny, tokenizer = weights.load_model("tiny", mesh=mesh)
  assert tokenizer is None and tiny.embed.get_value().shape == (512, 64)
  shardings = param_shardings(model, mesh)
  assert shardings["layers"]["down"]["kernel"].spec == logical_to_spec(("layers", "mlp", "embed"))
  assert shardings["embed"].spec == logical_to_spec(("vocab", "embed"))


_SHARDED_LOAD = """
import sys
import jax, numpy as np
from jax.sharding import AxisType
from jaxicd.model import weights
from jaxicd.sharding import logical_to_spec
path = sys.argv[1]
mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
sharded = weights.build_model(path, mesh=mesh, lora=dict(rank=4, alpha=8.0))
kernel = sharded.layers.q.kernel.get_value()
assert kernel.sharding.spec == logical_to_spec(("layers", "embed", "heads")), kernel.sharding
assert len(kernel.addressable_shards) == 4
assert kernel.addressable_shards[0].data.shape == (2, 32, 32), kernel.sharding
assert sharded.embed.get_value().sharding.spec == logical_to_spec(("vocab", "embed"))
assert sharded.layers.down.lora_b.get_value().sharding.spec == logical_to_spec(
    ("layers", "lora", "embed"))
plain = weights.build_model(path, lora=dict(rank=4, alpha=8.0))
tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
with jax.set_mesh(mesh):
  got = np.asarray(jax.jit(lambda m, t: m(t))(sharded, tokens))
want = np.asarray(plain(tokens))
assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
print("OK")
"""


def test_sharded_load_on_four_devices(tiny_hf, tmp_path):
  """Streams a checkpoint onto a 2x2 (fsdp x tensor) mesh of fake CPU devices."""
  import os
  import subprocess
  import sys
  hf_model, _ = tiny_hf
  hf_model.save_pretrained(tmp_path)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    weights.build_model(str(tmp_path / "missing.gguf"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    weights.build_model(str(tmp_path))
  with pytest.raises(ValueError, match="unknown model source"):
    weights.build_model("no-such-preset")


def test_corrupt_and_truncated_gguf(tiny_hf, tmp_path):
  hf_model, state = tiny_hf
  good = write_llama_gguf(tmp_path / "good.gguf", state, hf_model.config)
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(good.read_bytes()[:-1000])
  with pytest.raises(WeightsError, match=r"truncated\.gguf.*truncated"):
    weights.build_model(str(truncated))
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(b"not a gguf file at all")
  with pytest.raises(WeightsError, match=r"garbage\.gguf.*not a readable GGUF"):
    weights.build_model(str(garbage))


def test_unsupported_quant_type_names_tensor(tiny_hf, tmp_path):
  import gguf
  hf_model, state = tiny_hf
  path = tmp_path / "iq.gguf"
  write_llama_gguf(path, state, hf_model.config)
  # Rewrite with one IQ4_NL tensor (valid bytes layout, a type jaxicd does not dequantize).
  path2 = tmp_path / "iq4.gguf"
  writer = gguf.GGUFWriter(str(path2), "llama")
  reader = gguf_io.GgufFile(path)
  for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv"):
    writer.add_uint32(f"llama.{key}", reader.metadata[f"llama.{key}"])
  for name, info in reader.tensors.items():
    if name == "blk.1.ffn_up.weight":
      rows, cols = info.shape
      raw = np.zeros((rows, cols // 32 * 18), np.uint8)
      writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    else:
      writer.add_tensor(name, gguf_io.dequantize(reader.raw(name), info.type_id))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(WeightsError, match=r"iq4\.gguf.*blk\.1\.ffn_up\.weight.*IQ4_NL"):
    weights.build_model(str(path2))


def test_shape_mismatch_names_file_and_tensor(tiny_hf, tmp_path):
  hf_model, state = tiny_hf
  config = types.SimpleNamespace(**{k: getattr(hf_model.config, k) for k in (
      "num_hidden_layers", "max_position_embeddings", "hidden_size", "num_attention_heads",
      "num_key_value_heads", "rms_norm_eps", "head_dim", "vocab_size", "rope_parameters")},
      intermediate_size=96)  # the tensors have 128
  path = write_llama_gguf(tmp_path / "mismatch.gguf", state, config)
  with pytest.raises(WeightsError, match=r"mismatch\.gguf.*'blk\.0\.ffn_gate\.weight'.*shape"):
    weights.build_model(str(path))
  # HF dir: config.json says one thing, safetensors another.
  hf_dir = tmp_path / "hf"
  hf_model.save_pretrained(hf_dir)
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["intermediate_size"] = 96
  (hf_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(WeightsError, match=r"model\.safetensors.*mlp\.gate_proj\.weight.*shape"):
    weights.build_model(str(hf_dir))


def test_truncated_safetensors(tiny_hf, tmp_path):
  hf_model, _ = tiny_hf
  hf_model.save_pretrained(tmp_path)
  file = tmp_path / "model.safetensors"
  file.write_bytes(file.read_bytes()[:-4096])
  with pytest.raises(WeightsError, match=r"model\.safetensors.*corrupt or truncated"):
    weights.build_model(str(tmp_path))


def test_source_fingerprint(tiny_hf, tmp_path):
  hf_model, state = tiny_hf
  a = write_llama_gguf(tmp_path / "a.gguf", state, hf_model.config)
  b = tmp_path / "b.gguf"
  shutil.copy(a, b)
  fa, fb = weights.source_fingerprint(str(a)), weights.source_fingerprint(str(b))
  assert fa["kind"] == "gguf" and fa["sha256"] == fb["sha256"] and fa["path"] != fb["path"]
  other = write_llama_gguf(tmp_path / "c.gguf", {k: v + 1 for k, v in state.items()},
                           hf_model.config)
  assert weights.source_fingerprint(str(other))["sha256"] != fa["sha256"]
  assert weights.source_fingerprint("tiny")["kind"] == "preset"
  hf_model.save_pretrained(tmp_path / "hf")
  assert weights.source_fingerprint(str(tmp_path / "hf"))["kind"] == "hf"
