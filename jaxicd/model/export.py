"""Exporting a trained jaxicd Llama in formats that transformers and PEFT load unchanged.

``export_peft`` writes the LoRA adapters as a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base, dir)`` on the base
checkpoint the adapters were trained on. ``export_merged`` folds the adapters into the base
weights and writes a self-contained transformers checkpoint (``config.json``, ``model.safetensors``
or shards plus an index, and the tokenizer when one is given) that both
``AutoModelForCausalLM.from_pretrained(dir)`` and ``jaxicd.model.weights.build_model(dir)`` load.

Tensor names and layouts come from the loader's own mapping (``weights.hf_tensors``,
``weights.hf_projection_names``), so export and import cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import processors

from jaxicd.model import lora as lora_lib
from jaxicd.model import weights
from jaxicd.model.config import LORA_TARGETS, LlamaConfig
from jaxicd.model.llama import Llama

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# transformers' default shard size (decimal bytes).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Written by an export (or by transformers next to it); replaced with overwrite=True. Any
# *.safetensors file counts too: a stale shard would be read as part of the new checkpoint.
_EXPORT_FILES = frozenset({
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, GENERATION_CONFIG, MODEL_INDEX,
    TOKENIZER_FILE, TOKENIZER_CONFIG, "special_tokens_map.json", "chat_template.jinja"})
# PyTorch checkpoints say so in the safetensors header; some transformers versions require it.
_SAFETENSORS_METADATA = {"format": "pt"}


class ExportError(ValueError):
  """An export that cannot be written; the message names the argument, field or path."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def export_peft(model: Llama, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                overwrite: bool = False) -> dict[str, Any]:
  """Writes ``model``'s LoRA adapters as a PEFT adapter directory.

  Tensors are saved as PEFT names them (``base_model.model.model.layers.{i}.self_attn.q_proj.
  lora_A.weight`` ``[r, in]``, ``...lora_B.weight`` ``[out, r]``) in the adapters' dtype.

  Args:
    model: a ``Llama`` with LoRA adapters (``model.cfg.lora.rank > 0``).
    out_dir: the directory to write; created if missing, must be empty unless ``overwrite``.
    base_model_name_or_path: the base checkpoint (HF hub id or directory) the adapters belong
      on; recorded in ``adapter_config.json``.
    overwrite: replace the export files of a non-empty ``out_dir`` (other files are kept).

  Returns:
    A summary: ``dir``, ``files``, ``tensors``, ``bytes`` (tensor bytes), ``removed``.

  Raises:
    ExportError: no adapters, an empty base name, a bad ``out_dir`` or non-finite adapters.
  """
  _check_model(model)
  cfg = model.cfg
  adapted = [t for t in LORA_TARGETS if getattr(model.layers, t).lora_a is not None]
  if not cfg.lora.rank or not adapted:
    raise ExportError("export_peft: the model has no LoRA adapters (model.cfg.lora.rank == "
                      f"{cfg.lora.rank}); build it with lora=LoraConfig(rank=...) or use "
                      "export_merged for a plain model")
  if not isinstance(base_model_name_or_path, str) or not base_model_name_or_path.strip():
    raise ExportError("export_peft: base_model_name_or_path must name the base checkpoint "
                      f"(an HF hub id or directory), got {base_model_name_or_path!r}")
  path, stale = _check_out_dir(out_dir, overwrite)

  tensors: dict[str, np.ndarray] = {}
  for target in adapted:
    linear = getattr(model.layers, target)
    a = np.asarray(jax.device_get(linear.lora_a.get_value()))  # [L, in, r]
    b = np.asarray(jax.device_get(linear.lora_b.get_value()))  # [L, r, out]
    for i, module in enumerate(weights.hf_projection_names(target, cfg.num_layers)):
      for kind, value in (("lora_A", a[i].T), ("lora_B", b[i].T)):
        name = f"base_model.model.{module}.{kind}.weight"
        tensors[name] = _host_tensor(name, value, value.dtype)
  modules = [weights.hf_projection_names(t, 1)[0].rsplit(".", 1)[1] for t in adapted]
  alpha = float(cfg.lora.alpha)
  adapter_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(cfg.lora.rank),
      "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
      "lora_dropout": float(cfg.lora.dropout),
      "target_modules": modules,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      # jaxicd scales by alpha / r, PEFT's default; spelled out so no other default applies.
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }

  removed = _remove_stale(path, stale)
  with _Writer(path) as writer:
    writer.write(ADAPTER_WEIGHTS, lambda tmp: _save_safetensors(tensors, tmp))
    writer.write(ADAPTER_CONFIG, lambda tmp: _save_json(adapter_config, tmp))
  summary = dict(dir=str(path), files=writer.files, tensors=len(tensors),
                 bytes=sum(t.nbytes for t in tensors.values()), removed=removed)
  log.info("exported PEFT adapters to %s: %d tensors, %d bytes (targets %s)", path,
           summary["tensors"], summary["bytes"], ",".join(modules))
  return summary


