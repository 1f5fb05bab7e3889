"""Loading pretrained weights (GGUF or HF safetensors checkpoints) into the Flax Llama.

Both readers present tensors under transformers' names and layout (``[out, in]`` projections, Q/K
rows in the rotate-half RoPE order), so one mapping fills the model. Tensors are read one at a
time (memory-mapped), dequantized or cast to the parameter dtype, stacked per layer on the host,
and placed on devices with the parameter's logical sharding, so host memory peaks at one stacked
parameter rather than the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicd import sharding as sharding_lib
from jaxicd.model import config as config_lib
from jaxicd.model import embedded
from jaxicd.model import gguf_io
from jaxicd.model.config import LlamaConfig, LoraConfig
from jaxicd.model.llama import Llama
from jaxicd.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class WeightsError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
  kind: str           # "gguf" | "hf" | "preset"
  path: pathlib.Path | None
  name: str           # what the caller passed


def resolve_source(source: str | os.PathLike) -> Source:
  """"smollm2" (embedded GGUF), a preset name (random weights), a .gguf file or an HF dir."""
  text = str(source)
  if text.lower() in embedded.EMBEDDED_NAMES:
    return Source("gguf", embedded.smollm2_gguf_path(), text)
  if text in config_lib.PRESETS:
    return Source("preset", None, text)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    return Source("hf", path, text)
  if path.is_file():
    if path.suffix.lower() != ".gguf":
      raise WeightsError(f"{path}: expected a .gguf file or an HF checkpoint directory")
    return Source("gguf", path, text)
  if path.suffix.lower() == ".gguf" or os.sep in text:
    raise FileNotFoundError(f"model weights not found: {path}")
  raise ValueError(f"unknown model source {text!r}: not an embedded name "
                   f"({', '.join(embedded.EMBEDDED_NAMES)}), a preset "
                   f"({', '.join(sorted(config_lib.PRESETS))}), a .gguf file or a directory")


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

# Tensor types we dequantize (with gguf.quants, numpy only). Others fail with a clear error.
GGUF_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_GGUF_ARCHES = ("llama", "qwen2")
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                      "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}


def _hf_name_of_gguf(name: str) -> str | None:
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
  return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves).

  llama.cpp's converter reorders each head's rows from ``[x0..x_{d/2-1}, y0..y_{d/2-1}]`` to
  ``[x0, y0, x1, y1, ...]``; this restores transformers' order. Works for weights ``[out, in]``
  and biases ``[out]``.
  """
  rows = w.shape[0]
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


