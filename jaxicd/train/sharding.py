"""Device mesh and logical-axis sharding rules.

Every parameter of the model carries logical axis names (see ``jaxicd.model.llama``):
  vocab, embed, heads (q/o projection: num_heads * head_dim), kv_heads (k/v projection),
  mlp, lora (LoRA rank: never sharded), norm (RMSNorm scales).
Rules map each logical name to a mesh axis (or a tuple of them, or None = replicated).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# MaxText-style defaults: weights are sharded over fsdp on their embed dim and over tensor on
# their head/mlp/vocab dim; batches over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("lora", None),
    ("norm", None),
)


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """Maps a tuple of logical axis names to a PartitionSpec under ``rules``."""
  if logical_axes is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    # A mesh axis may appear once per spec; later uses fall back to replication.
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))
