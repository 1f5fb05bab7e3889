"""Benchmark: greedy decode tokens/s of jaxicd's generate vs transformers' generate (SmolLM2).

Same weights (the embedded GGUF, f32, copied into transformers' PyTorch Llama), prompts of
`--prompt` tokens, exactly `--new` new tokens (no stop token), batches 1 and 8, in one process;
warm-up calls (jit compilation) are excluded and calls alternate between the two (shared
machine). Also reports the cost of the code trie over all billable ICD-10-CM codes and decode
speed with that constraint on, with and without the unique-codes rule. Times are best of
`--iters` calls. Prints one JSON object per line, the last with every figure.

  .venv/bin/python bench/decode.py [--batches=1,8] [--prompt=256] [--new=64] [--iters=2]
      [--skip_torch] [--platform=cpu|gpu|tpu]
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


def _forward_bench():
  """bench/forward.py, for its weight copy into transformers (not a package: load by path)."""
  path = pathlib.Path(__file__).with_name("forward.py")
  spec = importlib.util.spec_from_file_location("bench_forward", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--torch_threads", type=int, default=min(2, os.cpu_count() or 1))
  parser.add_argument("--constrained", default="all",
                      help="code space for the constrained run ('' to skip)")
  parser.add_argument("--skip_torch", action="store_true",
                      help="only the constrained-decoding run (no transformers comparison)")
  _platform.add_flag(parser)
  args = parser.parse_args()
  _platform.use(args.platform)

  from jaxicd.data import prompts
  from jaxicd.infer import generate as gen
  from jaxicd.infer import grammar
  from jaxicd.model import weights
  fwd = _forward_bench()
  model, tok = weights.load_model("smollm2", dtype="float32", param_dtype="float32")
  # Real prompt tokens: a chat prompt around a repeated clinical sentence, cut to length.
  text = "Patient admitted with acute on chronic systolic heart failure and AKI. " * 64
  base = prompts.encode_prompt(tok, text)[:args.prompt]

  if not args.skip_torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.torch_threads)
    hf = fwd._torch_model(model)  # pylint: disable=protected-access

  figures = []  # every line printed, repeated in the last one
  for batch in [] if args.skip_torch else [int(b) for b in args.batches.split(",")]:
    rows = np.stack([np.roll(base, i) for i in range(batch)]).astype(np.int32)

    def run_jax():
      return gen.generate(model, list(rows), max_new_tokens=args.new, stop_ids=[],
                          pad_id=tok.pad_id, bucket=64)

    ids = torch.from_numpy(rows).long()

    def run_torch():
      with torch.inference_mode():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_id)

    jax_s, torch_s = map(min, fwd._time_interleaved(  # pylint: disable=protected-access
        [run_jax, run_torch], args.iters))
    ours = run_jax().tokens
    theirs = run_torch()[:, args.prompt:].numpy()
    agree = float(np.mean([np.argmax(np.append(a != b, True)) for a, b in zip(ours, theirs)]))
    n = batch * args.new
    figures.append({
        "bench": "decode", "batch": batch, "prompt_tokens": args.prompt, "new_tokens": args.new,
        "dtype": "float32", "torch_threads": args.torch_threads, "cpu_count": os.cpu_count(),
        "jaxicd_tokens_per_s": round(n / jax_s, 1), "torch_tokens_per_s": round(n / torch_s, 1),
        "jaxicd_s": round(jax_s, 3), "torch_s": round(torch_s, 3),
        "ratio": round(torch_s / jax_s, 3),
        "greedy_prefix_agreement_tokens": agree})
    print(json.dumps(figures[-1]), flush=True)

  if args.constrained:
    from jaxicd.data.demo import code_space
    codes = code_space(args.constrained)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    constraint = grammar.build_constraint(tok, codes)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batch = max(int(b) for b in args.batches.split(","))
    rows = [np.roll(base, i) for i in range(batch)]

    def run(c):
      return gen.generate(model, rows, max_new_tokens=args.new, stop_ids=[], pad_id=tok.pad_id,
                          constraint=c, bucket=64)

    repeats = dataclasses.replace(constraint, unique_codes=False)
    runs = [lambda: run(None), lambda: run(repeats), lambda: run(constraint)]
    free_s, repeats_s, constrained_s = map(min, fwd._time_interleaved(  # pylint: disable=protected-access
        runs, args.iters))
    figures.append({
        "bench": "constrained_decode", "code_space": args.constrained, "codes": len(codes),
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
  import jax  # pylint: disable=import-outside-toplevel
  print(json.dumps({"bench": "decode_all", "platform": jax.devices()[0].platform,
                    "runs": figures}), flush=True)


if __name__ == "__main__":
  main()
