"""The cost model behind ``--config.mode=plan``: what a run will cost before it is launched.

``python -m jaxicd.main --config=configs/llama31_8b_tpu.py --config.mode=plan`` reads the config's
data through the real input pipeline (documents, windows and spans per split, on a sample of
each that is extrapolated to the whole), the model's shapes (``nnx.eval_shape``: no weights are
read and no array is allocated) and the mesh, and prints what the run will cost on a named
accelerator: training tokens and FLOPs, hours and chip-hours at a stated MFU, HBM per chip, and
the cost of coding one note at inference. JAX stays on the CPU and no device is touched.

FLOPs count the matmuls as the code runs them (``jaxicd.model.llama``): with ``N`` the frozen
projection weights (7 per layer) plus the output head, ``N_lora`` the adapter weights, ``L``
layers, ``d_q`` = heads x head_dim and ``T`` the row length, one training token costs

  forward   2 N + 2 N_lora + 4 L T d_q         (QK^T and AV over the whole row: masked, not skipped)
  backward  2 N + 4 N_lora + 8 L T d_q         (activation gradients of every matmul, weight
                                                gradients of the adapters only, 4 attention matmuls)
  total     4 N + 6 N_lora + 12 L T d_q        ("model FLOPs": what MFU is measured against)

Recomputation (``model.remat``, and the attention backward recomputing its scores) is reported
apart as hardware FLOPs; hours use model FLOPs at ``plan.mfu``. Inference (``jaxicd.infer``)
prefills each window's prompt (no output head) and decodes ``max_new_tokens`` steps, every
step's attention spanning the whole cache.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import types
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax._src import xla_bridge

from jaxicd import errors
from jaxicd.data import demo, mixture, pipeline, prompts, windows
from jaxicd.model import embedded
from jaxicd.model import weights as weights_lib
from jaxicd.model.config import LlamaConfig, LoraConfig, preset
from jaxicd.model.llama import Llama
from jaxicd.model.tokenizer import load_tokenizer
from jaxicd import sharding
from jaxicd.train.losses import DEFAULT_CHUNK_TOKENS

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip: dense bf16 matmul peak, HBM capacity and bandwidth (vendor figures)."""

  name: str
  peak_tflops: float        # bf16, dense (no sparsity)
  hbm_gb: float             # capacity as stated by the vendor, taken as 1e9 bytes
  hbm_gb_per_s: float
  slice_prefix: str = ""    # Cloud TPU accelerator type; "" for GPUs
  cores_per_chip: int = 1   # v4 and v5p slices are named by TensorCores (2 per chip)

  def slice_name(self, chips: int) -> str:
    if not self.slice_prefix:
      return f"{chips} x {self.name}"
    return f"{self.slice_prefix}-{chips * self.cores_per_chip}"


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v4", 275.0, 32.0, 1200.0, "v4", 2),
    Accelerator("v5e", 197.0, 16.0, 819.0, "v5litepod", 1),
    Accelerator("v5p", 459.0, 95.0, 2765.0, "v5p", 2),
    Accelerator("v6e", 918.0, 32.0, 1640.0, "v6e", 1),
    Accelerator("a100", 312.0, 80.0, 2039.0),
    Accelerator("h100", 989.0, 80.0, 3350.0),
    Accelerator("h200", 989.0, 141.0, 4800.0),
)}


def accelerator(name: str) -> Accelerator:
  try:
    return ACCELERATORS[name.lower()]
  except KeyError:
    raise errors.ConfigError(f"config.plan.accelerator={name!r}: choose one of "
                             f"{', '.join(ACCELERATORS)}") from None


def dtype_bytes(name: str) -> int:
  try:
    return _DTYPE_BYTES[str(name)]
  except KeyError:
    raise errors.ConfigError(f"dtype {name!r}: expected one of {', '.join(_DTYPE_BYTES)}") from None


# ----------------------------------------------------------------------------- model shapes


def projections(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of the seven projections of one layer."""
  E, F = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q": (E, q), "k": (E, kv), "v": (E, kv), "o": (q, E),
          "gate": (E, F), "up": (E, F), "down": (F, E)}


def matmul_weights(cfg: LlamaConfig) -> dict[str, int]:
  """Weights that take part in matmuls: the layers' projections, the output head, the adapters."""
  shapes = projections(cfg)
  rank, targets = cfg.lora.rank, set(cfg.lora.targets) if cfg.lora.rank else set()
  return {
      "layers": cfg.num_layers * sum(i * o for i, o in shapes.values()),
      "head": cfg.hidden_size * cfg.vocab_size,
      "lora": cfg.num_layers * sum(rank * (i + o) for n, (i, o) in shapes.items() if n in targets),
  }


def train_flops_per_token(cfg: LlamaConfig, seq_len: int) -> dict[str, float]:
  """Model FLOPs of one training token in a row of ``seq_len`` (see the module docstring), and
  the hardware FLOPs the remat policy and the attention backward add by recomputing."""
  w = matmul_weights(cfg)
  dense, lora = w["layers"] + w["head"], w["lora"]
  attn = cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  forward = 2 * dense + 2 * lora + 4 * attn
  backward = 2 * dense + 4 * lora + 8 * attn
  # Recomputed in the backward pass: the attention scores always (custom VJP); with remat=dots
  # the attention forward and each adapter's x @ A (only the projections' outputs are saved);
  # with remat=full the whole layer stack's forward (the head runs in the loss, outside).
  lora_a = cfg.num_layers * sum(cfg.lora.rank * i for n, (i, _) in projections(cfg).items()
                                if cfg.lora.rank and n in cfg.lora.targets)
  recompute = 2 * attn + {"none": 0,
                          "dots": 4 * attn + 2 * lora_a,
                          "full": 2 * w["layers"] + 2 * lora + 4 * attn}[cfg.remat]
  return {"forward": float(forward), "backward": float(backward),
          "model": float(forward + backward), "recompute": float(recompute),
          "hardware": float(forward + backward + recompute)}


def token_flops(cfg: LlamaConfig, cache_len: int, *, head: bool) -> float:
  """Forward FLOPs of one token against a KV cache of ``cache_len`` slots (inference)."""
  w = matmul_weights(cfg)
  dense = w["layers"] + (w["head"] if head else 0)
  return float(2 * (dense + w["lora"])
               + 4 * cfg.num_layers * cache_len * cfg.num_heads * cfg.head_dim)


@dataclasses.dataclass(frozen=True)
class Weight:
  """One parameter array of the model, as ``nnx.eval_shape`` describes it."""

  name: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple[str | None, ...] | None
  trainable: bool              # a LoRA adapter


def model_weights(cfg: LlamaConfig) -> list[Weight]:
  """Every parameter of ``Llama(cfg)``: abstract shapes only (nothing allocated, no device)."""

  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  out = []
  for trainable, filt in ((False, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))),
                          (True, nnx.LoRAParam)):
    state = nnx.state(abstract, filt)
    for path, var in jax.tree.leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
      value = var.get_value()
      name = "/".join(str(getattr(p, "key", p)) for p in path)
      out.append(Weight(name, tuple(value.shape), str(value.dtype),
                        sharding.variable_logical_axes(var), trainable))
  return out


