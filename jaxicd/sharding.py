"""Device mesh, logical-axis sharding rules, and shardings from parameter metadata.

Every parameter of the model carries logical axis names in its variable metadata
``logical_axes`` (`LOGICAL_AXES`; see ``jaxicd.model.llama``):
  vocab, embed, heads (q/o projection: num_heads * head_dim), kv_heads (k/v projection),
  mlp, lora (LoRA rank: never sharded), norm (RMSNorm scales).
Rules map each logical name to a mesh axis (or a tuple of them, or None = replicated).
`variable_logical_axes` is the one reader of that metadata; `state_specs` and
`param_shardings` build on it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = "logical_axes"  # nnx.Variable metadata key holding the logical axis names
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch's leading dim is split over both

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


# --- Mesh ---------------------------------------------------------------------------------------


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); at most one -1, which takes the devices left over."""
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
          f"{dict(zip(MESH_AXES, shape))} (product {known})")
    shape[unknown[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"config.mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
        f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes, so GSPMD propagates the logical rules."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes or {"data": -1}, len(devices))
  try:
    # Topology-aware device order on TPU; a plain reshape elsewhere.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except Exception:  # pylint: disable=broad-except
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def maybe_initialize_distributed(cfg: Mapping[str, Any] | None) -> None:
  """Calls ``jax.distributed.initialize()`` when ``config.distributed.enabled`` says so.

  On Cloud TPU VMs the coordinator, process count and id are discovered automatically; explicit
  values from the config are passed through for other clusters.
  """
  if not cfg or not cfg.get("enabled", False):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {k: cfg[k] for k in ("coordinator_address", "num_processes", "process_id")
            if cfg.get(k) not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


# --- Shardings for params, optimizer state and batches -------------------------------------------


def variable_logical_axes(variable) -> tuple[str | None, ...] | None:
  """The logical axis names of an ``nnx.Variable``.

  ``jaxicd.model.llama`` stores them under the metadata key `LOGICAL_AXES`; flax's own
  ``out_sharding`` annotation is accepted too. None for state without them (RNG counts).
  """
  metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  names = metadata.get(LOGICAL_AXES) or metadata.get("out_sharding")
  return tuple(names) if names else None


def state_specs(state, rules=DEFAULT_RULES):
  """PartitionSpecs, structured like ``state`` (an ``nnx.State``), from the variables' metadata."""

  def spec(leaf):
    if isinstance(leaf, nnx.Variable):
      return logical_to_spec(variable_logical_axes(leaf), rules)
    return PartitionSpec()

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def variable_sharding(mesh: Mesh, variable, rules=DEFAULT_RULES) -> NamedSharding:
  """Where the value of ``variable`` lives on ``mesh`` under ``rules``."""
  return logical_sharding(mesh, variable_logical_axes(variable), rules)


def param_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """The ``NamedSharding`` of each Variable of a module or ``nnx.State``, structured like
  ``nnx.state(tree)`` (for jit in/out shardings or Orbax restore targets)."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide a dimension (e.g. 3 KV heads over tensor=2)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept, size = [], 1
    for axis in axes:
      if dim % (size * mesh.shape[axis]) == 0:
        kept.append(axis)
        size *= mesh.shape[axis]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def named_shardings(mesh: Mesh, specs, arrays):
  """NamedShardings for ``arrays`` (same structure as ``specs``), fitted to their shapes."""
  return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, np.shape(a), mesh)),
                      specs, arrays, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicated_array(value, mesh: Mesh) -> jax.Array:
  """A host value (the same on every process) as a global array replicated over ``mesh``.

  Unlike ``jnp.asarray`` (one local device), it can be saved by Orbax in a multi-host run.
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda _: value)


def to_host(tree):
  """numpy copies of a pytree of arrays; arrays sharded over other processes are all-gathered."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def any_process(flag: bool) -> bool:
  """True if ``flag`` is true on any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def batch_spec(leading_dims: int = 0) -> PartitionSpec:
  """[*leading, batch, length]: batch split over data x fsdp; ``leading`` are e.g. microbatches."""
  return PartitionSpec(*([None] * leading_dims), BATCH_AXES, None)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(leading_dims))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, *, batch_axis: int = 0):
  """Process-local numpy batch -> global jax.Arrays sharded over (data, fsdp).

  Each process holds the rows of its own devices (the pipeline shards the stream by process);
  the global batch is ``process_count`` times larger along ``batch_axis``.
  """
  sharding = batch_sharding(mesh, batch_axis)
  out = {}
  for name, value in local.items():
    value = np.asarray(value)
    global_shape = list(value.shape)
    global_shape[batch_axis] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(sharding, value, tuple(global_shape))
  return out
