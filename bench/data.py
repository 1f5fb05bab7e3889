"""Input pipeline benchmark: packing efficiency, throughput, training tokens per epoch.

    .venv/bin/python bench/data.py [--seq_len=1024] [--batch_size=8] [--train_tokens_per_s=150]
        [--train_steps=32] [--train_config=configs/mixed.py]
        [--train_seq_len=0] [--platform=cpu|gpu|tpu]

Prints a short human summary on stderr, then one JSON line with every figure:

* ``packing``: non-pad token fraction of packed batches for the span-only mix (target >=
  97%), the mixed recipe and document-only training.
* ``throughput``: examples/s and tokens/s of the mixed training iterator on a cold cache
  (first epoch: every example tokenized) and a warm one, against ``--train_tokens_per_s``
  (what one training process consumes; default 150 tokens/s, transformers+PEFT LoRA on
  SmolLM2-135M measured on a 2-core CPU). Target: >= 10x.
* ``shared_prompt``: the same packing with ``data.share_prompt`` (one prompt prefix per span
  row): row tokens each span example costs, before and after (target: at most half).
* ``epoch_tokens``: training tokens per epoch of the demo corpus, document-only vs the mixed
  recipe (the paper's claim that code-centric training costs ~20% of document training).
* ``train_wall_time``: the mixed recipe of ``--train_config`` (default ``configs/mixed.py``: its
  model, adapters, rows and mixture) trained for real with and without ``data.share_prompt``:
  ``--train_steps`` jitted steps on each layout's batches, alternated; examples per wall
  second and the wall time the unshared run's examples take with the shared prompt (target: at
  most half), each step's time charged to spans and documents by their tokens.
  ``--train_steps=0`` skips.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import _config
import _platform

from jaxicd.data import pipeline, windows
from jaxicd.train.config import base_config


def _cfg(args, **overrides):
  cfg = base_config().data
  cfg.update(source="demo", demo_seed=args.demo_seed, code_space="demo",
             spans_per_code=args.spans_per_code, negatives=True, annotated_spans=True,
             span_weight=0.8, doc_weight=0.2, seq_len=args.seq_len, window_overlap=128,
             batch_size=args.batch_size, shuffle_seed=0, num_threads=args.num_threads,
             answer_format="code_first")  # the figures in docs/benchmarks.md are code-first
  cfg.update(overrides)
  return cfg


def packing_efficiency(cfg, tok, docs, spans, batches: int) -> dict:
  """Non-pad fraction and examples per row; with ``sources``, the padded row tokens each span
  example costs (its share of the span rows or of the mixed rows it sits in)."""
  it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans, prefetch=0,
                                    with_sources=True)
  real = total = segs = span_examples = span_slots = 0
  for _ in range(batches):
    b = next(it)
    real += int((b["segment_ids"] != 0).sum())
    total += b["segment_ids"].size
    counts = pipeline.count_sources(b)
    segs += sum(c["examples"] for c in counts.values())
    span_examples += counts["spans"]["examples"]
    # Row slots (padding included) charged to spans: their tokens plus their rows' padding
    # in proportion (the shared prefix is a span token).
    for r in range(b["segment_ids"].shape[0]):
      src, seg = b["sources"][r], b["segment_ids"][r]
      n_span, n_real = int((src == 1).sum()), int((seg != 0).sum())
      span_slots += n_span * len(seg) / max(n_real, 1)
  return {"non_pad_fraction": round(real / total, 4), "batches": batches,
          "examples_per_row": round(segs / (batches * b["segment_ids"].shape[0]), 2),
          "row_tokens_per_span_example": (round(span_slots / span_examples, 1)
                                          if span_examples else None),
          "truncated": it.stats.truncated, "unshared_spans": it.stats.unshared_spans}


def throughput(cfg, tok, docs, spans, seconds: float, train_tokens_per_s: float) -> dict:
  """Cold: from a fresh iterator until every training document was encoded once (every
  example tokenized; spans too, at these sizes). Warm: ``seconds`` after that (cache hits)."""
  out = {}
  n_train = sum(d.split == "train" for d in docs)
  it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans)
  for phase in ("cold", "warm"):
    examples = tokens = slots = 0
    t0 = time.perf_counter()
    while True:
      elapsed = time.perf_counter() - t0
      if phase == "cold" and (it.stats.documents_encoded >= n_train or elapsed > 600):
        break
      if phase == "warm" and elapsed > seconds:
        break
      b = next(it)
      seg = b["segment_ids"]
      examples += int(((b["positions"] == 0) & (seg > 0)).sum())
      tokens += int((seg > 0).sum())
      slots += seg.size
    dt = time.perf_counter() - t0
    out[phase] = {"seconds": round(dt, 1), "examples_per_s": round(examples / dt, 1),
                  "tokens_per_s": round(tokens / dt, 1),
                  "padded_tokens_per_s": round(slots / dt, 1),
                  "ratio_to_train_step": round(slots / dt / train_tokens_per_s, 1)}
  it.close()
  out["train_tokens_per_s_assumed"] = train_tokens_per_s
  out["target_ratio"] = 10
  out["stats"] = it.stats.as_dict()
  # Encoding cost alone (one thread, no cache): what the cold phase pays per record.
  t0 = time.perf_counter()
  for d in docs[:20]:
    windows.document_windows(d, tok, seq_len=cfg["seq_len"], window_overlap=cfg["window_overlap"])
  out["ms_per_document"] = round((time.perf_counter() - t0) / min(20, len(docs)) * 1e3, 1)
  t0 = time.perf_counter()
  for s in spans[:500]:
    windows.encode_span(tok, s, cfg["seq_len"])
  out["us_per_span"] = round((time.perf_counter() - t0) / min(500, len(spans)) * 1e6)
  return out


def epoch_tokens(cfg, tok, docs, spans) -> dict:
  """Tokens needed to see every training document window once, per recipe."""
  seq_len, overlap = cfg["seq_len"], cfg["window_overlap"]
  doc_ex = [w for d in docs if d.split == "train"
            for w in windows.document_windows(d, tok, seq_len=seq_len, window_overlap=overlap)]
  span_ex = [windows.encode_span(tok, s, seq_len) for s in spans]
  doc_tokens = sum(len(w.tokens) - 1 for w in doc_ex)
  doc_targets = sum(int(w.loss_mask[1:].sum()) for w in doc_ex)
  mean_span = float(np.mean([len(e["tokens"]) - 1 for e in span_ex]))
  mean_span_target = float(np.mean([e["loss_mask"][1:].sum() for e in span_ex]))
  mean_doc = doc_tokens / len(doc_ex)
  sw, dw = cfg["span_weight"], cfg["doc_weight"]
  # Mixed recipe, same number of examples as one document epoch: 80% of them are spans.
  mixed_same_examples = len(doc_ex) * (sw * mean_span + dw * mean_doc)
  # Mixed recipe seeing every span once (the code-centric epoch): docs fill 20% of examples.
  span_epoch_examples = len(span_ex) / sw
  span_epoch_tokens = span_epoch_examples * (sw * mean_span + dw * mean_doc)
  # Mixed recipe that still sees every document window once (docs are 20% of examples).
  doc_epoch_mixed = len(doc_ex) * (1 + sw / dw * mean_span / mean_doc) * mean_doc
  return {
      "train_documents": sum(d.split == "train" for d in docs),
      "document_windows": len(doc_ex), "spans": len(span_ex),
      "mean_doc_example_tokens": round(mean_doc, 1),
      "mean_span_example_tokens": round(mean_span, 1),
      "mean_span_target_tokens": round(mean_span_target, 1),
      "doc_only_epoch_tokens": doc_tokens, "doc_only_epoch_target_tokens": doc_targets,
      "mixed_same_examples_tokens": round(mixed_same_examples),
      "mixed_same_examples_vs_doc_only": round(mixed_same_examples / doc_tokens, 3),
      "mixed_one_span_epoch_tokens": round(span_epoch_tokens),
      "mixed_one_span_epoch_vs_doc_only": round(span_epoch_tokens / doc_tokens, 3),
      "mixed_one_doc_epoch_tokens": round(doc_epoch_mixed),
      "mixed_one_doc_epoch_vs_doc_only": round(doc_epoch_mixed / doc_tokens, 3),
  }


def train_wall_time(steps: int, config: str = "configs/mixed.py", seq_len: int = 0) -> dict:
  """Wall time of real training steps on the mixed recipe of `config` (a path under the
  repository; rows of `seq_len` tokens instead of its own if given), unshared vs shared prompt.
  Both layouts have the same batch shapes, so one compiled step serves both; each layout's
  examples (spans and document windows) are counted in the batches it trained on."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxicd import sharding as shd  # pylint: disable=g-import-not-at-top
  from jaxicd.train import trainer  # pylint: disable=g-import-not-at-top
  cfg = _config.load_config(config)
  if seq_len:
    cfg.data.seq_len = seq_len
  mesh = shd.make_mesh(dict(data=1), jax.devices()[:1])
  parts, tok = trainer.load_model_parts(cfg, mesh)
  docs = pipeline.load_documents(cfg.data)
  spans = pipeline.load_spans(cfg.data, [d for d in docs if d.split == "train"])
  fns = trainer.StepFunctions(parts, trainer.build_optimizer(cfg.train), mesh)
  state = dict(params=fns.place_params(parts.params), rest=fns.place_rest(parts.rest))
  state["opt_state"] = fns.init_opt_state(state["params"])
  base = fns.place_base(parts.base)

  def step(batch) -> float:
    placed = fns.place_batch(batch)
    t = time.perf_counter()
    state["params"], state["opt_state"], state["rest"], m = fns.train_step(
        state["params"], state["opt_state"], base, state["rest"], placed)
    float(m["loss"])  # blocks
    return time.perf_counter() - t

  layouts = {}
  for name, share in (("unshared", False), ("shared", True)):
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.share_prompt = share
    layouts[name] = pipeline.make_train_iterator(data_cfg, tok, documents=docs, spans=spans,
                                                 with_sources=True, prefetch=0)
  t = time.perf_counter()
  step(next(layouts["unshared"]))  # compiles
  compile_s = time.perf_counter() - t
  seconds = {name: [] for name in layouts}
  examples = {name: {"spans": 0, "documents": 0} for name in layouts}
  charged = {name: {"spans": 0.0, "documents": 0.0} for name in layouts}  # step seconds by kind
  for _ in range(steps):
    for name, it in layouts.items():
      batch = next(it)
      seconds[name].append(step(batch))
      counts = pipeline.count_sources(batch)
      real = sum(c["tokens"] for c in counts.values())
      for source, c in counts.items():
        examples[name][source] += c["examples"]
        charged[name][source] += seconds[name][-1] * c["tokens"] / max(real, 1)
  out = {"config": config, "rows": int(cfg.data.batch_size),
         "seq_len": int(cfg.data.seq_len), "steps": steps, "compile_s": round(compile_s, 1)}
  # Seconds per example of each kind, a step's time charged to the kinds by their share of its
  # tokens. Document windows share no prompt and pack alike in both layouts: their cost is
  # pooled.
  cost = {name: {k: charged[name][k] / examples[name][k] for k in examples[name]
                 if examples[name][k]} for name in layouts}
  docs_cost = (sum(charged[n]["documents"] for n in layouts)
               / max(sum(examples[n]["documents"] for n in layouts), 1))
  for name in layouts:
    total = sum(examples[name].values())
    out[name] = {"examples": examples[name], "examples_per_step": round(total / steps, 2),
                 "median_step_s": round(statistics.median(seconds[name]), 3),
                 "examples_per_s": round(total / sum(seconds[name]), 2),
                 "seconds_per_example": {k: round(v, 4) for k, v in cost[name].items()}}
  out["seconds_per_document_example_pooled"] = round(docs_cost, 4)
  # The unshared run's examples (its mix of spans and documents) at each layout's costs.
  same = {name: examples["unshared"]["spans"] * cost[name]["spans"]
          + examples["unshared"]["documents"] * docs_cost for name in layouts}
  out["span_example_wall_time_ratio"] = round(
      cost["shared"]["spans"] / cost["unshared"]["spans"], 3)
  out["same_examples_wall_time_ratio"] = round(same["shared"] / same["unshared"], 3)
  out["target_wall_time_ratio"] = 0.5
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--demo_seed", type=int, default=0)
  p.add_argument("--spans_per_code", type=int, default=8)
  p.add_argument("--num_threads", type=int, default=2)
  p.add_argument("--packing_batches", type=int, default=60)
  p.add_argument("--seconds", type=float, default=8.0, help="per throughput phase")
  p.add_argument("--train_tokens_per_s", type=float, default=150.0,
                 help="training-step consumption (padded tokens/s) to compare against")
  p.add_argument("--tokenizer", default="smollm2")
  p.add_argument("--train_steps", type=int, default=32,
                 help="real training steps per layout for train_wall_time (0: skip)")
  p.add_argument("--train_config", default="configs/mixed.py",
                 help="the recipe train_wall_time trains (its model, rows and mixture)")
  p.add_argument("--train_seq_len", type=int, default=0,
                 help="train_wall_time's row length (0: the recipe's own)")
  _platform.add_flag(p)
  args = p.parse_args(argv)
  _platform.use(args.platform)

  from jaxicd.model.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  tok = load_tokenizer(args.tokenizer)
  cfg = _cfg(args)
  docs = pipeline.load_documents(cfg)
  spans = pipeline.load_spans(cfg, [d for d in docs if d.split == "train"])
  load_s = time.perf_counter() - t0

  result = {"config": {k: cfg[k] for k in ("seq_len", "batch_size", "span_weight",
                                           "doc_weight", "spans_per_code", "num_threads")},
            "load_seconds": round(load_s, 1)}
  result["packing"] = {
      "span_only": packing_efficiency(_cfg(args, span_weight=1.0, doc_weight=0.0), tok, docs,
                                      spans, args.packing_batches),
      "mixed": packing_efficiency(cfg, tok, docs, spans, args.packing_batches),
      "doc_only": packing_efficiency(_cfg(args, span_weight=0.0, doc_weight=1.0), tok, docs,
                                     spans, max(10, args.packing_batches // 3)),
  }
  # Shared-prompt packing: one prompt prefix per span row instead of one per span example.
  shared = {name: packing_efficiency(_cfg(args, share_prompt=True, **w), tok, docs, spans,
                                     args.packing_batches)
            for name, w in (("span_only", dict(span_weight=1.0, doc_weight=0.0)),
                            ("mixed", {}))}
  result["shared_prompt"] = {
      "prompt_prefix_tokens": len(pipeline.span_prompt_prefix(tok)),
      "packing": shared,
      # Span examples one training step of `train_tokens_per_s` row tokens learns from.
      "span_examples_per_s_at_train_rate": {
          layout: round(args.train_tokens_per_s / pk["row_tokens_per_span_example"], 2)
          for layout, pk in (("unshared", result["packing"]["span_only"]),
                             ("shared", shared["span_only"]))},
      "span_example_cost_ratio": round(
          shared["span_only"]["row_tokens_per_span_example"]
          / result["packing"]["span_only"]["row_tokens_per_span_example"], 3),
      "target_cost_ratio": 0.5}
  result["epoch_tokens"] = epoch_tokens(cfg, tok, docs, spans)
  result["throughput"] = throughput(cfg, tok, docs, spans, args.seconds,
                                    args.train_tokens_per_s)
  if args.train_steps:
    result["train_wall_time"] = train_wall_time(args.train_steps, args.train_config,
                                                args.train_seq_len)
  pk, th, ep = result["packing"], result["throughput"], result["epoch_tokens"]
  print(f"packing non-pad: spans {pk['span_only']['non_pad_fraction']:.1%} (target 97%), "
        f"mixed {pk['mixed']['non_pad_fraction']:.1%}, docs {pk['doc_only']['non_pad_fraction']:.1%}"
        f"\nthroughput: cold {th['cold']['padded_tokens_per_s']:.0f} tok/s "
        f"({th['cold']['ratio_to_train_step']}x), warm {th['warm']['padded_tokens_per_s']:.0f} "
        f"tok/s ({th['warm']['ratio_to_train_step']}x) vs {args.train_tokens_per_s} tok/s "
        f"train step\nepoch tokens: mixed (same examples) / doc-only = "
        f"{ep['mixed_same_examples_vs_doc_only']:.2f}", file=sys.stderr, flush=True)
  result["targets"] = {
      "span_packing_non_pad >= 0.97": pk["span_only"]["non_pad_fraction"] >= 0.97,
      "shared_prompt_span_example_cost_ratio <= 0.5":
          result["shared_prompt"]["span_example_cost_ratio"] <= 0.5,
      "warm_throughput >= 10x train step": th["warm"]["ratio_to_train_step"] >= th["target_ratio"]}
  if args.train_steps:
    wall = result["train_wall_time"]
    result["targets"]["mixed_same_examples_wall_time_ratio <= 0.5"] = (
        wall["same_examples_wall_time_ratio"] <= wall["target_wall_time_ratio"])
  result["targets_met"] = all(result["targets"].values())
  print(json.dumps(result), flush=True)  # last: one line with every figure and each target
  return result


if __name__ == "__main__":
  main()