class GgufTensors:
  """Tensors of a GGUF file under transformers' names, dequantized to float32."""

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {self.path}")
    try:
      self._file = gguf_io.GgufFile(self.path)
    except (gguf_io.GgufFormatError, OSError, ValueError) as e:
      raise WeightsError(f"{self.path}: not a readable GGUF file ({e})") from e
    self._tensors: dict[str, gguf_io.TensorInfo] = {}
    for name, info in self._file.tensors.items():
      hf = _hf_name_of_gguf(name)
      if hf is not None:
        self._tensors[hf] = info
      elif name != "rope_freqs.weight":
        raise WeightsError(f"{self.path}: tensor {name!r} is not part of a Llama/Qwen2 model")
    self.config = self._config()

  def _field(self, key: str, default: Any = None) -> Any:
    value = self._file.metadata.get(key, default)
    if value is None:
      raise WeightsError(f"{self.path}: GGUF metadata {key!r} is missing")
    return value

  def _config(self) -> LlamaConfig:
    arch = self._field("general.architecture")
    if arch not in _GGUF_ARCHES:
      raise WeightsError(f"{self.path}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(_GGUF_ARCHES)})")
    scaling = self._file.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
      raise WeightsError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
    self.arch = arch
    hidden = int(self._field(f"{arch}.embedding_length"))
    heads = int(self._field(f"{arch}.attention.head_count"))
    embed = self._tensors.get("model.embed_tokens.weight")
    if embed is None:
      raise WeightsError(f"{self.path}: tensor 'token_embd.weight' is missing")
    head_dim = int(self._field(f"{arch}.attention.key_length", hidden // heads))
    freq_factors = None
    if "rope_freqs.weight" in self._file.tensors:  # llama3 scaling, llama.cpp style
      info = self._file.tensors["rope_freqs.weight"]
      if info.type_id != 0 or info.shape != (head_dim // 2,):
        raise WeightsError(f"{self.path}: tensor 'rope_freqs.weight' must be F32 "
                           f"[{head_dim // 2}], got type {info.type_id} shape {info.shape}")
      freq_factors = tuple(float(f) for f in gguf_io.dequantize(self._file.raw(info.name), 0))
    return LlamaConfig(
        vocab_size=int(embed.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
        num_layers=int(self._field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(self._field(f"{arch}.rope.freq_base", 10_000.0)),
        rope_freq_factors=freq_factors,
        rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="lm_head.weight" not in self._tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
        max_position_embeddings=int(self._field(f"{arch}.context_length", 8192)))

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def names(self) -> list[str]:
    return list(self._tensors)

  def describe(self, name: str) -> str:
    return f"{self.path}: tensor {self._tensors[name].name!r}"

  def get(self, name: str) -> np.ndarray:
    # Imported here: `import gguf` is slowish and only GGUF reads need it.
    import gguf  # pylint: disable=import-outside-toplevel
    info = self._tensors.get(name)
    if info is None:
      raise WeightsError(f"{self.path}: tensor for {name!r} is missing")
    qtype = gguf.GGMLQuantizationType(info.type_id)
    if qtype.name not in GGUF_SUPPORTED_TYPES:
      raise WeightsError(f"{self.path}: tensor {info.name!r} has unsupported type {qtype.name} "
                         f"(supported: {', '.join(GGUF_SUPPORTED_TYPES)})")
    try:
      w = gguf_io.dequantize(self._file.raw(info.name), info.type_id)
    except Exception as e:
      raise WeightsError(f"{self.path}: tensor {info.name!r} ({qtype.name}) cannot be "
                         f"dequantized ({type(e).__name__}: {e})") from e
    w = np.asarray(w, np.float32).reshape(info.shape)
    if self.arch == "llama":  # llama.cpp permutes Q/K only for its interleaved-RoPE archs.
      cfg = self.config
      if name.endswith(("q_proj.weight", "q_proj.bias")):
        w = unpermute_qk(w, cfg.num_heads)
      elif name.endswith(("k_proj.weight", "k_proj.bias")):
        w = unpermute_qk(w, cfg.num_kv_heads)
    return w


# --------------------------------------------------------------------------------------------
# HF safetensors
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "F64": np.float64}


def _read_safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise WeightsError(f"{path}: truncated safetensors file")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8:
      raise WeightsError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  return header, 8 + n


class SafetensorsTensors:
  """Tensors of an HF checkpoint dir (``model.safetensors`` or a sharded index), memory-mapped."""

  def __init__(self, directory: pathlib.Path):
    self.path = pathlib.Path(directory)
    config_path = self.path / "config.json"
    if not config_path.is_file():
      raise FileNotFoundError(f"HF checkpoint {self.path}: config.json not found")
    try:
      hf_config = json.loads(config_path.read_text())
    except ValueError as e:
      raise WeightsError(f"{config_path}: not valid JSON ({e})") from e
    self.config = config_from_hf(hf_config, config_path)
    index = self.path / "model.safetensors.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise WeightsError(f"{index}: not a safetensors index ({e})") from e
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.path.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(
            f"HF checkpoint {self.path}: no *.safetensors files (pickled .bin weights are "
            "not loaded, for safety)")
    self._entries: dict[str, tuple[pathlib.Path, dict[str, Any], int]] = {}
    for name in files:
      file = self.path / name
      if not file.is_file():
        raise FileNotFoundError(f"HF checkpoint {self.path}: shard {name} not found")
      header, data_start = _read_safetensors_header(file)
      for tensor, info in header.items():
        self._entries[tensor] = (file, info, data_start)
    self._maps: dict[pathlib.Path, np.memmap] = {}

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def names(self) -> list[str]:
    return list(self._entries)

  def describe(self, name: str) -> str:
    if name in self:
      return f"{self._entries[name][0]}: tensor {name!r}"
    return f"{self.path}: tensor {name!r}"

  def get(self, name: str) -> np.ndarray:
    entry = self._entries.get(name)
    if entry is None:
      raise WeightsError(f"{self.path}: tensor {name!r} is missing")
    file, info, data_start = entry
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise WeightsError(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if end - begin != nbytes or data_start + end > file.stat().st_size:
      raise WeightsError(f"{file}: tensor {name!r} is corrupt or truncated "
                         f"(shape {shape}, {end - begin} bytes)")
    if file not in self._maps:
      self._maps[file] = np.memmap(file, np.uint8, "r")
    raw = self._maps[file][data_start + begin:data_start + end]
    return raw.view(dtype).reshape(shape)


def config_from_hf(hf: Mapping[str, Any], where: Any = "config.json") -> LlamaConfig:
  """A ``LlamaConfig`` from a transformers ``config.json`` dict (Llama or Qwen2)."""
  model_type = hf.get("model_type")
  if model_type not in ("llama", "qwen2"):
    raise WeightsError(f"{where}: model_type {model_type!r} is not supported (llama, qwen2)")
  if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise WeightsError(f"{where}: Llama with attention_bias/mlp_bias is not supported")
  rope = dict(hf.get("rope_parameters") or {})  # transformers 5 nests RoPE settings here.
  scaling = hf.get("rope_scaling") or rope
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if rope_type not in ("default", "llama3"):
    raise WeightsError(f"{where}: RoPE type {rope_type!r} is not supported (default, llama3)")
  rope_scaling = None
  if rope_type == "llama3":
    rope_scaling = config_lib.RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  heads = int(hf["num_attention_heads"])
  try:
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10_000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)))
  except KeyError as e:
    raise WeightsError(f"{where}: missing field {e.args[0]!r}") from e


# --------------------------------------------------------------------------------------------
# Filling a model
# --------------------------------------------------------------------------------------------

_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}


def _param_sources(model: Llama) -> Iterator[tuple[nnx.Variable, list[str] | str, bool]]:
  """(variable, source tensor name, or one per layer if stacked, transpose?) per base param."""
  cfg = model.cfg
  L = range(cfg.num_layers)
  yield model.embed, "model.embed_tokens.weight", False
  yield model.final_norm, "model.norm.weight", False
  if model.lm_head is not None:
    yield model.lm_head, "lm_head.weight", True
  layers = model.layers
  yield layers.attn_norm, [f"model.layers.{i}.input_layernorm.weight" for i in L], False
  yield layers.mlp_norm, [f"model.layers.{i}.post_attention_layernorm.weight" for i in L], False
  for name, hf in _PROJ.items():
    linear = getattr(layers, name)
    yield linear.kernel, [f"model.layers.{i}.{hf}.weight" for i in L], True
    if linear.bias is not None:
      yield linear.bias, [f"model.layers.{i}.{hf}.bias" for i in L], False


def fill_from_tensors(model: Llama, tensors, *, mesh=None, rules=sharding_lib.DEFAULT_RULES,
                      progress: Callable[[str], None] | None = None) -> Llama:
  """Sets every base parameter of ``model`` (possibly abstract) from ``tensors``, in place.

  ``tensors``: a ``GgufTensors`` or ``SafetensorsTensors`` (transformers names and layout).
  """
  used: set[str] = set()
  for var, names, transpose in _param_sources(model):
    abstract = var.get_value()
    shape, dtype = tuple(abstract.shape), np.dtype(abstract.dtype)
    stacked = isinstance(names, list)
    names = names if stacked else [names]
    per_shape = shape[1:] if stacked else shape
    host = np.empty(shape, dtype)
    for i, name in enumerate(names):
      if name not in tensors:
        raise WeightsError(f"{tensors.path}: tensor {name!r} is missing")
      w = tensors.get(name)
      expected = per_shape[::-1] if transpose else per_shape  # in the file's [out, in] layout
      if tuple(w.shape) != expected:
        raise WeightsError(f"{tensors.describe(name)} has shape {tuple(w.shape)} but the "
                           f"config expects {expected}")
      w = w.T if transpose else w
      if stacked:
        host[i] = w.astype(dtype)
      else:
        host[...] = w.astype(dtype)
      used.add(name)
    sharding = (sharding_lib.variable_sharding(mesh, var, rules)
                if mesh is not None else None)
    var.set_value(jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host))
    del host
    if progress:
      progress(names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} layers)")
  ignorable = {"lm_head.weight"} if model.lm_head is None else set()
  unused = sorted(n for n in tensors.names() if n not in used and n not in ignorable
                  and not n.endswith("rotary_emb.inv_freq"))
  if unused:
    raise WeightsError(f"{tensors.path}: {len(unused)} tensors do not fit the model config, "
                       f"e.g. {unused[:3]}")
  return model