def export_merged(model: Llama, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                  dtype: Any = "float32", overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, Any]:
  """Writes ``model`` with its LoRA adapters merged as a transformers checkpoint directory.

  The adapters are merged into a clone (``lora.merge``), so ``model`` itself is left as it is;
  the merged kernels cost one more copy of the adapted weights on the device. On the host, at
  most one shard plus one stacked parameter is held at a time.

  Args:
    model: a ``Llama``, with or without adapters.
    out_dir: the directory to write; created if missing, must be empty unless ``overwrite``.
    tokenizer: optional; a jaxicd ``Tokenizer`` (writes ``tokenizer.json`` and a minimal
      ``tokenizer_config.json``) or a transformers tokenizer (``save_pretrained``). Its special
      ids also go into ``config.json`` and ``generation_config.json``. Anything else is
      skipped, and the summary says so.
    dtype: storage dtype of the weights: "float32", "bfloat16" or "float16".
    overwrite: replace the export files of a non-empty ``out_dir`` (other files are kept).
    max_shard_bytes: above this, weights are split into ``model-0000k-of-0000n.safetensors``
      shards with a ``model.safetensors.index.json``.

  Returns:
    A summary: ``dir``, ``files``, ``tensors``, ``bytes`` (tensor bytes), ``dtype``,
    ``tokenizer`` (what happened to it), ``removed``.

  Raises:
    ExportError: an unsupported ``dtype`` or config, a tokenizer larger than the model's
      vocabulary, a bad ``out_dir``, or a tensor with non-finite values in ``dtype``.
  """
  _check_model(model)
  cfg = model.cfg
  dtype_name = _dtype_name(dtype)
  if cfg.rope_freq_factors is not None:
    raise ExportError(
        "export_merged: model.cfg.rope_freq_factors (llama.cpp's form of Llama 3 RoPE scaling, "
        "from a GGUF base) has no transformers config equivalent; load the base from an HF "
        "checkpoint directory (rope_scaling) to export")
  if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
    raise ExportError(f"export_merged: max_shard_bytes must be a positive int, "
                      f"got {max_shard_bytes!r}")
  special_ids = _special_ids(tokenizer)
  _check_tokenizer_vocab(tokenizer, cfg)
  hf_config = hf_config_dict(cfg, dtype_name, special_ids)
  path, stale = _check_out_dir(out_dir, overwrite)

  merged = lora_lib.merge(nnx.clone(model)) if cfg.lora.rank else model
  removed = _remove_stale(path, stale)
  with _Writer(path) as writer:
    count, nbytes = _write_weights(writer, weights.hf_tensors(merged), jnp.dtype(dtype_name),
                                   max_shard_bytes)
    writer.write(MODEL_CONFIG, lambda tmp: _save_json(hf_config, tmp))
    generation = _generation_config(special_ids)
    if generation:
      writer.write(GENERATION_CONFIG, lambda tmp: _save_json(generation, tmp))
    tokenizer_status = _save_tokenizer(tokenizer, writer, cfg)
  summary = dict(dir=str(path), files=writer.files, tensors=count, bytes=nbytes,
                 dtype=dtype_name, tokenizer=tokenizer_status, removed=removed)
  log.info("exported merged model to %s: %d tensors, %d bytes (%s); tokenizer %s", path, count,
           nbytes, dtype_name, tokenizer_status)
  return summary


def hf_config_dict(cfg: LlamaConfig, dtype: str = "float32",
                   special_ids: dict[str, Any] | None = None) -> dict[str, Any]:
  """The transformers ``config.json`` of ``cfg`` (``LlamaForCausalLM``, or ``Qwen2ForCausalLM``
  for q/k/v biases), with the keys transformers 4.x reads and 5.x still accepts."""
  qwen2 = cfg.attention_bias  # jaxicd's only biased variant is Qwen2's (q, k, v; not o)
  special_ids = special_ids or {}
  rope_scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_scaling = {"rope_type": "llama3", "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings}
  config = {
      "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen2 else "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": dtype,
      # Unknown ids are written as null rather than left to transformers' defaults (1 and 2).
      "bos_token_id": special_ids.get("bos"),
      "eos_token_id": special_ids.get("eos"),
      "pad_token_id": special_ids.get("pad"),
  }
  if qwen2:
    config["use_sliding_window"] = False
  else:
    config.update(attention_bias=False, mlp_bias=False)
  return config


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _check_model(model: Any) -> None:
  if not isinstance(model, Llama):
    raise ExportError(f"export: expected a jaxicd.model.llama.Llama, got {type(model).__name__}")
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable
         for x in jax.tree.leaves(nnx.state(model, nnx.Param))):
    raise ExportError("export: the model is sharded across processes; export from a "
                      "single-process run (or gather the parameters onto one process first)")