def param_counts(weights: Sequence[Weight]) -> dict[str, int]:
  base = sum(math.prod(w.shape) for w in weights if not w.trainable)
  lora = sum(math.prod(w.shape) for w in weights if w.trainable)
  return {"base": base, "lora": lora, "total": base + lora}


def shard_elements(weight: Weight, mesh_shape: Mapping[str, int], rules=None) -> int:
  """Elements of ``weight`` one chip holds under the logical sharding rules (an axis that does
  not divide a dimension is dropped, as ``jaxicd.sharding.fit_spec`` does)."""
  spec = sharding.logical_to_spec(weight.logical_axes, rules or sharding.DEFAULT_RULES)
  spec = sharding.fit_spec(spec, weight.shape, types.SimpleNamespace(shape=dict(mesh_shape)))
  n = math.prod(weight.shape)
  for entry in spec:
    for axis in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
      n //= mesh_shape[axis]
  return n


def weight_bytes_per_chip(weights: Sequence[Weight], mesh_shape: Mapping[str, int],
                          rules=None) -> dict[str, float]:
  """Bytes per chip of the frozen base (its storage dtype) and of the adapters (float32)."""
  out = {"base": 0.0, "lora": 0.0}
  for w in weights:
    out["lora" if w.trainable else "base"] += (shard_elements(w, mesh_shape, rules)
                                               * dtype_bytes(w.dtype))
  return out


# ----------------------------------------------------------------------------- memory


def _per_token_layer_elements(cfg: LlamaConfig, tensor: int, remat: str) -> float:
  """Activation elements one token keeps per layer for the backward pass under ``remat``
  (compute dtype; dims over heads/kv_heads/mlp split over the tensor axis)."""
  E, F = cfg.hidden_size, cfg.intermediate_size / tensor
  q, kv = cfg.num_heads * cfg.head_dim / tensor, cfg.num_kv_heads * cfg.head_dim / tensor
  carry = E                                   # the scan saves each layer's input
  if remat == "full":
    return carry
  outputs = q + 2 * kv + E + 2 * F + E        # the seven projections' outputs (remat=dots)
  if remat == "dots":
    return carry + outputs
  return carry + layer_intermediates(cfg, tensor)


def layer_intermediates(cfg: LlamaConfig, tensor: int) -> float:
  """Elements per token of everything one layer's backward reads (its full forward): norms'
  outputs, projections, RoPE'd q/k, k/v repeated to every query head, attention output and
  softmax statistics, the MLP's products and the adapters' ``x @ A``."""
  E, F = cfg.hidden_size, cfg.intermediate_size / tensor
  q, kv = cfg.num_heads * cfg.head_dim / tensor, cfg.num_kv_heads * cfg.head_dim / tensor
  repeated = 2 * q if cfg.num_heads != cfg.num_kv_heads else 0
  rank = cfg.lora.rank * len(cfg.lora.targets) if cfg.lora.rank else 0
  return (3 * E + (q + 2 * kv) + (q + kv) + repeated + 2 * q + 2 * cfg.num_heads / tensor
          + E + 4 * F + E + rank)