def hf_tensors(model: Llama) -> Iterator[tuple[str, np.ndarray]]:
  """The inverse of ``fill_from_tensors``: every base parameter of ``model`` under its
  transformers name and layout (``[out, in]`` projections), as host arrays of the parameter's
  dtype. Stacked parameters are fetched one at a time, so host memory peaks at one of them."""
  for var, names, transpose in _param_sources(model):
    value = np.asarray(jax.device_get(var.get_value()))
    if not isinstance(names, list):
      yield names, value.T if transpose else value
      continue
    for i, name in enumerate(names):
      yield name, value[i].T if transpose else value[i]


def hf_projection_names(target: str, num_layers: int) -> list[str]:
  """transformers' module path of projection ``target`` (a LoRA target: q, k, v, o, gate, up,
  down) in each decoder layer, e.g. ``model.layers.0.self_attn.q_proj``."""
  return [f"model.layers.{i}.{_PROJ[target]}" for i in range(num_layers)]


def _normalize_lora(lora) -> LoraConfig | None:
  if lora is None or isinstance(lora, LoraConfig):
    return lora
  fields = dict(lora)  # a dict or an ml_collections ConfigDict
  if "targets" in fields:
    fields["targets"] = tuple(fields["targets"])
  return LoraConfig(**fields)