def _dtype_name(dtype: Any) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in EXPORT_DTYPES:
    raise ExportError(f"export_merged: dtype {dtype!r} is not supported; choose one of "
                      f"{', '.join(EXPORT_DTYPES)}")
  return name


def _check_out_dir(out_dir: str | os.PathLike, overwrite: bool
                   ) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """The output path and the stale export files in it that ``overwrite`` replaces."""
  path = pathlib.Path(out_dir).expanduser()
  if path.exists() and not path.is_dir():
    raise ExportError(f"{path}: exists and is not a directory")
  if not path.is_dir():
    return path, []
  entries = sorted(path.iterdir())
  if entries and not overwrite:
    raise ExportError(f"{path}: directory is not empty ({len(entries)} entries); pass "
                      "overwrite=True to replace the export files in it")
  stale = [p for p in entries if p.is_file()
           and (p.name in _EXPORT_FILES or p.name.endswith(".safetensors"))]
  return path, stale


def _remove_stale(path: pathlib.Path, stale: list[pathlib.Path]) -> list[str]:
  path.mkdir(parents=True, exist_ok=True)
  for p in stale:
    p.unlink()
  if stale:
    log.info("%s: removed %d files of an earlier export", path, len(stale))
  return [p.name for p in stale]


def _host_tensor(name: str, value: np.ndarray, dtype: Any) -> np.ndarray:
  """``value`` cast to ``dtype``, contiguous; non-finite values (e.g. a float16 overflow or a
  diverged run) fail here rather than in whoever loads the file."""
  with np.errstate(over="ignore"):  # overflow is reported below, with the tensor's name
    w = np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))
  bad = np.count_nonzero(~np.isfinite(w))
  if bad:
    raise ExportError(f"tensor {name!r}: {bad} of {w.size} values are not finite in "
                      f"{np.dtype(dtype).name}; refusing to export it")
  return w


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

