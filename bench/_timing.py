"""Where a block of generate calls spends its wall time (not a benchmark: ``make bench`` skips
``bench/_*.py``).

``with generate_split(gen) as split: ...`` fills ``split`` on exit with seconds: ``wall`` (the
block), ``compile`` (JAX tracing and XLA compilation, from jax.monitoring's duration events),
``device`` (inside the jitted prefill and decode functions, compilation excluded) and ``host``
(the rest: windowing, batching, padding, answer parsing, transfers), plus ``calls`` (generated
batches: decode loops run).
"""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def generate_split(gen):
  import jax  # pylint: disable=import-outside-toplevel
  jitted = {name: getattr(gen, name) for name in ("_prefill_jit", "_decode_jit")}
  split = {"wall": 0.0, "compile": 0.0, "device": 0.0, "host": 0.0, "calls": 0}
  inside = [0.0]

  def on_duration(event: str, seconds: float, **_):
    if event.startswith("/jax/core/compile") or event.startswith("/jax/compilation"):
      split["compile"] += seconds

  def timed(name):
    def call(*args, **kwargs):
      start = time.perf_counter()
      out = jax.block_until_ready(jitted[name](*args, **kwargs))
      inside[0] += time.perf_counter() - start
      split["calls"] += name == "_decode_jit"
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
    split["device"] = inside[0] - split["compile"]
    split["host"] = split["wall"] - inside[0]
