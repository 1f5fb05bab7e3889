"""Benchmark: greedy decode tokens/s of jaxicd's generate vs transformers' generate (SmolLM2).

Same weights (the embedded GGUF, copied into transformers' PyTorch Llama), per dtype (float32 and
bfloat16: both frameworks in that dtype), prompts of `--prompt` tokens, exactly `--new` new tokens
(no stop token), batches 1 and 8, in one process; warm-up calls (jit compilation) are excluded
and calls alternate between the contestants (shared machine). jaxicd runs twice: free, and with
the answer grammar the coder decodes with (evidence-first lines over all billable ICD-10-CM codes,
quotes copied from the prompt's note), the run the target is on: >= 3x transformers at batch 1
and 8 in each dtype. Also reports the code trie's cost and the unique-codes rule's. Times are best
of `--iters` calls. Prints one JSON object per line, the last with every figure and each target.

Where the constrained run's time goes: the prefill (a call with one new token), each further
decode step, and host work (the call's wall time outside the jitted function). What bounds a
decode step: it reads every weight and the batch's KV cache, so with the memory read bandwidth
measured in the same run (a jitted sum over 512 MB) a step cannot take less than
bytes / bandwidth ("roofline_tokens_per_s"); "roofline_over_torch" says how far above
transformers that bound lies, so whether 3x fits under it.

  .venv/bin/python bench/decode.py [--dtypes=float32,bfloat16] [--batches=1,8] [--prompt=256]
      [--new=64] [--iters=2] [--skip_torch] [--platform=cpu|gpu|tpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import resource

import numpy as np

import _platform
import _timing


TARGET_RATIO = 3.0  # constrained jaxicd decode over transformers generate, same dtype and batch


def _forward_bench():
  """bench/forward.py, for its weight copy into transformers (not a package: load by path)."""
  path = pathlib.Path(__file__).with_name("forward.py")
  spec = importlib.util.spec_from_file_location("bench_forward", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def memory_read_gb_per_s(fwd, mb: int = 512, reps: int = 5) -> float:
  """Best-of-``reps`` read bandwidth of a jitted sum over an ``mb``-MB float32 array."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  seconds = fwd._time_interleaved([lambda: total(x).block_until_ready()], reps)[0]  # pylint: disable=protected-access
  return x.nbytes / min(seconds) / 1e9


