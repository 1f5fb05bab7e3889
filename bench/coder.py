"""Benchmark: the coder's notes per minute on demo test notes, and where the time goes.

Codes the first `--notes` demo test notes with a run's adapters (its latest checkpoint; the
untrained base model when the workdir has none), the evaluation's way: the document pass (every
window of every note, constrained evidence-first decoding), then the span re-coding stage over
the evidence it found. Each run in `--runs` (``shared``: the prompt prefix a batch shares is
prefilled once; ``unshared``: every row prefills its whole prompt; a ``-float32`` suffix decodes
with a float32 copy with the adapters folded in, ``eval_coding.dtype``) codes the same notes
with the same batch sizes; a warm-up call per run compiles first (shapes it did not meet compile
in the timed run: ``time_split_s`` splits each stage into compilation, the jitted prefill and
decode calls and host work, and counts the tokens prefilled and the decode steps run). Prints
one JSON line per run and, last, one with every run, the ratios to the first run and the target
(the fastest run >= 3x the first's notes per minute).

  .venv/bin/python bench/coder.py --workdir=runs/experiment/mixed [--config=configs/mixed.py]
      [--notes=8] [--batch_size=16] [--recode_batch_size=32] [--max_new=96]
      [--platform=cpu|gpu|tpu]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import _config
import _platform
import _timing

# The fastest run's notes per minute over the first run's (the unshared layout: every row
# prefills its whole prompt, as the coder did before the shared prefix).
TARGET_SPEEDUP = 3.0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/experiment/mixed")
  parser.add_argument("--config", default="configs/mixed.py")
  parser.add_argument("--notes", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--recode_batch_size", type=int, default=32)
  parser.add_argument("--max_new", type=int, default=96)
  parser.add_argument("--runs", default="unshared,shared,shared-float32")
  _platform.add_flag(parser)
  args = parser.parse_args()
  _platform.use(args.platform)

  # After the platform is chosen: JAX must not load before.
  import jax  # pylint: disable=import-outside-toplevel
  from jaxicd.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxicd.infer import coder as coder_lib  # pylint: disable=import-outside-toplevel
  from jaxicd.infer import generate as generate_lib  # pylint: disable=import-outside-toplevel
  from jaxicd.train.trained import TrainedModel  # pylint: disable=import-outside-toplevel

  cfg = _config.load_config(args.config)
  cfg.eval_coding.update(max_new_tokens=args.max_new, batch_size=args.batch_size,
                         recode_batch_size=args.recode_batch_size, threshold=0.0, recode=False,
                         dtype="")
  docs = [d for d in pipeline.load_documents(cfg.data) if d.split == "test"][:args.notes]
  trained_model = TrainedModel(cfg, pathlib.Path(args.workdir))
  step = trained_model.restore()
  model = trained_model.model
  coder = coder_lib.build_coder(cfg, model, trained_model.tokenizer)
  trained = model
  results = {}
  for run in args.runs.split(","):
    layout, _, dtype = run.partition("-")
    coder.share_prefix = layout == "shared"
    cfg.eval_coding.dtype = dtype
    coder.model = coder_lib.decoding_model(cfg, trained)
    coder.recode_evidence(docs[:1], coder.code_documents(docs[:1]))  # compile
    t0 = time.perf_counter()
    with _timing.generate_split(generate_lib) as doc_split:
      first = coder.code_documents(docs)
    t1 = time.perf_counter()
    with _timing.generate_split(generate_lib) as recode_split:
      coder.recode_evidence(docs, first)
    t2 = time.perf_counter()
    stats = coder.stats
    results[run] = {
        "bench": "coder", "run": run, "dtype": dtype or str(cfg.model.dtype),
        "step": int(step or 0), "notes": len(docs),
        "windows": stats["windows"], "generated_tokens": stats["generated_tokens"],
        "recoded_spans": stats["recoded_spans"], "document_pass_s": round(t1 - t0, 2),
        "recode_s": round(t2 - t1, 2), "notes_per_minute": round(60 * len(docs) / (t2 - t0), 2),
        "time_split_s": {stage: {k: round(v, 2) for k, v in split.items()}
                         for stage, split in (("document_pass", doc_split),
                                              ("recode", recode_split))},
        "batch_size": args.batch_size, "recode_batch_size": args.recode_batch_size,
        "cpu_count": os.cpu_count()}
    print(json.dumps(results[run]), flush=True)
  trained_model.close()
  first = results[args.runs.split(",")[0]]
  print(json.dumps({
      "bench": "coder_summary", "notes": len(docs), "baseline": first["run"],
      "notes_per_minute": {r: v["notes_per_minute"] for r, v in results.items()},
      "speedup": {r: {"document_pass": round(first["document_pass_s"] / v["document_pass_s"], 3),
                      "recode": round(first["recode_s"] / max(v["recode_s"], 1e-9), 3),
                      "notes_per_minute": round(v["notes_per_minute"]
                                                / first["notes_per_minute"], 3)}
                  for r, v in results.items()},
      "target_notes_per_minute_speedup": TARGET_SPEEDUP,
      "target_met": max(v["notes_per_minute"] for v in results.values())
                    >= TARGET_SPEEDUP * first["notes_per_minute"],
      "runs": results,
      "platform": jax.devices()[0].platform}), flush=True)


if __name__ == "__main__":
  main()
