"""Where a block of generate calls spends its wall time (not a benchmark: ``make bench`` skips
``bench/_*.py``).

``with generate_split(gen) as split: ...`` fills ``split`` on exit with seconds: ``wall`` (the
block), ``compile`` (JAX tracing and XLA compilation, from jax.monitoring's duration events),
``device`` (inside the jitted prefill and decode functions, compilation excluded), split into
``prefill`` and ``decode``, and ``host`` (the rest: windowing, batching, padding, answer parsing,
transfers); and counts: ``calls`` (decode loops run), ``prefill_tokens`` (token positions the
prefills computed, padding included), ``decode_steps`` (loop iterations: each call runs until
its longest answer ends) and ``row_steps`` (decode steps times rows, the padded rows of a last
batch included; the generated tokens over it is how full the decode batches were).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np


@contextlib.contextmanager
def generate_split(gen):
  import jax  # pylint: disable=import-outside-toplevel
  jitted = {name: getattr(gen, name) for name in ("_prefill_jit", "_decode_jit")}
  stage = {"_prefill_jit": "prefill", "_decode_jit": "decode"}
  split = {"wall": 0.0, "compile": 0.0, "device": 0.0, "prefill": 0.0, "decode": 0.0,
           "host": 0.0, "calls": 0, "prefill_tokens": 0, "decode_steps": 0, "row_steps": 0}
  compiled = {"prefill": 0.0, "decode": 0.0, None: 0.0}
  current = [None]

  def on_duration(event: str, seconds: float, **_):
    if event.startswith("/jax/core/compile") or event.startswith("/jax/compilation"):
      split["compile"] += seconds
      compiled[current[0]] += seconds

  def timed(name):
    def call(*args, **kwargs):
      current[0] = stage[name]
      start = time.perf_counter()
      out = jax.block_until_ready(jitted[name](*args, **kwargs))
      split[stage[name]] += time.perf_counter() - start
      current[0] = None
      if name == "_prefill_jit":  # (graphdef, params, prompt_tokens, lengths, prefix_tokens, ...)
        split["prefill_tokens"] += int(args[2].size + args[4].size)
      else:  # (tokens [B, max_new], lengths [B], logprobs)
        lengths = np.asarray(out[1])
        steps = int(lengths.max(initial=0))
        split["calls"] += 1
        split["decode_steps"] += steps
        split["row_steps"] += steps * len(lengths)
      return out
    return call

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  for name in jitted:
    setattr(gen, name, timed(name))
  start = time.perf_counter()
  try:
    yield split
  finally:
    split["wall"] = time.perf_counter() - start
    for name, fn in jitted.items():
      setattr(gen, name, fn)
    jax.monitoring.unregister_event_duration_listener(on_duration)
    inside = split["prefill"] + split["decode"]
    split["prefill"] -= compiled["prefill"]
    split["decode"] -= compiled["decode"]
    split["device"] = split["prefill"] + split["decode"]
    split["host"] = split["wall"] - inside - compiled[None]