def time_split(gen, call, iters: int) -> dict[str, float]:
  """`_timing.generate_split` of the fastest of `iters` calls of ``call()`` (compiled first)."""
  call()
  best = None
  for _ in range(iters):
    with _timing.generate_split(gen) as split:
      call()
    if best is None or split["wall"] < best["wall"]:
      best = split
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--torch_threads", type=int, default=min(2, os.cpu_count() or 1))
  parser.add_argument("--constrained", default="all",
                      help="code space for the constrained run ('' to skip)")
  parser.add_argument("--skip_torch", action="store_true",
                      help="jaxicd only (no transformers comparison)")
  _platform.add_flag(parser)
  args = parser.parse_args()
  _platform.use(args.platform)

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxicd.data import prompts
  from jaxicd.data.demo import code_space
  from jaxicd.infer import generate as gen
  from jaxicd.infer import grammar
  from jaxicd.model import tokenizer as tokenizer_lib
  from jaxicd.model import weights
  fwd = _forward_bench()
  tok = tokenizer_lib.load_tokenizer("smollm2")
  # Real prompt tokens: a chat prompt around a repeated clinical sentence, cut to length; rows
  # differ by a rotation. The note's tokens (what an evidence-first quote copies) are taken to
  # run to the cut.
  text = "Patient admitted with acute on chronic systolic heart failure and AKI. " * 64
  encoded = prompts.encode_prompt_with_note(tok, text)
  base = encoded.tokens[:args.prompt]
  note_range = (min(encoded.note_lo, len(base) - 1), len(base))
  codes = code_space(args.constrained) if args.constrained else ()
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  constraint = (grammar.build_constraint(tok, codes, answer_format=prompts.EVIDENCE_FIRST)
                if codes else None)
  rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if not args.skip_torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.torch_threads)

  figures = []  # every line printed, repeated in the last one
  bandwidth = memory_read_gb_per_s(fwd)
  print(json.dumps({"bench": "memory_read", "gb_per_s": round(bandwidth, 1)}), flush=True)

  def decode(model, rows, c=None):
    return gen.generate(model, rows, max_new_tokens=args.new, stop_ids=[], pad_id=tok.pad_id,
                        bucket=64, constraint=c,
                        note_ranges=[note_range] * len(rows) if c is not None else None)

  for dtype in args.dtypes.split(","):
    model = weights.build_model("smollm2", dtype=dtype, param_dtype=dtype)
    cfg = model.cfg
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not args.skip_torch:
      hf = fwd._torch_model(model).to(getattr(torch, dtype))  # pylint: disable=protected-access
    for batch in [int(b) for b in args.batches.split(",")]:
      rows = [np.roll(base, i).astype(np.int32) for i in range(batch)]

      def run_jax(c=None, rows=rows):
        return decode(model, rows, c)

      contestants = {"jaxicd": run_jax}
      if constraint is not None:
        contestants["jaxicd_constrained"] = lambda: run_jax(constraint)
      if not args.skip_torch:
        ids = torch.from_numpy(np.stack(rows)).long()

        def run_torch(ids=ids):
          with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False, pad_token_id=tok.pad_id)

        contestants["torch"] = run_torch
      best = dict(zip(contestants, map(min, fwd._time_interleaved(  # pylint: disable=protected-access
          list(contestants.values()), args.iters))))
      n = batch * args.new
      fig = {"bench": "decode", "dtype": dtype, "batch": batch, "prompt_tokens": len(base),
             "new_tokens": args.new, "torch_threads": args.torch_threads,
             "cpu_count": os.cpu_count()}
      fig.update({f"{name}_tokens_per_s": round(n / s, 1) for name, s in best.items()})
      # The roofline: every step reads all weights (the tied embedding is the output head) and
      # the batch's whole cache (its slots: prompt bucket + new tokens rounded up by
      # `slot_count`; masked, not skipped).
      cache_len = gen.slot_count(gen.bucket_length(len(base), 64) + args.new, 64)
      cache_bytes = (batch * cache_len * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
                     * np.dtype(dtype).itemsize)
      roofline = batch * bandwidth * 1e9 / (weight_bytes + cache_bytes)
      fig.update(weights_mb=round(weight_bytes / 1e6, 1), kv_cache_mb=round(cache_bytes / 1e6, 1),
                 roofline_tokens_per_s=round(roofline, 1))
      if "jaxicd_constrained" in best:
        fig["constrained_share_of_roofline"] = round(n / best["jaxicd_constrained"] / roofline, 3)
        full = time_split(gen, lambda: run_jax(constraint), args.iters)
        step_s = full["decode"] / max(full["decode_steps"], 1)
        fig["time_split_ms"] = {"prefill": round(full["prefill"] * 1e3, 1),
                                "per_decode_step": round(step_s * 1e3, 2),
                                "decode_steps": round(full["decode"] * 1e3, 1),
                                "host": round(full["host"] * 1e3, 1),
                                "call": round(full["wall"] * 1e3, 1)}
      if "torch" in best:
        fig["torch_share_of_roofline"] = round(n / best["torch"] / roofline, 3)
        fig["roofline_over_torch"] = round(roofline * best["torch"] / n, 2)
        ours = run_jax().tokens
        theirs = run_torch()[:, len(base):].float().numpy()
        fig["greedy_prefix_agreement_tokens"] = float(np.mean(
            [np.argmax(np.append(a != b, True)) for a, b in zip(ours, theirs)]))
        fig["ratio"] = round(best["torch"] / best["jaxicd"], 3)
        if "jaxicd_constrained" in best:
          ratio = best["torch"] / best["jaxicd_constrained"]
          fig.update(constrained_ratio=round(ratio, 3), target_ratio=TARGET_RATIO,
                     target_met=bool(ratio >= TARGET_RATIO))
      figures.append(fig)
      print(json.dumps(fig), flush=True)

  if constraint is not None:  # the unique-codes rule's cost, at the largest batch
    batch = max(int(b) for b in args.batches.split(","))
    rows = [np.roll(base, i).astype(np.int32) for i in range(batch)]
    repeats = dataclasses.replace(constraint, unique_codes=False)
    runs = [lambda: decode(model, rows), lambda: decode(model, rows, repeats),
            lambda: decode(model, rows, constraint)]
    free_s, repeats_s, constrained_s = map(min, fwd._time_interleaved(  # pylint: disable=protected-access
        runs, args.iters))
    figures.append({
        "bench": "constrained_decode", "code_space": args.constrained, "codes": len(codes),
        "answer_format": prompts.EVIDENCE_FIRST, "dtype": dtype,
        "trie_states": constraint.num_states, "trie_edges": constraint.num_edges,
        "max_fanout": constraint.max_fanout, "trie_mb": round(constraint.nbytes / 1e6, 2),
        "trie_build_s": round(constraint.build_seconds, 2),
        "build_peak_rss_increase_mb": round((rss1 - rss0) / 1e3, 1), "batch": batch,
        "free_tokens_per_s": round(batch * args.new / free_s, 1),
        "constrained_tokens_per_s": round(batch * args.new / constrained_s, 1),
        "constrained_overhead": round(constrained_s / free_s - 1, 3),
        "repeats_allowed_tokens_per_s": round(batch * args.new / repeats_s, 1),
        "unique_codes_overhead": round(constrained_s / repeats_s - 1, 3)})
    print(json.dumps(figures[-1]), flush=True)
  judged = [f for f in figures if "target_met" in f]
  print(json.dumps({"bench": "decode_all", "platform": jax.devices()[0].platform,
                    "runs": figures, "target": f"constrained decode >= {TARGET_RATIO}x "
                    "transformers generate at every batch and dtype",
                    "targets_met": bool(judged) and all(f["target_met"] for f in judged)}),
        flush=True)


if __name__ == "__main__":
  main()