def _dtype_name(dtype) -> str | None:
  return None if dtype is None else jnp.dtype(dtype).name


def build_model(source: str | os.PathLike = "smollm2", *, dtype=None, param_dtype=None,
                remat: str | None = None, lora: LoraConfig | Mapping | None = None,
                mesh=None, rules=sharding_lib.DEFAULT_RULES, seed: int = 0) -> Llama:
  """The model of ``source`` without a tokenizer (see ``load_model``)."""
  src = resolve_source(source)
  tensors = None
  if src.kind == "preset":
    cfg = config_lib.preset(src.name)
  elif src.kind == "gguf":
    tensors = GgufTensors(src.path)
    cfg = tensors.config
  else:
    tensors = SafetensorsTensors(src.path)
    cfg = tensors.config
  overrides = dict(dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype), remat=remat,
                   lora=_normalize_lora(lora))
  cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})

  def init() -> Llama:
    return Llama(cfg, rngs=nnx.Rngs(seed))

  if tensors is None and mesh is None:
    return init()
  model = nnx.eval_shape(init)
  # Random parts (all of a preset; else LoRA adapters and RNG state) are initialised under jit
  # so XLA skips the base weights that are about to be overwritten.
  wanted = nnx.Everything() if tensors is None else nnx.Not(
      nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  initialised = jax.jit(lambda: nnx.state(init(), wanted))()
  if mesh is not None:
    initialised = jax.tree.map(
        lambda v: v.replace(jax.device_put(
            v.get_value(), sharding_lib.variable_sharding(mesh, v, rules))),
        initialised, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, initialised)
  if tensors is not None:
    fill_from_tensors(model, tensors, mesh=mesh, rules=rules,
                      progress=lambda name: log.debug("loaded %s", name))
  return model


def load_model(source: str | os.PathLike = "smollm2", *, dtype=None, param_dtype=None,
               remat: str | None = None, lora: LoraConfig | Mapping | None = None, mesh=None,
               rules=sharding_lib.DEFAULT_RULES, seed: int = 0):
  """Returns ``(model, tokenizer)``.

  Args:
    source: "smollm2" (the embedded SmolLM2-135M-Instruct GGUF), a preset name of
      ``jaxicd.model.config.PRESETS`` (random weights, tokenizer None), a ``.gguf`` file, or an
      HF checkpoint directory (config.json + safetensors).
    dtype, param_dtype: compute and storage dtypes ("float32", "bfloat16"); default float32.
    remat: "none" | "full" | "dots".
    lora: a ``LoraConfig`` (or a dict / ConfigDict with its fields); rank 0 or None: no LoRA.
    mesh, rules: place every parameter with ``logical_sharding(mesh, axes, rules)`` as it loads.
    seed: seed of the random parts (LoRA A matrices, preset weights, dropout).
  """
  model = build_model(source, dtype=dtype, param_dtype=param_dtype, remat=remat, lora=lora,
                      mesh=mesh, rules=rules, seed=seed)
  return model, source_tokenizer(source)


def source_tokenizer(source: str | os.PathLike = "smollm2"):
  """The tokenizer that comes with ``source``; None for a preset (random weights)."""
  src = resolve_source(source)
  if src.kind == "preset":
    return None
  embedded_name = str(src.name).lower() in embedded.EMBEDDED_NAMES
  return load_tokenizer("smollm2" if embedded_name else str(src.path))


def _sample_hash(path: pathlib.Path, chunk: int = 1 << 20) -> str:
  """sha256 of the size and three 1 MiB samples (start, middle, end): cheap, content-bound."""
  size = path.stat().st_size
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
      f.seek(offset)
      h.update(f.read(chunk))
  return h.hexdigest()


def source_fingerprint(source: str | os.PathLike) -> dict[str, Any]:
  """Identifies the base weights of ``source`` so a checkpoint can check it resumes on them.

  Compare ``kind`` and ``sha256`` (``path``/``mtime`` are informative: they change when the same
  weights are copied to another machine).
  """
  src = resolve_source(source)
  if src.kind == "preset":
    cfg = config_lib.preset(src.name)
    digest = hashlib.sha256(repr(cfg).encode()).hexdigest()
    return {"kind": "preset", "name": src.name, "sha256": digest}
  if src.kind == "gguf":
    stat = src.path.stat()
    return {"kind": "gguf", "path": str(src.path.resolve()), "size": stat.st_size,
            "mtime": stat.st_mtime, "sha256": _sample_hash(src.path)}
  h = hashlib.sha256()
  files = sorted(p for p in src.path.iterdir()
                 if p.name == "config.json" or p.suffix == ".safetensors")
  sizes = {}
  for p in files:
    sizes[p.name] = p.stat().st_size
    h.update(p.name.encode())
    h.update(_sample_hash(p).encode())
  return {"kind": "hf", "path": str(src.path.resolve()), "files": sizes, "sha256": h.hexdigest()}
