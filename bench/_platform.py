"""``--platform`` for the benches that run JAX: the same command on a CPU, GPU or TPU host.

Not a benchmark (``make bench`` skips ``bench/_*.py``). Each script adds the flag with
``add_flag(parser)`` and calls ``use(args.platform)`` before its first JAX computation.
"""

from __future__ import annotations

import os
import sys

# JAX's platform names: "gpu" means NVIDIA GPUs through CUDA.
_JAX_NAMES = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def add_flag(parser) -> None:
  parser.add_argument("--platform", choices=sorted(_JAX_NAMES), default=None,
                      help="JAX platform to run on (default: what JAX finds: a TPU or GPU "
                           "before the CPU)")


def use(platform: str | None) -> None:
  """Restricts JAX to ``platform``; must run before JAX starts a backend (importing it is fine)."""
  if not platform:
    return
  name = _JAX_NAMES[platform]
  os.environ["JAX_PLATFORMS"] = name
  if "jax" in sys.modules:
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if xla_bridge.backends_are_initialized():
      raise RuntimeError(f"--platform={platform}: JAX started a backend already")
    jax.config.update("jax_platforms", name)