def train_memory(cfg: LlamaConfig, weights: Sequence[Weight], mesh_shape: Mapping[str, int], *,
                 rows_per_chip: int, global_rows: int, seq_len: int, grad_accum: int,
                 chunk_tokens: int, rules=None) -> dict[str, float]:
  """Estimated HBM bytes per chip of one training step, by item (and ``total``).

  Adapters, their gradients and Adam moments are float32; activations are in the compute
  dtype. The attention scores are materialised ([rows, heads, T, T] float32: no flash kernel),
  so the attention backward's probabilities, their gradient and the scores' gradient are live
  together; the loss computes one chunk of logits at a time against the output head gathered
  over fsdp. XLA's own temporaries and fragmentation are not modelled.
  """
  tensor = mesh_shape.get("tensor", 1)
  fsdp = mesh_shape.get("fsdp", 1)
  act = dtype_bytes(cfg.dtype)
  tokens = rows_per_chip * seq_len
  held = weight_bytes_per_chip(weights, mesh_shape, rules)
  lora_states = 4 + (1 if grad_accum > 1 else 0)      # params, grads, mu, nu (+ accumulator)
  shapes = projections(cfg)
  layer_weights = sum(i * o for i, o in shapes.values()) / tensor
  heads = cfg.num_heads / tensor
  items = {
      "base_weights": held["base"],
      "lora_params_grads_adam": held["lora"] * lora_states,
      "saved_activations": (cfg.num_layers * tokens
                            * _per_token_layer_elements(cfg, tensor, cfg.remat) * act),
      # Two layers' weights gathered over fsdp in the compute dtype (this one and the next).
      "fsdp_gathered_layers": (2 * layer_weights * act if fsdp > 1 else 0.0),
  }
  layer_backward = (2 * tokens * layer_intermediates(cfg, tensor) * act
                    + rows_per_chip * heads * seq_len * seq_len * (4 + 4 + act))
  chunk_len = max(1, min(seq_len, chunk_tokens // max(global_rows, 1)))
  chunk = chunk_len * rows_per_chip
  loss = (2 * chunk * cfg.vocab_size / tensor * 4                       # logits and their grad
          + cfg.hidden_size * cfg.vocab_size / tensor * act             # the gathered head
          + 2 * tokens * cfg.hidden_size * act)                         # hidden, d_hidden
  items["attention_and_layer_backward"] = layer_backward
  items["loss_chunk_and_head"] = loss
  items["total"] = (items["base_weights"] + items["lora_params_grads_adam"]
                    + items["saved_activations"] + items["fsdp_gathered_layers"]
                    + max(layer_backward, loss))
  return items


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True)
class InferenceSetup:
  """What the coder does with a note (``jaxicd.infer.coder``), in tokens."""

  seq_len: int
  window_overlap: int
  max_new_tokens: int
  prompt_tokens: int           # a document prompt's tokens besides the note
  shared_prefix: int           # the prompt prefix every row of a call shares (prefilled once)
  batch_size: int              # rows per document-pass call
  recode_spans: float          # evidence spans re-coded per note (0: no re-coding)
  span_prompt_tokens: float    # a re-coding prompt (span prompt, quote, separator)
  code_tokens: int             # decode steps of a re-coding call
  recode_batch_size: int


def note_windows(setup: InferenceSetup, note_tokens: int) -> list[int]:
  """Note tokens in each window: a window's prompt plus ``max_new_tokens`` fits ``seq_len``;
  consecutive windows share ``window_overlap`` tokens, at most half a window. The planner
  (``jaxicd.data.windows.inference_windows``) cuts at whitespace and accepts a window once it
  fills 95% of the budget: windows are taken to fill 97.5% of it."""
  budget = setup.seq_len - setup.max_new_tokens
  room = (budget if note_tokens + setup.prompt_tokens <= budget else int(0.975 * budget)
          ) - setup.prompt_tokens
  if room <= 0:
    raise errors.ConfigError(
        f"data.seq_len={setup.seq_len} leaves no room for a note after eval_coding."
        f"max_new_tokens={setup.max_new_tokens} and a {setup.prompt_tokens}-token prompt")
  if note_tokens <= room:
    return [note_tokens]
  overlap = min(setup.window_overlap, room // 2)
  stride = room - overlap
  count = 1 + math.ceil((note_tokens - room) / stride)
  last = note_tokens - (count - 1) * stride
  return [room] * (count - 1) + [last]


def _call_cost(cfg: LlamaConfig, acc: Accelerator, mfu: float, *, own: float, shared: int,
               rows: int, new: int, bytes_per_step: float, kv_row_bytes: float) -> dict:
  """One row of a batched generate call: prefill of its own prompt tokens (plus its share of the
  prefix), ``new`` one-token decode steps; FLOPs, chip-seconds at ``mfu`` and with each decode
  step at least as long as reading the weights and the batch's KV cache from HBM."""
  cache = shared + own + new
  prefill = (own + shared / rows) * token_flops(cfg, cache, head=False)
  decode = new * token_flops(cfg, cache, head=True)
  rate = acc.peak_tflops * 1e12 * mfu
  step_floor = (bytes_per_step + rows * kv_row_bytes * cache) / (acc.hbm_gb_per_s * GB) / rows
  per_step = token_flops(cfg, cache, head=True) / rate
  return {"prefill_flops": prefill, "decode_flops": decode,
          "seconds_at_mfu": (prefill + decode) / rate,
          "seconds_roofline": prefill / rate + new * max(per_step, step_floor)}


def note_cost(cfg: LlamaConfig, setup: InferenceSetup, note_tokens: int, acc: Accelerator,
              mfu: float, weight_bytes: float) -> dict[str, Any]:
  """FLOPs and chip-time of coding one note of ``note_tokens`` tokens: the document pass over
  its windows, then (with re-coding) one short call per evidence span."""
  act = dtype_bytes(cfg.dtype)
  kv_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * act    # bytes per cache slot
  window_tokens = note_windows(setup, note_tokens)
  parts = collections.Counter()
  own_prompt = setup.prompt_tokens - setup.shared_prefix
  for n in window_tokens:
    parts.update(_call_cost(cfg, mfu=mfu, acc=acc, own=own_prompt + n, shared=setup.shared_prefix,
                            rows=setup.batch_size, new=setup.max_new_tokens,
                            bytes_per_step=weight_bytes, kv_row_bytes=kv_row))
  recode = collections.Counter()
  if setup.recode_spans:
    one = _call_cost(cfg, mfu=mfu, acc=acc, own=setup.span_prompt_tokens - setup.shared_prefix,
                     shared=setup.shared_prefix, rows=setup.recode_batch_size,
                     new=setup.code_tokens, bytes_per_step=weight_bytes, kv_row_bytes=kv_row)
    recode.update({k: v * setup.recode_spans for k, v in one.items()})
  else:
    one = {"prefill_flops": 0.0, "decode_flops": 0.0}
  total = parts + recode
  flops = total["prefill_flops"] + total["decode_flops"]
  return {
      "note_tokens": note_tokens, "windows": len(window_tokens),
      "prefill_tokens": int(sum(window_tokens) + len(window_tokens) * setup.prompt_tokens),
      "decode_tokens": len(window_tokens) * setup.max_new_tokens,
      "recoded_spans": round(setup.recode_spans, 1),
      "flops": {"document_pass": parts["prefill_flops"] + parts["decode_flops"],
                "prefill": total["prefill_flops"], "decode": total["decode_flops"],
                "recode": recode["prefill_flops"] + recode["decode_flops"],
                "recode_per_span": one["prefill_flops"] + one["decode_flops"], "total": flops},
      "chip_seconds": {"at_mfu": total["seconds_at_mfu"], "roofline": total["seconds_roofline"]},
      "notes_per_hour_per_chip": {"at_mfu": 3600 / total["seconds_at_mfu"],
                                  "roofline": 3600 / total["seconds_roofline"]},
  }


def inference_memory(cfg: LlamaConfig, held: Mapping[str, float], *, rows_per_chip: int,
                     prompt: int, cache: int, tensor: int) -> dict[str, float]:
  """HBM per chip while coding: the weights as the mesh holds them, the KV cache of this chip's
  rows and a prefill's attention scores (float32 scores and probabilities)."""
  act = dtype_bytes(cfg.dtype)
  kv = rows_per_chip * 2 * cfg.num_layers * cache * cfg.num_kv_heads * cfg.head_dim * act / tensor
  scores = rows_per_chip * cfg.num_heads / tensor * prompt * cache * (4 + 4)
  items = {"weights": held["base"] + held["lora"], "kv_cache": kv, "prefill_scores": scores}
  items["total"] = sum(items.values())
  return items


# ----------------------------------------------------------------------------- data


def _evenly(items: Sequence[Any], n: int) -> list[Any]:
  """At most ``n`` items spread evenly over ``items`` (all of them when ``n`` <= 0)."""
  if n <= 0 or len(items) <= n:
    return list(items)
  return [items[(i * len(items)) // n] for i in range(n)]


_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def data_statistics(data_cfg: Any, tokenizer: Any, *, sample_documents: int, sample_spans: int,
                    packing_batches: int) -> dict[str, Any]:
  """Documents, windows and spans of ``config.data`` through ``jaxicd.data.pipeline``: counts are
  exact; tokens are measured on an evenly spread sample per split (and of the spans) and scaled
  to the counts. ``packing_batches`` training batches measure the non-pad fraction and each
  example kind's share of the tokens."""
  seq_len, overlap = int(data_cfg.seq_len), int(data_cfg.window_overlap)
  answer_format = data_cfg.answer_format
  named = bool(mixture.named_sources(data_cfg))
  docs = mixture.documents(data_cfg)
  splits: dict[str, Any] = {}
  stats = windows.PipelineStats()
  for split in sorted({d.split for d in docs}, key=lambda s: (_SPLIT_ORDER.get(s, 9), s)):
    group = [d for d in docs if d.split == split]
    sample = _evenly(group, sample_documents)
    n_windows = tokens = targets = note = codes = 0
    for doc in sample:
      ws = windows.document_windows(doc, tokenizer, seq_len=seq_len, window_overlap=overlap,
                                    stats=stats, answer_format=answer_format)
      n_windows += len(ws)
      tokens += sum(len(w.tokens) - 1 for w in ws)          # shifted: inputs per example
      targets += sum(int(w.loss_mask[1:].sum()) for w in ws)
      note += len(tokenizer.encode(doc.text))
      codes += len(set(doc.codes))
    scale = len(group) / max(len(sample), 1)
    splits[split] = {
        "documents": len(group), "sampled": len(sample),
        "windows": round(n_windows * scale), "tokens": round(tokens * scale),
        "target_tokens": round(targets * scale),
        "windows_per_document": n_windows / max(len(sample), 1),
        "tokens_per_window": tokens / max(n_windows, 1),
        "note_tokens_per_document": note / max(len(sample), 1),
        "codes_per_document": codes / max(len(sample), 1)}
  train_docs = [d for d in docs if d.split == "train"]
  # The spans only when the mixture trains on them (documents are read for eval and coding too).
  parts = mixture.components(data_cfg) if named else []
  if named:
    spans = [s for c in parts if c.kind == "spans" and c.weight > 0 for s in c.records]
  else:
    spans = (pipeline.load_spans(data_cfg, train_docs) if float(data_cfg.span_weight) > 0
             else [])
  sample = _evenly(spans, sample_spans)
  by_origin = collections.Counter(s.origin for s in spans)
  measured: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0])
  text_tokens = prompt_tokens = 0
  for span in sample:
    ex = windows.encode_span(tokenizer, span, seq_len, stats, answer_format=answer_format)
    m = measured[span.origin]
    m[0] += 1
    m[1] += len(ex["tokens"]) - 1
    m[2] += int(ex["loss_mask"][1:].sum())
    n_text = len(tokenizer.encode(span.text))
    text_tokens += n_text
    # A re-coding prompt: the span prompt, and evidence-first the quote and " |" after it.
    prompt_tokens += len(prompts.encode_prompt(tokenizer, span.text)) + (
        n_text + 1 if answer_format == prompts.EVIDENCE_FIRST else 0)
  overall = [sum(m[i] for m in measured.values()) for i in range(3)]
  mean_tokens = overall[1] / max(overall[0], 1)
  mean_targets = overall[2] / max(overall[0], 1)
  origins = {}
  for origin, count in sorted(by_origin.items()):
    m = measured.get(origin)
    per = (m[1] / m[0], m[2] / m[0]) if m and m[0] else (mean_tokens, mean_targets)
    origins[origin] = {"spans": count, "tokens": round(count * per[0]),
                       "target_tokens": round(count * per[1])}
  prefix = len(pipeline.span_prompt_prefix(tokenizer)) if spans else 0
  span_tokens = sum(o["tokens"] for o in origins.values())
  span_summary = {
      "spans": len(spans), "sampled": len(sample), "by_origin": origins,
      "tokens": span_tokens, "target_tokens": sum(o["target_tokens"] for o in origins.values()),
      "tokens_per_span": mean_tokens,
      "text_tokens_per_span": text_tokens / max(len(sample), 1),
      "recode_prompt_tokens": prompt_tokens / len(sample) if sample else None,
      "prompt_prefix_tokens": prefix}
  if data_cfg.share_prompt and spans:
    # One prefix per packed row instead of one per example.
    span_summary["row_tokens_shared_prompt"] = round(
        (span_tokens - len(spans) * prefix) * seq_len / (seq_len - prefix))
  if named:  # the documents the mixture trains on (fractions, weights), not every train split
    doc_epoch = sum(_document_tokens(c.records, tokenizer, data_cfg, sample_documents)
                    for c in parts if c.kind == "documents" and c.weight > 0)
  else:
    doc_epoch = (splits.get("train", {}).get("tokens", 0)
                 if float(data_cfg.doc_weight) > 0 else 0)
  epoch = {"spans": span_summary.get("row_tokens_shared_prompt", span_tokens),
           "documents": doc_epoch}
  epoch["total"] = epoch["spans"] + epoch["documents"]
  if named:
    per_source = {}
    for c in parts:
      measure = _document_tokens if c.kind == "documents" else _span_tokens
      per_source[c.name] = {
          "kind": c.kind, "weight": c.weight, "records": len(c.records),
          "tokens": measure(c.records, tokenizer, data_cfg,
                            sample_documents if c.kind == "documents" else sample_spans)}
    epoch["sources"] = per_source
  result = {"source": ("+".join(mixture.named_sources(data_cfg)) if named
                       else data_cfg.source), "code_space": data_cfg.code_space,
            "splits": splits, "spans": span_summary, "epoch_tokens": epoch,
            # What encoding the sampled documents and spans truncated or split.
            "pipeline": {k: v for k, v in stats.as_dict().items()
                         if k in ("truncated", "truncated_tokens", "split_evidence",
                                  "multi_window_documents")}}
  if packing_batches > 0:
    result["packing"] = (_packing(data_cfg, tokenizer, None, None, packing_batches) if named
                         else _packing(data_cfg, tokenizer, docs, spans, packing_batches))
  return result


def _document_tokens(documents, tokenizer, data_cfg, sample: int) -> int:
  """Tokens of one epoch of ``documents``' training windows, measured on an even sample."""
  picked = _evenly(documents, sample)
  tokens = sum(len(w.tokens) - 1 for d in picked for w in windows.document_windows(
      d, tokenizer, seq_len=int(data_cfg.seq_len), window_overlap=int(data_cfg.window_overlap),
      answer_format=data_cfg.answer_format))
  return round(tokens * len(documents) / max(len(picked), 1))


def _span_tokens(spans, tokenizer, data_cfg, sample: int) -> int:
  """Tokens of one epoch of ``spans``' examples, measured on an even sample."""
  picked = _evenly(spans, sample)
  tokens = sum(len(windows.encode_span(tokenizer, s, int(data_cfg.seq_len),
                                       answer_format=data_cfg.answer_format)["tokens"]) - 1
               for s in picked)
  return round(tokens * len(spans) / max(len(picked), 1))


def _packing(data_cfg, tokenizer, docs, spans, batches: int) -> dict[str, Any]:
  """Non-pad fraction and token shares per example kind of the first training batches."""
  it = pipeline.make_train_iterator(data_cfg, tokenizer, documents=docs, spans=spans,
                                    prefetch=0, with_sources=True)
  real = total = 0
  kinds = collections.Counter()
  per_source = collections.Counter()
  component_kinds = it.summary["source_kinds"]
  for _ in range(batches):
    batch = next(it)
    real += int((batch["segment_ids"] != 0).sum())
    total += batch["segment_ids"].size
    for name, c in pipeline.count_sources(batch, it.summary["source_ids"]).items():
      kind = component_kinds[name]
      kinds[f"{kind}_tokens"] += c["tokens"]
      kinds[f"{kind}_target_tokens"] += c["target_tokens"]
      kinds[f"{kind}_examples"] += c["examples"]
      per_source[name] += c["tokens"]
  close = getattr(it, "close", None)
  if close is not None:
    close()
  share = {n: kinds[f"{n}_tokens"] / max(real, 1) for n in ("spans", "documents")}
  return {"batches": batches, "non_pad_fraction": real / max(total, 1), "token_share": share,
          "source_token_share": {n: per_source[n] / max(real, 1) for n in component_kinds},
          "examples": {n: kinds[f"{n}_examples"] for n in ("spans", "documents")},
          "target_tokens": {n: kinds[f"{n}_target_tokens"] for n in ("spans", "documents")}}


# ----------------------------------------------------------------------------- the plan


def model_config(config) -> LlamaConfig:
  """The run's ``LlamaConfig`` from ``config.model`` and ``config.lora``: a preset's shapes,
  or read from a GGUF file's metadata or an HF directory's config.json (no weights read)."""
  mcfg = config.model
  src = weights_lib.resolve_source(mcfg.source)
  if src.kind == "preset":
    cfg = preset(src.name)
  elif src.kind == "gguf":
    cfg = weights_lib.GgufTensors(src.path).config
  else:
    path = pathlib.Path(src.path) / "config.json"
    cfg = weights_lib.config_from_hf(json.loads(path.read_text()), path)
  lora = config.lora
  overrides = dict(mcfg.overrides)
  fields = dict(dtype=mcfg.dtype or cfg.dtype, param_dtype=mcfg.param_dtype or cfg.param_dtype,
                remat=mcfg.remat or cfg.remat,
                lora=LoraConfig(rank=int(lora.rank), alpha=float(lora.alpha),
                                dropout=float(lora.dropout),
                                targets=tuple(lora.targets)))
  return cfg.replace(**{**fields, **overrides})


def _tokenizer(config):
  mcfg = config.model
  if mcfg.tokenizer:
    return load_tokenizer(mcfg.tokenizer)
  src = weights_lib.resolve_source(mcfg.source)
  if src.kind == "preset":
    raise errors.ConfigError(f"config.model.source={mcfg.source!r} has no tokenizer: set "
                             "config.model.tokenizer (e.g. 'smollm2')")
  return load_tokenizer("smollm2" if src.name.lower() in embedded.EMBEDDED_NAMES
                        else str(src.path))


def mesh_for(config, chips: int) -> dict[str, int]:
  try:
    shape = sharding.resolve_mesh_shape(dict(config.mesh), chips)
  except ValueError as e:
    raise errors.ConfigError(f"{e} (config.plan.chips={chips})") from None
  return dict(zip(sharding.MESH_AXES, shape))


def _chips(config) -> int:
  chips = int(config.plan.chips)
  if chips > 0:
    return chips
  sizes = [int(v) for v in dict(config.mesh).values()]
  return math.prod(sizes) if all(s > 0 for s in sizes) else 1


def _fit_options(cfg, weights, mesh, *, global_rows, grad_accum, seq_len, chunk_tokens,
                 hbm_bytes) -> list[dict[str, Any]]:
  """The largest rows per chip that fit HBM, per remat policy, with the grad_accum that keeps
  the same tokens per optimizer step (``data.batch_size`` is what each microbatch holds)."""
  split = mesh["data"] * mesh["fsdp"]
  rows = global_rows // split
  out = []
  for remat in dict.fromkeys((cfg.remat, "dots", "full")):
    c = cfg.replace(remat=remat)
    for r in sorted((d for d in range(1, rows + 1) if rows % d == 0), reverse=True):
      mem = train_memory(c, weights, mesh, rows_per_chip=r, global_rows=r * split,
                         seq_len=seq_len, grad_accum=grad_accum * rows // r,
                         chunk_tokens=chunk_tokens)
      if mem["total"] <= hbm_bytes:
        out.append({"remat": remat, "batch_size": r * split,
                    "grad_accum": grad_accum * rows // r, "gb_per_chip": mem["total"] / GB})
        break
  return out


def plan(config) -> dict[str, Any]:
  """The cost summary of ``config`` (see the module docstring); JSON-serialisable."""
  pcfg = config.plan
  acc = accelerator(pcfg.accelerator)
  mfu = float(pcfg.mfu)
  if not 0 < mfu <= 1:
    raise errors.ConfigError(f"config.plan.mfu={mfu}: a fraction in (0, 1]")
  chips = _chips(config)
  mesh = mesh_for(config, chips)
  data = config.data
  seq_len, rows = int(data.seq_len), int(data.batch_size)
  grad_accum = int(config.train.grad_accum)
  steps = int(config.train.steps)
  split = mesh["data"] * mesh["fsdp"]
  if rows % split:
    raise errors.ConfigError(f"data.batch_size={rows} rows do not split over data x fsdp = "
                             f"{split} chips (mesh {mesh})")
  rows_per_chip = rows // split
  cfg = model_config(config)
  weights = model_weights(cfg)
  counts = param_counts(weights)
  tokenizer = _tokenizer(config)

  stats = None
  if pcfg.data:
    stats = data_statistics(data, tokenizer,
                            sample_documents=int(pcfg.sample_documents),
                            sample_spans=int(pcfg.sample_spans),
                            packing_batches=int(pcfg.packing_batches))

  # Training: tokens, FLOPs, time.
  tokens = steps * grad_accum * rows * seq_len
  per_token = train_flops_per_token(cfg, seq_len)
  train_flops = tokens * per_token["model"]
  evals = 0
  eval_every, eval_batches = int(config.train.eval_every), int(config.train.eval_batches)
  if eval_every:
    evals += (steps - 1) // eval_every
  if eval_every or eval_batches:
    evals += 1                                  # after the last step
  evals += int(bool(config.train.eval_at_start))
  eval_tokens = evals * eval_batches * rows * seq_len
  eval_flops = eval_tokens * per_token["forward"]
  rate = acc.peak_tflops * 1e12 * mfu * chips
  training = {
      "steps": steps, "global_batch_rows": rows, "grad_accum": grad_accum, "seq_len": seq_len,
      "tokens": tokens, "flops_per_token": per_token, "flops": train_flops,
      "hardware_flops": tokens * per_token["hardware"],
      "eval_passes": evals, "eval_tokens": eval_tokens, "eval_flops": eval_flops,
      "tokens_per_s": rate / per_token["model"],
      "tokens_per_s_per_chip": rate / per_token["model"] / chips,
      "hours": (train_flops + eval_flops) / rate / 3600,
  }
  training["chip_hours"] = training["hours"] * chips
  if stats and "packing" in stats:
    pk = stats["packing"]
    real = tokens * pk["non_pad_fraction"]
    training["non_pad_tokens"] = real
    training["tokens_by_kind"] = {k: real * s for k, s in pk["token_share"].items()}
    training["epochs"] = {k: (real * pk["token_share"][k] / stats["epoch_tokens"][k]
                              if stats["epoch_tokens"][k] else None)
                          for k in ("spans", "documents")}
    for name, src in stats["epoch_tokens"].get("sources", {}).items():
      src["trained_tokens"] = real * pk["source_token_share"][name]
      src["epochs"] = src["trained_tokens"] / src["tokens"] if src["tokens"] else None

  # Memory per chip.
  hbm = acc.hbm_gb * GB
  memory = train_memory(cfg, weights, mesh, rows_per_chip=rows_per_chip, global_rows=rows,
                        seq_len=seq_len, grad_accum=grad_accum, chunk_tokens=DEFAULT_CHUNK_TOKENS)
  memory_gb = {k: v / GB for k, v in memory.items()}
  memory_summary = {
      "rows_per_chip": rows_per_chip, "gb": memory_gb, "hbm_gb": acc.hbm_gb,
      "fits": memory["total"] <= hbm,
      "fit_options": _fit_options(cfg, weights, mesh, global_rows=rows, grad_accum=grad_accum,
                                  seq_len=seq_len, chunk_tokens=DEFAULT_CHUNK_TOKENS,
                                  hbm_bytes=hbm)}

  inference = _inference(config, cfg, weights, mesh, tokenizer, stats, acc, mfu)
  if evals and int(config.eval_coding.documents) and inference.get("eval_note"):
    n = evals + int(bool(config.eval_coding.at_start))
    coding = n * int(config.eval_coding.documents) * inference["eval_note"]["flops"]["total"]
    training["eval_coding_flops"] = coding
    training["hours"] += coding / rate / 3600
    training["chip_hours"] = training["hours"] * chips

  return {
      "accelerator": {"name": acc.name, "slice": acc.slice_name(chips), "chips": chips,
                      "peak_tflops_per_chip": acc.peak_tflops, "hbm_gb_per_chip": acc.hbm_gb,
                      "hbm_gb_per_s": acc.hbm_gb_per_s, "mfu": mfu, "mesh": mesh},
      "model": {"source": str(config.model.source), "layers": cfg.num_layers,
                "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "params": counts,
                "matmul_weights": matmul_weights(cfg), "lora_rank": cfg.lora.rank,
                "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat},
      "data": stats, "training": training, "memory": memory_summary, "inference": inference,
  }


def _recoded_spans(config, evaluated: Mapping[str, Any] | None) -> float:
  """Evidence spans the coder re-codes per note: one per answer line, taken as the codes per
  document of the evaluated split (``plan.codes_per_note`` when set or without data)."""
  given = float(config.plan.codes_per_note)
  if given >= 0:
    return given
  if evaluated is None:
    raise errors.ConfigError("config.plan.codes_per_note: give the codes per note (the spans "
                             "re-coded per note) when plan.data=False")
  return float(evaluated["codes_per_document"])


def _inference(config, cfg, weights, mesh, tokenizer, stats, acc, mfu) -> dict[str, Any]:
  ec, data = config.eval_coding, config.data
  answer_format = data.answer_format
  probe = prompts.encode_prompt_with_note(tokenizer, "Patient with chest pain.")
  prompt_tokens = len(probe.tokens) - (probe.note_hi - probe.note_lo)
  prefix = len(pipeline.span_prompt_prefix(tokenizer))
  codes = demo.code_space(data.code_space)
  code_tokens = 1 + max(len(prompts.code_token_ids(tokenizer, c, answer_format)) for c in codes)
  recode = bool(ec.recode)
  span_stats = (stats or {}).get("spans", {})
  split_stats = (stats or {}).get("splits", {})
  evaluated = next((split_stats[s] for s in ("test", "val", "train") if s in split_stats), None)
  setup = InferenceSetup(
      seq_len=int(data.seq_len), window_overlap=int(data.window_overlap),
      max_new_tokens=int(ec.max_new_tokens), prompt_tokens=prompt_tokens, shared_prefix=prefix,
      batch_size=int(ec.batch_size),
      recode_spans=_recoded_spans(config, evaluated) if recode else 0.0,
      # Without measured spans: the prompt around a short span, its quote and the separator.
      span_prompt_tokens=span_stats.get("recode_prompt_tokens") or prompt_tokens + 8.0,
      code_tokens=code_tokens, recode_batch_size=int(ec.recode_batch_size))
  held = weight_bytes_per_chip(weights, mesh)
  whole = weight_bytes_per_chip(weights, {"data": 1, "fsdp": 1, "tensor": 1})
  notes = list(config.plan.note_tokens or ())
  if not notes and evaluated:
    notes = [round(evaluated["note_tokens_per_document"])]
  if not notes:
    raise errors.ConfigError("config.plan.note_tokens: give note lengths in tokens, e.g. "
                             "'(1500, 5000)' (plan.data=False reads no notes to measure)")
  cost = lambda n: note_cost(cfg, setup, int(n), acc, mfu, whole["base"] + whole["lora"])  # noqa: E731
  split = mesh["data"] * mesh["fsdp"]
  cache = setup.seq_len + setup.shared_prefix
  out = {"setup": dataclasses.asdict(setup), "notes": [cost(n) for n in notes],
         "memory_gb": {k: v / GB for k, v in inference_memory(
             cfg, held, rows_per_chip=-(-setup.batch_size // split),
             prompt=setup.seq_len - setup.max_new_tokens, cache=cache,
             tensor=mesh["tensor"]).items()}}
  val = split_stats.get("val")
  if val:
    out["eval_note"] = cost(round(val["note_tokens_per_document"]))
  return out


# ----------------------------------------------------------------------------- the mode


def _si(x: float) -> str:
  for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def describe(summary: Mapping[str, Any]) -> list[str]:
  """The plan as a few readable lines."""
  a, m, t = summary["accelerator"], summary["model"], summary["training"]
  mem, inf, d = summary["memory"], summary["inference"], summary["data"]
  lines = [
      f"plan: {a['slice']} ({a['chips']} x {a['name']}: {a['peak_tflops_per_chip']:g} TFLOP/s "
      f"bf16, {a['hbm_gb_per_chip']:g} GB HBM per chip), mesh {a['mesh']}, MFU {a['mfu']:.0%}",
      f"model: {m['source']}: {_si(m['params']['base'])} base params + {_si(m['params']['lora'])} "
      f"LoRA (r{m['lora_rank']}), {m['param_dtype']} base, {m['dtype']} compute, "
      f"remat {m['remat']}"]
  if d:
    for name, s in d["splits"].items():
      lines.append(f"data {d['source']} {name}: {s['documents']:,} documents -> {s['windows']:,} "
                   f"windows, {_si(s['tokens'])} tokens ({s['note_tokens_per_document']:.0f} "
                   f"note tokens per document; {s['sampled']} encoded)")
    sp = d["spans"]
    origins = ", ".join(f"{k} {v['spans']:,}" for k, v in sp["by_origin"].items())
    lines.append(f"data spans: {sp['spans']:,} ({origins}) -> {_si(sp['tokens'])} tokens; "
                 f"epoch: {_si(d['epoch_tokens']['spans'])} span + "
                 f"{_si(d['epoch_tokens']['documents'])} document tokens")
    for name, src in d["epoch_tokens"].get("sources", {}).items():
      trained = (f"; this run trains {_si(src['trained_tokens'])} of them "
                 f"({src['epochs']:.2f} epochs)" if src.get("epochs") is not None else "")
      lines.append(f"source {name} ({src['kind']}, weight {src['weight']:g}): "
                   f"{src['records']:,} records, {_si(src['tokens'])} tokens per epoch{trained}")
  run = (f"run: {t['steps']:,} steps x {t['grad_accum']} x {t['global_batch_rows']} rows x "
         f"{t['seq_len']} = {_si(t['tokens'])} tokens")
  if "non_pad_tokens" in t:
    share = d["packing"]["token_share"]
    run += (f" ({d['packing']['non_pad_fraction']:.1%} non-pad: spans {share['spans']:.0%}, "
            f"documents {share['documents']:.0%}; epochs: spans "
            f"{t['epochs']['spans'] or 0:.2f}, documents {t['epochs']['documents'] or 0:.2f})")
  lines += [run,
            f"compute: {_si(t['flops_per_token']['model'])}FLOP per token -> {_si(t['flops'])}FLOP "
            f"(+ eval {_si(t['eval_flops'] + t.get('eval_coding_flops', 0))}); "
            f"{_si(t['tokens_per_s'])} tokens/s; {t['hours']:.3g} h, {t['chip_hours']:.3g} "
            f"chip-hours"]
  gb = mem["gb"]
  lines.append(
      f"HBM per chip ({mem['rows_per_chip']} rows): base {gb['base_weights']:.2f} GB, LoRA+Adam "
      f"{gb['lora_params_grads_adam']:.2f}, saved activations {gb['saved_activations']:.2f}, "
      f"attention/layer backward {gb['attention_and_layer_backward']:.2f}, loss chunk+head "
      f"{gb['loss_chunk_and_head']:.2f}, fsdp gather {gb['fsdp_gathered_layers']:.2f}: total "
      f"{gb['total']:.2f} of {mem['hbm_gb']:g} GB -> {'fits' if mem['fits'] else 'DOES NOT FIT'}")
  if not mem["fits"]:
    options = "; ".join(f"remat={o['remat']} batch_size={o['batch_size']} grad_accum="
                        f"{o['grad_accum']} ({o['gb_per_chip']:.1f} GB)" for o in mem["fit_options"])
    lines.append(f"  fits with: {options or 'nothing tried fits (more chips or tensor>1)'}")
  for n in inf["notes"]:
    lines.append(
        f"coding a {n['note_tokens']:,}-token note: {n['windows']} window(s), {n['recoded_spans']} "
        f"spans re-coded, {_si(n['flops']['total'])}FLOP -> "
        f"{n['notes_per_hour_per_chip']['at_mfu']:,.0f} notes/h per chip at MFU "
        f"({n['notes_per_hour_per_chip']['roofline']:,.0f} with decode bound by HBM bandwidth)")
  lines.append(f"inference HBM per chip: {inf['memory_gb']['total']:.2f} GB")
  return lines


def run_plan(config) -> dict[str, Any]:
  """``--config.mode=plan``: prints the plan and returns it. Pins JAX to the CPU first (when no
  backend has started), so planning never claims an accelerator."""
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")
  summary = plan(config)
  for line in describe(summary):
    print(line, flush=True)
  return summary
