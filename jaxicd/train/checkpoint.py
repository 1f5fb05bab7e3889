"""Orbax checkpoints of a LoRA run: adapters, optimizer state, step, data iterator and config.

Layout of one checkpoint (``<workdir>/checkpoints/<step>/``), saved as one Orbax ``Composite``:
  state      LoRA params (flat dict ``path -> array``), optimizer state, step (``StandardSave``)
  data_iter  the grain iterator's state, one JSON per process (``grain.checkpoint``)
  meta       config, base-weight fingerprint, mesh, LoRA shapes, the run settings a resume must
             keep (`run_settings`) and a checksum of every saved array (``JsonSave``)
Base weights are never saved: they are re-read from their source, whose fingerprint must match.

A restore checks the meta against the run (`check_compatible`: one line per changed setting) and
the restored arrays against their checksums: Orbax reads a garbled array file back without
complaint. A checkpoint that cannot be read back raises `CheckpointCorruptError` naming the file.
Checkpoints written before settings and checksums were recorded still restore (what they lack is
unknown; one warning says so).
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxicd import errors
from jaxicd.data import prompts

_ITEMS = ("state", "data_iter", "meta")
# Settings that only shape training examples: an eval / predict / export restore may differ.
RESUME_ONLY = ("lora.dropout", "data.seq_len", "data.window_overlap", "data.code_space")


class CheckpointMismatchError(RuntimeError):
  """A checkpoint does not belong to the current base weights, LoRA or data settings."""


class CheckpointCorruptError(errors.UserError):
  """A checkpoint file cannot be read back (the message names it)."""

  def last_resort(self, step_dir) -> "CheckpointCorruptError":
    """The error when no earlier checkpoint can take this one's place."""
    return CheckpointCorruptError(f"{self}; no earlier checkpoint to fall back to. Move "
                                  f"{step_dir} away to start over")


def _jsonable(value):
  return json.loads(json.dumps(value, default=str))


def run_settings(cfg) -> dict[str, Any]:
  """What a checkpoint's adapters depend on besides the base weights: LoRA settings, the answer
  format and prompt version, and the data settings that shape training examples."""
  return _jsonable({
      "lora.rank": cfg.lora.rank, "lora.alpha": cfg.lora.alpha,
      "lora.dropout": cfg.lora.dropout, "lora.targets": list(cfg.lora.targets),
      "data.answer_format": cfg.data.answer_format, "prompt_version": prompts.PROMPT_VERSION,
      "data.seq_len": cfg.data.seq_len, "data.window_overlap": cfg.data.window_overlap,
      "data.code_space": cfg.data.code_space})


# --- checksums ------------------------------------------------------------------------------------

