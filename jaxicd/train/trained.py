"""The trained model of a workdir, for inference (eval's coding, predict, export, benchmarks).

`TrainedModel` loads the base weights and the run's tokenizer once, then restores the adapters
of a chosen checkpoint step or of the newest readable one (the checkpoint settings are checked
as for a training resume, less the training-only ones; an unreadable newest checkpoint gives
way to the one before it). Only the adapters are read: no optimizer, no compiled train step.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import jax

from jaxicd import sharding as shd
from jaxicd.train.checkpoint import (Checkpointer, abstract_like, check_compatible,
                                     restore_newest, run_settings)
from jaxicd.train.config import checkpoint_directory
from jaxicd.train.trainer import (base_fingerprint, chief_printer, config_rules,
                                  load_model_parts)


class TrainedModel:
  """Base weights with the adapters of one checkpoint of ``workdir`` (fresh, untrained adapters
  until `restore` finds one). ``model``: the merged live model; ``step``: its checkpoint step
  (None before a restore)."""

  def __init__(self, cfg, workdir: str | os.PathLike, *, mesh=None, tokenizer=None,
               print_fn: Callable[[str], None] | None = None):
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir)  # modes.run creates it; a restore only reads
    self.is_chief = jax.process_index() == 0
    self.print = chief_printer(print_fn)
    self.mesh = mesh or shd.make_mesh(dict(cfg.mesh))
    self.parts, self.tokenizer = load_model_parts(cfg, self.mesh, config_rules(cfg), tokenizer)
    self._param_shardings = self.parts.param_shardings(self.mesh)
    self.params = jax.device_put(self.parts.params, self._param_shardings)
    self.base = jax.device_put(self.parts.base, self.parts.base_shardings(self.mesh))
    self.rest = jax.device_put(self.parts.rest, self.parts.rest_shardings(self.mesh))
    self.step: int | None = None
    self.checkpointer = Checkpointer(checkpoint_directory(cfg, self.workdir))
    self._current = dict(base_fingerprint=base_fingerprint(cfg.model.source),
                         lora_shapes=self.parts.lora_shapes(), settings=run_settings(cfg))

  @property
  def model(self):
    """A live model with the restored adapters."""
    return self.parts.merge(self.params, self.base, self.rest)

  def steps(self) -> list[int]:
    """The workdir's checkpoint steps."""
    return self.checkpointer.all_steps()

  def restore(self, step: int | None = None) -> int | None:
    """Restores the adapters of checkpoint `step`, else of the newest readable checkpoint;
    returns its step (None when the workdir has none)."""
    return restore_newest(self.checkpointer, self._restore, step=step, warn=self.print)

  def _restore(self, step: int) -> int:
    directory = self.checkpointer.step_dir(step)
    check_compatible(self.checkpointer.read_meta(step), self._current, directory,
                     workdir=self.workdir, resume=False, warn=self.print)
    abstract = dict(params=abstract_like(self.parts.params, self._param_shardings))
    self.params = self.checkpointer.restore(step, abstract, partial=True)["params"]
    self.step = step
    self.print(f"resumed from {directory} at step {self.step}")
    return self.step

  def close(self) -> None:
    self.checkpointer.close()

  def __enter__(self) -> "TrainedModel":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