class _Writer:
  """Writes files into a directory through ``.partial`` temporaries renamed into place; if the
  export fails, the files it already wrote are removed again."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.files: list[str] = []
    self._temps: list[pathlib.Path] = []

  def __enter__(self) -> "_Writer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      for p in self._temps + [self.path / f for f in self.files]:
        p.unlink(missing_ok=True)

  def temp(self, stem: str) -> pathlib.Path:
    tmp = self.path / f".{stem}.partial"
    self._temps.append(tmp)
    return tmp

  def publish(self, tmp: pathlib.Path, name: str) -> None:
    # safetensors creates its files owner-only (0600); give them a plain file's mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, self.path / name)
    self._temps.remove(tmp)
    self.files.append(name)

  def write(self, name: str, save: Callable[[pathlib.Path], None]) -> None:
    tmp = self.temp(name)
    save(tmp)
    self.publish(tmp, name)


def _save_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
  try:
    save_file(tensors, str(path), metadata=_SAFETENSORS_METADATA)
  except Exception as e:  # the Rust serializer raises plain exceptions (e.g. an unknown dtype)
    dtypes = sorted({t.dtype.name for t in tensors.values()})
    raise ExportError(f"{path}: safetensors cannot write dtypes {dtypes} ({e}); upgrade "
                      "safetensors or export float32") from e


def _save_json(obj: Any, path: pathlib.Path) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_weights(writer: _Writer, named: Iterable[tuple[str, np.ndarray]], dtype: np.dtype,
                   max_shard_bytes: int) -> tuple[int, int]:
  """Writes ``named`` tensors as ``model.safetensors``, or as shards of at most
  ``max_shard_bytes`` (a larger single tensor gets a shard of its own) plus an index."""
  parts: list[tuple[pathlib.Path, list[str]]] = []
  pending: dict[str, np.ndarray] = {}
  pending_bytes = total = count = 0

  def flush() -> None:
    tmp = writer.temp(f"model-part-{len(parts)}")
    _save_safetensors(pending, tmp)
    parts.append((tmp, list(pending)))
    log.info("wrote shard %d (%d tensors, %d bytes)", len(parts), len(pending), pending_bytes)

  for name, value in named:
    w = _host_tensor(name, value, dtype)
    if pending and pending_bytes + w.nbytes > max_shard_bytes:
      flush()
      pending, pending_bytes = {}, 0
    pending[name] = w
    pending_bytes += w.nbytes
    total += w.nbytes
    count += 1
  if pending:
    flush()

  if len(parts) == 1:
    writer.publish(parts[0][0], MODEL_WEIGHTS)
    return count, total
  weight_map = {}
  for k, (tmp, names) in enumerate(parts):
    shard = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
    writer.publish(tmp, shard)
    weight_map.update({n: shard for n in names})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  writer.write(MODEL_INDEX, lambda tmp: _save_json(index, tmp))
  return count, total


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _is_hf_tokenizer(tokenizer: Any) -> bool:
  return callable(getattr(tokenizer, "save_pretrained", None))


def _tokenizers_backend(tokenizer: Any) -> Any:
  """The ``tokenizers.Tokenizer`` of a jaxicd ``Tokenizer`` (or None)."""
  backend = getattr(tokenizer, "backend", None)
  return backend if callable(getattr(backend, "to_str", None)) else None


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
  if tokenizer is None:
    return {}
  if _is_hf_tokenizer(tokenizer):
    return dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                pad=tokenizer.pad_token_id, eot=None)
  return dict(bos=getattr(tokenizer, "bos_id", None), eos=getattr(tokenizer, "eos_id", None),
              pad=getattr(tokenizer, "pad_id", None),
              eot=getattr(tokenizer, "end_of_turn_id", None))


def _check_tokenizer_vocab(tokenizer: Any, cfg: LlamaConfig) -> None:
  if tokenizer is None:
    return
  size = len(tokenizer) if _is_hf_tokenizer(tokenizer) else getattr(tokenizer, "vocab_size", None)
  if size is not None and int(size) > cfg.vocab_size:
    raise ExportError(f"export_merged: the tokenizer has {size} token ids but the model's "
                      f"vocab_size is {cfg.vocab_size}; is it the model's tokenizer?")


def _generation_config(special_ids: dict[str, int | None]) -> dict[str, Any]:
  """Decoding stops at EOS and, for chat models, at the end-of-turn token."""
  eos = [i for i in (special_ids.get("eos"), special_ids.get("eot")) if i is not None]
  eos = list(dict.fromkeys(eos))
  config = {"bos_token_id": special_ids.get("bos"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": special_ids.get("pad")}
  return {k: v for k, v in config.items() if v is not None}


def _save_tokenizer(tokenizer: Any, writer: _Writer, cfg: LlamaConfig) -> str:
  """Writes the tokenizer files; returns what happened, for the summary."""
  if tokenizer is None:
    return "not written: no tokenizer given"
  if _is_hf_tokenizer(tokenizer):
    before = set(os.listdir(writer.path))
    tokenizer.save_pretrained(str(writer.path))
    writer.files.extend(sorted(set(os.listdir(writer.path)) - before))
    return "written (transformers save_pretrained)"
  backend = _tokenizers_backend(tokenizer)
  if backend is None:
    log.warning("tokenizer of type %s has no tokenizer.json writer; not exported",
                type(tokenizer).__name__)
    return f"skipped: {type(tokenizer).__name__} has no tokenizer.json writer"
  copy = tokenizers.Tokenizer.from_str(backend.to_str())
  bos = getattr(tokenizer, "bos_token", None)
  add_bos = bool(getattr(tokenizer, "add_bos", False)) and bos is not None
  if add_bos and copy.post_processor is None:
    # jaxicd encodes without special tokens; transformers callers expect the BOS the source
    # asked for (GGUF add_bos_token) to be added by tokenizer.json's post-processor.
    copy.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, copy.token_to_id(bos))])
  config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "model_max_length": cfg.max_position_embeddings,
      "clean_up_tokenization_spaces": False,
      "add_bos_token": add_bos,
      "add_eos_token": False,
  }
  for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
    value = getattr(tokenizer, key, None)
    if value is not None:
      config[key] = value
  template = getattr(tokenizer, "chat_template", None)
  if template:
    config["chat_template"] = template
  writer.write(TOKENIZER_FILE, lambda tmp: copy.save(str(tmp)))
  writer.write(TOKENIZER_CONFIG, lambda tmp: _save_json(config, tmp))
  return "written (tokenizer.json, tokenizer_config.json)"