_CHECKSUM_MULTIPLIER = 0x9E3779B1  # odd: every position gets a distinct weight mod 2**32
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_checksum(x):
  """Position-weighted sum of the bit patterns, mod 2**32 (uint32 wraps; exact in any order)."""
  bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  weights = (jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) * jnp.uint32(_CHECKSUM_MULTIPLIER)
             + jnp.uint32(1))
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def checksums(tree: Any) -> dict[str, int]:
  """``{"params/layers.q.lora_a": checksum}`` of every array of ``tree``, computed where the
  arrays live (sharded arrays are never gathered)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    return {}
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
  arrays = tuple(x for _, x in leaves)
  sharding = getattr(arrays[0], "sharding", None)
  # Replicated results: every process of a multi-host run can read them.
  out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
         if isinstance(sharding, jax.sharding.NamedSharding) else None)
  values = jax.jit(lambda xs: tuple(_leaf_checksum(x) for x in xs), out_shardings=out)(arrays)
  return {name: int(v) for name, v in zip(names, jax.device_get(values))}


# --- reading a checkpoint back ----------------------------------------------------------------------


def _json_files(step_dir) -> list:
  files = [step_dir / "meta" / "metadata", step_dir / "state" / "_METADATA"]
  if (step_dir / "data_iter").exists():
    files += sorted((step_dir / "data_iter").glob("*.json"))
  return files


def _one_line(text: str, limit: int = 200) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit] + "..."


def diagnose(step_dir, exc: BaseException) -> str:
  """``"<file>: <what is wrong>"`` for a checkpoint that failed to read back: the first of its
  JSON files that does not parse, else the checkpoint file the error names, else the folder."""
  for path in _json_files(step_dir):
    if not path.exists():
      return f"{path}: missing"
    try:
      json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      return f"{path}: not valid JSON ({_one_line(e)})"
  # The most specific path the error names (tensorstore names the database, then the file).
  named = sorted({m.rstrip("/") for m in re.findall(re.escape(str(step_dir)) + r"/[^\s\"'\\,]*",
                                                     str(exc))}, key=len)
  where = named[-1] if named else str(step_dir)
  return f"{where}: unreadable ({type(exc).__name__}: {_one_line(exc)})"


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the items above.

  Saves are asynchronous: ``save`` returns once arrays are copied off the devices; call
  ``wait()`` (or ``close()``) before the process exits.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, every: int = 0,
               async_save: bool = True, create: bool = True):
    text = str(directory)
    # Cloud storage (gs://...) for multi-host runs, whose hosts share no local disk.
    self.directory = (epath.Path(text) if "://" in text
                      else epath.Path(pathlib.Path(text).absolute()))
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=create,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  # --- queries --------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def step_dir(self, step: int):
    return self.directory / str(step)

  def read_meta(self, step: int) -> dict:
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = restored["meta"]
      if not isinstance(meta, Mapping):
        raise ValueError(f"meta is a {type(meta).__name__}, not a JSON object")
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptError(diagnose(self.step_dir(step), e)) from e
    return dict(meta)

  def move_aside(self, step: int):
    """Renames an unreadable checkpoint to ``<step>.unreadable`` (kept for inspection; Orbax
    ignores the name) so that training can save that step again; returns the new path."""
    src = self.step_dir(step)
    dst = self.directory / f"{step}.unreadable"
    n = 0
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.unreadable.{n}"
    if jax.process_index() == 0:
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxicd_move_aside_{step}")
    self.manager.reload()
    return dst

  # --- save / restore -------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, data_iter=None, meta: Mapping[str, Any] | None = None,
           force: bool = True) -> bool:
    """Saves ``state`` (a pytree of arrays); ``data_iter`` must not advance until this returns."""
    meta = dict(meta or {}, checksums=checksums(state), step=int(step))
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta)))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, *, data_iter=None,
              partial: bool = False) -> Any:
    """Restores ``state`` onto the shardings of ``abstract_state`` (``ShapeDtypeStruct``s).

    The target shardings may differ from the saving run's mesh. ``data_iter``'s state is set in
    place when given. ``partial``: only the entries of ``abstract_state`` are read (e.g. the
    adapters without the optimizer state). Raises `CheckpointCorruptError` when a file cannot be
    read back or an array differs from its checksum at save time.
    """
    expected = self.read_meta(step).get("checksums")
    if partial:
      items = dict(state=ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
          partial_restore=True))
    else:
      items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      state = self.manager.restore(int(step), args=ocp.args.Composite(**items))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptError(diagnose(self.step_dir(step), e)) from e
    if expected is not None:  # None: saved before checksums were recorded
      got = checksums(state)
      if partial:
        expected = {k: v for k, v in expected.items() if k in got}
      bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
      if bad:
        raise CheckpointCorruptError(
            f"{self.step_dir(step) / 'state'}: {len(bad)} arrays differ from their checksums at "
            f"save time (a garbled array file): {', '.join(bad[:4])}"
            + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_newest(checkpointer: Checkpointer, restore_step: Callable[[int], int], *,
                   step: int | None = None, move_aside: bool = False,
                   warn: Callable[[str], None] = logging.warning) -> int | None:
  """``restore_step`` of the newest checkpoint (or of `step`), if any; returns its result.

  An unreadable newest checkpoint gives way to the one before it, with a warning; with
  ``move_aside`` (a training resume, which will save that step again) it is renamed
  ``<step>.unreadable``. With no earlier one (or an explicit `step`) `CheckpointCorruptError`
  names the file.
  """
  steps = sorted(checkpointer.all_steps(), reverse=True) if step is None else [step]
  for i, candidate in enumerate(steps):
    try:
      return restore_step(candidate)
    except CheckpointCorruptError as e:
      if step is not None:
        raise
      if i + 1 == len(steps):
        raise e.last_resort(checkpointer.step_dir(candidate)) from e
      moved = f"; moved to {checkpointer.move_aside(candidate)}" if move_aside else ""
      warn(f"warning: {e}; using step {steps[i + 1]} ({checkpointer.step_dir(steps[i + 1])}) "
           f"instead{moved}")
  return None


_legacy_warned: set[str] = set()


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], directory, *,
                     workdir=None, resume: bool = True,
                     warn: Callable[[str], None] = logging.warning) -> None:
  """Raises ``CheckpointMismatchError`` listing, one line each, the base weights, LoRA shapes
  and run settings (`run_settings`) that differ between the checkpoint ``saved`` (its meta,
  in ``directory``) and the run ``current``. ``resume=False`` (eval, predict, export) ignores the
  training-only settings (`RESUME_ONLY`). Settings the checkpoint did not record are unknown:
  ``warn`` says so once per checkpoint folder."""
  diff = []
  saved_fp, current_fp = saved.get("base_fingerprint"), _jsonable(current.get("base_fingerprint"))
  if _identity(saved_fp) != _identity(current_fp):
    diff.append(f"base weights: {_describe(saved_fp)} -> {_describe(current_fp)}")
  recorded = saved.get("settings") or {}
  now = _jsonable(current.get("settings") or {})
  unknown = [k for k in now if k not in recorded]
  for key in sorted(set(recorded) & set(now)):
    if recorded[key] != now[key] and (resume or key not in RESUME_ONLY):
      diff.append(f"{key}: {recorded[key]!r} -> {now[key]!r}")
  saved_shapes, current_shapes = saved.get("lora_shapes"), _jsonable(current.get("lora_shapes"))
  if saved_shapes is not None and current_shapes is not None and saved_shapes != current_shapes:
    only = sorted(set(saved_shapes) ^ set(current_shapes))[:5]
    changed = sorted(k for k in set(saved_shapes) & set(current_shapes)
                     if saved_shapes[k] != current_shapes[k])[:5]
    diff.append(f"LoRA shapes (config.lora or the model changed?): params only on one side "
                f"{only}, shape changed {changed}")
  if diff:
    where = f"--workdir={workdir}" if workdir is not None else str(directory)
    raise CheckpointMismatchError(
        f"cannot {'resume' if resume else 'restore'} {where}: its checkpoint {directory} was "
        "made with other settings (checkpoint -> this run):\n"
        + "".join(f"  {line}\n" for line in diff)
        + "Use a fresh --workdir, or rerun with the checkpoint's settings.")
  folder = str(epath.Path(str(directory)).parent)
  if unknown and folder not in _legacy_warned:
    _legacy_warned.add(folder)
    warn(f"warning: the checkpoints in {folder} predate recorded settings: "
         f"{', '.join(unknown)} cannot be checked; using this run's values")


def _describe(fingerprint) -> str:
  if not isinstance(fingerprint, dict):
    return "unknown"
  name = fingerprint.get("path") or fingerprint.get("name") or "?"
  return f"{fingerprint.get('kind')} {name} (sha256 {str(fingerprint.get('sha256'))[:12]})"


def _identity(fingerprint) -> tuple | None:
  """What identifies base weights: kind and content hash (paths and mtimes change on copies)."""
  if not isinstance(fingerprint, dict):
    return None
  return (fingerprint.get("kind"), fingerprint.get("sha256"))


def abstract_like(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` targets with the given shardings (e.g. of a new mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
