"""The plan's HBM estimate (jaxicd.cost_model.train_memory) against XLA's own buffer assignment.

Compiles jaxicd's LoRA train step for a preset (random weights, one device) at each
``--shapes`` entry ``ROWSxSEQ:REMAT`` and compares the compiled step's memory analysis
(arguments + temporaries, outputs aliased to the donated arguments) with the estimate for the
same rows, row length and remat policy. Prints one JSON line per shape, then, last, one with all.

  .venv/bin/python bench/plan_memory.py [--preset=smollm2-135m] [--shapes=4x256:dots,4x1024:dots]
      [--dtype=bfloat16] [--platform=cpu|gpu|tpu]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import _platform


def measure(preset: str, rows: int, seq: int, remat: str, dtype: str) -> dict:
  # Imported here: JAX must not load before main() has chosen the platform (_platform.use).
  import jax  # pylint: disable=import-outside-toplevel
  from jaxicd import cost_model  # pylint: disable=import-outside-toplevel
  from jaxicd import sharding as shd  # pylint: disable=import-outside-toplevel
  from jaxicd.train.config import base_config  # pylint: disable=import-outside-toplevel
  from jaxicd.model import weights  # pylint: disable=import-outside-toplevel
  from jaxicd.model.config import LoraConfig  # pylint: disable=import-outside-toplevel
  from jaxicd.train import losses, trainer  # pylint: disable=import-outside-toplevel

  model = weights.build_model(preset, lora=LoraConfig(rank=16, alpha=32.0), remat=remat,
                              dtype=dtype, param_dtype=dtype)
  cfg = model.cfg
  parts = trainer.split_model(model)
  train_cfg = base_config().train
  train_cfg.update(steps=100, lr=1e-4, warmup_steps=0, clip_norm=1.0, weight_decay=0.0)
  tx = trainer.build_optimizer(train_cfg)
  fns = trainer.StepFunctions(parts, tx, shd.make_mesh(dict(data=1), jax.devices()[:1]))
  params = fns.place_params(parts.params)
  args = (params, fns.init_opt_state(params), fns.place_base(parts.base),
          fns.place_rest(parts.rest),
          fns.place_batch(dict(inputs=np.zeros((rows, seq), np.int32),
                               targets=np.zeros((rows, seq), np.int32),
                               loss_weights=np.ones((rows, seq), np.float32),
                               segment_ids=np.ones((rows, seq), np.int32),
                               positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)))))
  analysis = fns.train_step.lower(*args).compile().memory_analysis()
  xla = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
         + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  estimate = cost_model.train_memory(
      cfg, cost_model.model_weights(cfg), {"data": 1, "fsdp": 1, "tensor": 1},
      rows_per_chip=rows, global_rows=rows, seq_len=seq, grad_accum=1,
      chunk_tokens=losses.DEFAULT_CHUNK_TOKENS)
  return {"bench": "plan_memory", "preset": preset, "rows": rows, "seq": seq, "remat": remat,
          "dtype": dtype, "platform": jax.devices()[0].platform,
          "xla_gb": round(xla / 1e9, 3), "estimate_gb": round(estimate["total"] / 1e9, 3),
          "estimate_over_xla": round(estimate["total"] / xla, 3),
          "estimate_items_gb": {k: round(v / 1e9, 3) for k, v in estimate.items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="smollm2-135m")
  parser.add_argument("--shapes", default="4x256:dots,4x1024:dots,4x1024:full")
  parser.add_argument("--dtype", default="bfloat16")
  _platform.add_flag(parser)
  args = parser.parse_args()
  _platform.use(args.platform)
  results = []
  for shape in args.shapes.split(","):
    size, _, remat = shape.partition(":")
    rows, seq = (int(x) for x in size.split("x"))
    results.append(measure(args.preset, rows, seq, remat or "dots", args.dtype))
    print(json.dumps(results[-1]), flush=True)
  print(json.dumps({"bench": "plan_memory_all", "runs": results}), flush=True)


if __name__ == "__main__":
  main()
