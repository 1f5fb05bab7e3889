"""Orbax checkpoints of a LoRA run: adapters, optimizer state, step, data iterator and config.

Layout of one checkpoint (``<workdir>/checkpoints/<step>/``), saved as one Orbax ``Composite``:
  state      LoRA params (flat dict ``path -> array``), optimizer state, step (``StandardSave``)
  data_iter  the grain iterator's state, one JSON per process (``grain.checkpoint``)
  meta       config, base-weight fingerprint, mesh and LoRA shapes (``JsonSave``)
Base weights are never saved: they are re-read from their source, whose fingerprint must match.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

_ITEMS = ("state", "data_iter", "meta")


class CheckpointMismatchError(RuntimeError):
  """A checkpoint does not belong to the current base weights or LoRA configuration."""


def _jsonable(value):
  return json.loads(json.dumps(value, default=str))


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the items above.

  Saves are asynchronous: ``save`` returns once arrays are copied off the devices; call
  ``wait()`` (or ``close()``) before the process exits.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, every: int = 0,
               async_save: bool = True):
    text = str(directory)
    # Cloud storage (gs://...) for multi-host runs, whose hosts share no local disk.
    self.directory = (epath.Path(text) if "://" in text
                      else epath.Path(pathlib.Path(text).absolute()))
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  # --- queries --------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  # --- save / restore -------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, data_iter=None, meta: Mapping[str, Any] | None = None,
           force: bool = True) -> bool:
    """Saves ``state`` (a pytree of arrays); ``data_iter`` must not advance until this returns."""
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(_jsonable(dict(meta or {}, step=int(step)))))
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, *, data_iter=None) -> Any:
    """Restores ``state`` onto the shardings of ``abstract_state`` (``ShapeDtypeStruct``s).

    The target shardings may differ from the saving run's mesh. ``data_iter``'s state is set in
    place when given.
    """
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], directory) -> None:
  """Raises ``CheckpointMismatchError`` if the base weights or LoRA shapes differ."""
  problems = []
  saved_fp, current_fp = saved.get("base_fingerprint"), _jsonable(current.get("base_fingerprint"))
  if _identity(saved_fp) != _identity(current_fp):
    problems.append(f"base weights differ: checkpoint was trained on {saved_fp}, "
                    f"the current source is {current_fp}")
  saved_shapes, current_shapes = saved.get("lora_shapes"), _jsonable(current.get("lora_shapes"))
  if saved_shapes is not None and saved_shapes != current_shapes:
    missing = sorted(set(saved_shapes) ^ set(current_shapes or {}))[:5]
    changed = sorted(k for k in set(saved_shapes) & set(current_shapes or {})
                     if saved_shapes[k] != current_shapes[k])[:5]
    problems.append(f"LoRA adapters differ (config.lora changed?): params only on one side "
                    f"{missing}, shape changed {changed}")
  if problems:
    raise CheckpointMismatchError(
        f"cannot resume from {directory}: " + "; ".join(problems)
        + ". Use a fresh --workdir, or restore the original base model / LoRA config.")


def _identity(fingerprint) -> tuple | None:
  """What identifies base weights: kind and content hash (paths and mtimes change on copies)."""
  if not isinstance(fingerprint, dict):
    return None
  return (fingerprint.get("kind"), fingerprint.get("sha256"))


def abstract_like(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` targets with the given shardings (e.g. of a new mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
