"""Sharded LoRA fine-tuning: state, jitted train/eval steps, the training loop.

The model is split once with ``nnx.split`` into a graph definition, the LoRA adapters (trained),
the base weights (frozen, never donated, never checkpointed) and any other state (e.g. RNG
counters). Steps are pure functions of (params, opt_state, base, rest, batch) compiled with
``jax.jit`` under explicit in/out shardings, with params and optimizer state donated.

LoRA params travel as a flat ``{"layers.0.attn.q.lora_a": array}`` dict: it has string keys
only, so Orbax, optax and sharding trees handle it without special cases.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxicd import errors
from jaxicd import sharding as shd
from jaxicd.data import pipeline
from jaxicd.model import weights
from jaxicd.model.config import LoraConfig
from jaxicd.model.tokenizer import load_tokenizer
from jaxicd.progress import PER_SOURCE, TrainingProgress
from jaxicd.train import losses
from jaxicd.train.checkpoint import (CheckpointCorruptError, Checkpointer, abstract_like,
                                     check_compatible, restore_newest, run_settings)
from jaxicd.train.config import checkpoint_directory
from jaxicd.train.metrics_writer import MetricsWriter

BATCH_FIELDS = pipeline.BATCH_KEYS  # what a step reads of a batch


class TrainingDivergedError(RuntimeError):
  """The loss or the gradient norm became NaN/Inf."""


class NoTargetTokensError(errors.UserError):
  """A training batch had no answer tokens (all loss weights 0)."""


# --- Model parts --------------------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path) -> str:
  names = [_key_name(k) for k in path]
  if names and names[-1] == "value":  # nnx.Variable's pytree leaf
    names = names[:-1]
  return ".".join(names)


@dataclasses.dataclass
class ModelParts:
  """A model split for functional training."""

  graphdef: Any
  lora_treedef: Any
  lora_keys: tuple[str, ...]
  lora_specs: dict[str, PartitionSpec]   # flat, from the adapters' logical axes
  params: dict[str, jax.Array]           # flat LoRA params
  base: Any                              # nnx.State of frozen weights
  base_specs: Any
  rest: Any                              # nnx.State of everything else (RNG counters, ...)

  def lora_state(self, params: Mapping[str, jax.Array]):
    return jax.tree.unflatten(self.lora_treedef, [params[k] for k in self.lora_keys])

  def merge(self, params: Mapping[str, jax.Array], base=None, rest=None):
    """A live model with ``params`` as adapters (e.g. for inference or export)."""
    return nnx.merge(self.graphdef, self.lora_state(params),
                     self.base if base is None else base, self.rest if rest is None else rest)

  def lora_shapes(self) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in self.params.items()}

  def param_shardings(self, mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, shd.fit_spec(self.lora_specs[k], v.shape, mesh))
            for k, v in self.params.items()}

  def base_shardings(self, mesh: Mesh):
    return shd.named_shardings(mesh, self.base_specs, self.base)

  def rest_shardings(self, mesh: Mesh):
    return jax.tree.map(lambda _: shd.replicated(mesh), self.rest)


def split_model(model: nnx.Module, rules=shd.DEFAULT_RULES) -> ModelParts:
  """Splits ``model`` into LoRA adapters (trained) and the rest (frozen)."""
  graphdef, lora, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(lora)
  keys = tuple(_path_name(p) for p, _ in leaves_with_path)
  if not keys:
    raise ValueError("the model has no nnx.LoRAParam: set config.lora.rank > 0 to train adapters")
  if len(set(keys)) != len(keys):
    raise ValueError(f"LoRA param paths are not unique: {keys}")
  spec_tree = shd.state_specs(lora, rules)
  spec_leaves = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
  params = {k: leaf for k, (_, leaf) in zip(keys, leaves_with_path)}
  return ModelParts(graphdef=graphdef, lora_treedef=treedef, lora_keys=keys,
                    lora_specs=dict(zip(keys, spec_leaves)), params=params, base=base,
                    base_specs=shd.state_specs(base, rules), rest=rest)


# --- Optimizer ----------------------------------------------------------------------------------


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to ``lr``, then cosine decay to ``lr * final_lr_fraction`` at ``steps``."""
  steps = int(train_cfg.steps)
  warmup = min(int(train_cfg.warmup_steps), max(steps - 1, 0))
  peak = float(train_cfg.lr)
  # Warmup starts at peak / (warmup + 1), not 0, so that the first step is not wasted.
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / (warmup + 1), peak_value=peak, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1),
      end_value=peak * float(train_cfg.final_lr_fraction))


def build_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW on the adapters with global-norm clipping (grads arrive already accumulated)."""
  parts = []
  if train_cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(train_cfg),
                           b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                           eps=float(train_cfg.eps), weight_decay=float(train_cfg.weight_decay)))
  return optax.chain(*parts)


# --- Steps --------------------------------------------------------------------------------------


def _tree_where(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class StepFunctions:
  """Jitted train / grad / eval steps for one model split on one mesh."""

  def __init__(self, parts: ModelParts, tx: optax.GradientTransformation, mesh: Mesh, *,
               grad_accum: int = 1):
    self.parts, self.tx, self.mesh = parts, tx, mesh
    self.grad_accum = int(grad_accum)
    if self.grad_accum < 1:
      raise ValueError(f"config.train.grad_accum must be >= 1, got {grad_accum}")
    self.param_shardings = parts.param_shardings(mesh)
    self.base_shardings = parts.base_shardings(mesh)
    self.rest_shardings = parts.rest_shardings(mesh)
    abstract_opt = jax.eval_shape(tx.init, parts.params)
    self.opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: shd.replicated(mesh))
    self.abstract_opt_state = abstract_opt
    rep = shd.replicated(mesh)
    lead = 1 if self.grad_accum > 1 else 0
    self.batch_shardings = {k: shd.batch_sharding(mesh, lead) for k in BATCH_FIELDS}
    self.eval_batch_shardings = {k: shd.batch_sharding(mesh, 0) for k in BATCH_FIELDS}

    self.train_step = jax.jit(
        self._train_step,
        in_shardings=(self.param_shardings, self.opt_shardings, self.base_shardings,
                      self.rest_shardings, self.batch_shardings),
        out_shardings=(self.param_shardings, self.opt_shardings, self.rest_shardings, rep),
        donate_argnums=(0, 1))
    self.grads = jax.jit(
        self._grads,
        in_shardings=(self.param_shardings, self.base_shardings, self.rest_shardings,
                      self.batch_shardings),
        out_shardings=(rep, self.param_shardings))
    self.eval_step = jax.jit(
        self._eval_step,
        in_shardings=(self.param_shardings, self.base_shardings, self.rest_shardings,
                      self.eval_batch_shardings),
        out_shardings=rep)
    self.init_opt_state = jax.jit(tx.init, in_shardings=(self.param_shardings,),
                                  out_shardings=self.opt_shardings)

  # The functions below run under jit.

  def _micro_grads(self, params, base, rest, batch, total_weight):
    def loss_fn(p):
      model = nnx.merge(self.parts.graphdef, self.parts.lora_state(p), base, rest)
      ce_sum, correct = losses.loss_sums(model, batch)
      new_rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)[3]
      return ce_sum / total_weight, (correct, new_rest)
    (loss, (correct, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, correct, rest, grads

  def _accumulated_grads(self, params, base, rest, batch):
    """Loss and grads normalised by the target tokens of the whole (accumulated) global batch;
    also returns that count (0 when no answer token is left)."""
    weight = jnp.sum(batch["loss_weights"].astype(jnp.float32))
    total_weight = jnp.maximum(weight, 1.0)
    if self.grad_accum == 1:
      loss, correct, rest, grads = self._micro_grads(params, base, rest, batch, total_weight)
      return loss, correct, weight, rest, grads

    def body(carry, micro):
      loss_acc, correct_acc, grads_acc, rest_c = carry
      loss, correct, rest_c, grads = self._micro_grads(params, base, rest_c, micro, total_weight)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (loss_acc + loss, correct_acc + correct, grads_acc, rest_c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, correct, grads, rest), _ = jax.lax.scan(
        body, (jnp.float32(0), jnp.float32(0), zeros, rest), batch)
    return loss, correct, weight, rest, grads

  def _grads(self, params, base, rest, batch):
    loss, _, _, _, grads = self._accumulated_grads(params, base, rest, batch)
    return loss, grads

  def _train_step(self, params, opt_state, base, rest, batch):
    loss, correct, weight, new_rest, grads = self._accumulated_grads(params, base, rest, batch)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = self.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A bad step (NaN/Inf, or no answer token: Adam's momentum would still move the adapters)
    # leaves the state untouched; the host then stops the run.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (weight > 0)
    params = _tree_where(ok, new_params, params)
    opt_state = _tree_where(ok, new_opt_state, opt_state)
    rest = _tree_where(ok, new_rest, rest)
    tokens = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
    metrics = dict(loss=loss, grad_norm=grad_norm, accuracy=correct / jnp.maximum(weight, 1.0),
                   target_tokens=weight, tokens=tokens,
                   finite=(jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32))
    return params, opt_state, rest, metrics

  def _eval_step(self, params, base, rest, batch):
    model = nnx.merge(self.parts.graphdef, self.parts.lora_state(params), base, rest)
    model.eval()  # no LoRA dropout
    ce_sum, correct = losses.loss_sums(model, batch)
    return dict(ce_sum=ce_sum, correct=correct,
                weight=jnp.sum(batch["loss_weights"].astype(jnp.float32)))

  # Placement helpers (host side).

  def place_params(self, params):
    # A copy: params are donated to the train step and must not alias the caller's arrays.
    return jax.device_put(params, self.param_shardings, may_alias=False)

  def place_base(self, base):
    return jax.device_put(base, self.base_shardings)

  def place_rest(self, rest):
    return jax.device_put(rest, self.rest_shardings)

  def place_batch(self, local_batch: Mapping[str, np.ndarray], *, accumulated: bool | None = None):
    accumulated = self.grad_accum > 1 if accumulated is None else accumulated
    fields = {k: local_batch[k] for k in BATCH_FIELDS}
    return shd.global_batch(fields, self.mesh, batch_axis=1 if accumulated else 0)

  def abstract_train_state(self) -> dict:
    """Restore targets (shapes, dtypes and this mesh's shardings) for a checkpoint."""
    return dict(
        params=abstract_like(self.parts.params, self.param_shardings),
        opt_state=abstract_like(self.abstract_opt_state, self.opt_shardings),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(self.mesh)))


# --- Building a run from a config ----------------------------------------------------------------


def lora_config(cfg):
  return LoraConfig(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha),
                    dropout=float(cfg.lora.dropout),
                    targets=tuple(cfg.lora.targets))


def config_tokenizer(cfg):
  """The run's tokenizer: ``config.model.tokenizer`` if set, else the source's own."""
  if cfg.model.tokenizer:
    return load_tokenizer(cfg.model.tokenizer)
  tokenizer = weights.source_tokenizer(cfg.model.source)
  if tokenizer is None:
    raise errors.ConfigError(f"config.model.source={cfg.model.source!r} has no tokenizer: set "
                             "config.model.tokenizer (e.g. 'smollm2')")
  return tokenizer


def load_model_and_tokenizer(cfg, mesh: Mesh | None = None, rules=shd.DEFAULT_RULES,
                             tokenizer=None):
  """The base model with fresh adapters, and the run's tokenizer (`config_tokenizer`, unless
  given)."""
  mcfg = cfg.model
  tokenizer = tokenizer or config_tokenizer(cfg)  # first: a config without one fails fast
  model = weights.build_model(
      mcfg.source, dtype=mcfg.dtype or None, param_dtype=mcfg.param_dtype or None,
      remat=mcfg.remat or None, lora=lora_config(cfg), mesh=mesh, rules=rules,
      seed=int(cfg.seed))
  return model, tokenizer


def load_model_parts(cfg, mesh: Mesh, rules=shd.DEFAULT_RULES,
                     tokenizer=None) -> tuple[ModelParts, Any]:
  """The base model with fresh adapters, split (`split_model`), and the run's tokenizer."""
  # One device: load plainly (no jitted, sharded init to compile); else place each weight on
  # its shards as it loads, so no host holds a full copy of a large model.
  load_mesh = mesh if mesh.size > 1 else None
  with jax.set_mesh(mesh):
    model, tokenizer = load_model_and_tokenizer(cfg, load_mesh, rules, tokenizer)
  return split_model(model, rules), tokenizer


def config_rules(cfg) -> tuple:
  """The run's logical axis rules: ``config.rules``, else the defaults."""
  return tuple(tuple(r) for r in cfg.rules or shd.DEFAULT_RULES)


def base_fingerprint(source: str) -> dict:
  return weights.source_fingerprint(source)


def check_checkpoints(cfg, workdir, *, resume: bool,
                      warn: Callable[[str], None] = print) -> None:
  """Refuses, before the model loads, a workdir whose newest readable checkpoint was made with
  other base weights or settings (`check_compatible`; the LoRA shapes are checked on restore),
  or whose checkpoints are all unreadable. The restore warns about those it falls back past."""
  directory = checkpoint_directory(cfg, workdir)
  if "://" not in directory and not pathlib.Path(directory).is_dir():
    return
  checkpointer = Checkpointer(directory, create=False)
  try:
    steps = sorted(checkpointer.all_steps(), reverse=True)
    for step in steps:
      try:
        saved = checkpointer.read_meta(step)
      except CheckpointCorruptError as e:
        if step == steps[-1]:
          raise e.last_resort(checkpointer.step_dir(step)) from e
        continue
      current = dict(base_fingerprint=base_fingerprint(cfg.model.source),
                     settings=run_settings(cfg))
      check_compatible(saved, current, checkpointer.step_dir(step), workdir=workdir,
                       resume=resume, warn=warn)
      return
  finally:
    checkpointer.close()


class _StopSignal:
  """Turns SIGTERM (preemption) into a flag checked between steps (single-process runs).

  Multi-host runs use Orbax's preemption sync point instead, so all hosts stop at one step.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint after the current step, then exiting")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def chief_printer(print_fn: Callable[[str], None] | None = None) -> Callable[[str], None]:
  """``print_fn``, else a flushing print on process 0 and silence elsewhere (progress lines and
  metrics are global, the same on every process)."""
  if print_fn is not None:
    return print_fn
  return (lambda s: print(s, flush=True)) if jax.process_index() == 0 else (lambda s: None)


class Trainer:
  """One training run in ``workdir``: resumes from the latest checkpoint there."""

  def __init__(self, cfg, workdir: str | os.PathLike, *, mesh: Mesh | None = None,
               model=None, tokenizer=None, print_fn: Callable[[str], None] | None = None):
    """``tokenizer`` without ``model``: the run's tokenizer, already loaded."""
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.is_chief = jax.process_index() == 0
    self.print = chief_printer(print_fn)
    self.mesh = mesh or shd.make_mesh(dict(cfg.mesh))
    self.rules = config_rules(cfg)
    t0 = time.time()
    if model is None:
      self.parts, self.tokenizer = load_model_parts(cfg, self.mesh, self.rules, tokenizer)
    else:
      self.parts, self.tokenizer = split_model(model, self.rules), tokenizer
      del model
    self.base_fingerprint = base_fingerprint(cfg.model.source)
    self.tx = build_optimizer(cfg.train)
    self.schedule = learning_rate_schedule(cfg.train)
    self.fns = StepFunctions(self.parts, self.tx, self.mesh,
                             grad_accum=int(cfg.train.grad_accum))
    self.base = self.fns.place_base(self.parts.base)
    self.rest = self.fns.place_rest(self.parts.rest)
    self.params = self.fns.place_params(self.parts.params)
    self.opt_state = self.fns.init_opt_state(self.params)
    self.step = 0
    self.load_seconds = time.time() - t0
    self.checkpointer = Checkpointer(checkpoint_directory(cfg, self.workdir),
                                     keep=int(cfg.checkpoint.keep),
                                     every=int(cfg.checkpoint.every),
                                     async_save=bool(cfg.checkpoint.async_save))
    self._data_iter = None
    self.eval_hooks: list[Callable[["Trainer", int], Mapping[str, float]]] = []

  # --- state --------------------------------------------------------------------------------

  def meta(self) -> dict:
    return dict(config=self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else dict(self.cfg),
                base_source=str(self.cfg.model.source),
                base_fingerprint=self.base_fingerprint,
                lora_shapes=self.parts.lora_shapes(),
                mesh={k: int(v) for k, v in self.mesh.shape.items()},
                settings=run_settings(self.cfg))

  def state_tree(self) -> dict:
    # The step is a global (replicated) array: Orbax cannot save a single-device one multi-host.
    return dict(params=self.params, opt_state=self.opt_state,
                step=shd.replicated_array(np.int32(self.step), self.mesh))

  def lora_params_host(self) -> dict[str, np.ndarray]:
    return shd.to_host(dict(self.params))

  @property
  def model(self):
    """A live model with the current adapters (for coding metrics)."""
    return self.parts.merge(self.params, self.base, self.rest)

  def data_iterator(self):
    if self._data_iter is None:
      self._data_iter = pipeline.make_train_iterator(
          self.cfg.data, self.tokenizer, process_index=jax.process_index(),
          process_count=jax.process_count(), with_sources=True)
    return self._data_iter

  def restore_latest(self, *, with_data: bool = True, step: int | None = None) -> int | None:
    """Restores the newest checkpoint in the workdir (or the one of `step`), if any; returns
    its step. ``with_data``: a training resume (the data position too, and every recorded
    setting must match); else eval, predict or export.

    An unreadable newest checkpoint gives way to the one before it, with a warning; a training
    resume moves it aside (``<step>.unreadable``) to save that step again. With no earlier one
    (or an explicit `step`) it raises `CheckpointCorruptError` naming the file.
    """
    return restore_newest(self.checkpointer, lambda s: self._restore(s, with_data), step=step,
                          move_aside=with_data, warn=self.print)

  def _restore(self, step: int, with_data: bool) -> int:
    saved_meta = self.checkpointer.read_meta(step)
    check_compatible(saved_meta, self.meta(), self.checkpointer.step_dir(step),
                     workdir=self.workdir, resume=with_data, warn=self.print)
    restored = self.checkpointer.restore(
        step, self.fns.abstract_train_state(),
        data_iter=self.data_iterator() if with_data else None)
    self.params, self.opt_state = restored["params"], restored["opt_state"]
    self.step = int(restored["step"])
    self.print(f"resumed from {self.checkpointer.step_dir(step)} at step {self.step}")
    return self.step

  def save(self, *, force: bool = True) -> None:
    self.checkpointer.save(self.step, self.state_tree(), data_iter=self.data_iterator(),
                           meta=self.meta(), force=force)

  # --- batches ------------------------------------------------------------------------------

  def _next_batch(self, it: Iterator) -> tuple[dict, dict]:
    """The next (accumulated) global batch, and host-side counts for logging."""
    micro = [next(it) for _ in range(self.fns.grad_accum)]
    for name in BATCH_FIELDS:
      if name not in micro[0]:
        raise KeyError(f"the training pipeline's batch lacks field {name!r} "
                       f"(has {sorted(micro[0])})")
    if self.fns.grad_accum > 1:
      local = {k: np.stack([m[k] for m in micro]) for k in BATCH_FIELDS}
    else:
      local = micro[0]
    counts = _token_kind_counts(micro, getattr(it, "summary", None))
    return self.fns.place_batch(local), counts

  # --- evaluation ---------------------------------------------------------------------------

  def evaluate(self, max_batches: int | None = None, split: str = "") -> dict[str, float]:
    """Mean token cross-entropy over the validation split (target tokens only) of
    ``train.eval_source`` (``split``: default ``train.eval_split``)."""
    max_batches = (max_batches if max_batches is not None
                   else int(self.cfg.train.eval_batches))
    # Every process must run the same number of eval steps (each is a collective), though their
    # shards may hold different numbers of batches: exactly max_batches (padded with empty
    # batches), or, for all batches, until no process has any left.
    multi = jax.process_count() > 1
    it = pipeline.make_eval_iterator(self.cfg.data, self.tokenizer,
                                     split=split or self.cfg.train.eval_split,
                                     source=self.cfg.train.eval_source,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     num_batches=(max_batches or None) if multi else None)
    lockstep = multi and not max_batches
    ce_sum = correct = weight = 0.0
    n = 0
    rows = int(self.cfg.data.batch_size) // jax.process_count()
    empty = pipeline.empty_batch(rows, int(self.cfg.data.seq_len))
    while not (max_batches and n >= max_batches):
      batch = next(it, None)
      if lockstep and shd.any_process(batch is not None):
        batch = empty if batch is None else batch
      if batch is None:
        break
      batch = pipeline.pad_batch({k: np.asarray(batch[k]) for k in BATCH_FIELDS}, rows)
      out = jax.device_get(self.fns.eval_step(
          self.params, self.base, self.rest, self.fns.place_batch(batch, accumulated=False)))
      ce_sum += float(out["ce_sum"])
      correct += float(out["correct"])
      weight += float(out["weight"])
      n += 1
    if weight == 0:
      return dict(loss=float("nan"), accuracy=float("nan"), batches=n, target_tokens=0.0)
    return dict(loss=ce_sum / weight, accuracy=correct / weight, batches=n, target_tokens=weight)

  # --- the loop -----------------------------------------------------------------------------

  def train(self) -> dict[str, Any]:
    """Trains from the newest checkpoint to ``config.train.steps``: each step is logged, then
    evaluated and checkpointed when due; SIGTERM (or a multi-host preemption) saves and stops."""
    cfg = self.cfg
    total_steps = int(cfg.train.steps)
    log_every = max(int(cfg.train.log_every), 1)
    eval_every = int(cfg.train.eval_every)
    writer = MetricsWriter(self.workdir, enabled=self.is_chief)
    it = self.data_iterator()
    self.restore_latest()
    start_step = self.step
    if start_step >= total_steps:
      self.print(f"nothing to do: checkpoint step {start_step} >= config.train.steps {total_steps}")
      writer.close()
      return dict(step=self.step, status="done")
    self._print_start(total_steps)
    first = last = None
    if start_step == 0 and cfg.train.eval_at_start:
      first = self._run_eval(writer)
    status = "done"
    history: list[dict] = []
    progress = TrainingProgress(total_steps)
    with _StopSignal() as stop:
      while self.step < total_steps:
        metrics = self._train_step(it, writer, progress)
        self.step += 1
        record = dict(metrics, lr=float(self.schedule(self.step - 1)))
        if self.step % log_every == 0 or self.step in (total_steps, start_step + 1):
          record.update(self._log_progress(metrics, record["lr"], progress))
        writer.write(self.step, record, prefix="train/")
        history.append(dict(step=self.step, loss=metrics["loss"]))
        if eval_every and self.step % eval_every == 0 and self.step < total_steps:
          self._run_eval(writer)
        if self._preempted(stop):
          status = "preempted"
          break
        if self.checkpointer.should_save(self.step) and self.step < total_steps:
          self.save(force=True)
      if status == "done":
        self.save()
        if eval_every or int(cfg.train.eval_batches):
          last = self._run_eval(writer)
    self.checkpointer.wait()
    writer.close()
    done = progress.summary()
    summary = dict(step=self.step, status=status, history=history, **done)
    totals = progress.totals_line()
    if totals:
      self.print(totals)
    changes = learnt(first or {}, last or {})
    if changes:
      summary["learnt"] = changes
      self.print(f"learnt in steps 1..{self.step} (coding the same "
                 f"{int(cfg.eval_coding.documents)} {cfg.eval_coding.split} notes, untrained -> "
                 "trained): " + ", ".join(f"{name} {a:.3f} -> {b:.3f}"
                                          for name, (a, b) in changes.items()))
    return summary

  def _print_start(self, total_steps: int) -> None:
    self.print(f"training steps {self.step + 1}..{total_steps} on mesh "
               f"{dict(self.mesh.shape)} ({jax.device_count()} {jax.devices()[0].platform} "
               f"devices, {jax.process_count()} processes); "
               f"{sum(v.size for v in self.parts.params.values()):,} LoRA params; "
               f"model+tokenizer loaded in {self.load_seconds:.1f}s")

  def _train_step(self, it: Iterator, writer: MetricsWriter,
                  progress: TrainingProgress) -> dict[str, float]:
    """One optimizer step on the next batch; its metrics (host floats). Stops the run at a
    step that had no answer tokens or a non-finite loss or gradient (its update is skipped)."""
    batch, counts = self._next_batch(it)
    t_step = time.time()
    self.params, self.opt_state, self.rest, metrics = self.fns.train_step(
        self.params, self.opt_state, self.base, self.rest, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    seconds = time.time() - t_step
    if progress.first_step_seconds is None:
      self.print(f"step {self.step + 1} (compile + run) took {seconds:.1f}s")
    progress.step_done(seconds, metrics["tokens"], counts)
    if metrics["target_tokens"] == 0:
      self._stop(writer, metrics, NoTargetTokensError,
                 f"step {self.step + 1} has no answer tokens to learn from (every loss weight "
                 f"of its batch is 0: answers cut off by config.data.seq_len="
                 f"{self.cfg.data.seq_len}, or examples without answers)",
                 "Raise config.data.seq_len or check the data.")
    if metrics["finite"] < 1:
      self._stop(writer, metrics, TrainingDivergedError,
                 f"non-finite loss ({metrics['loss']}) or gradient norm "
                 f"({metrics['grad_norm']}) at step {self.step + 1}",
                 "Lower config.train.lr or check the data.")
    return metrics

  def _log_progress(self, metrics: Mapping[str, float], lr: float,
                    progress: TrainingProgress) -> dict[str, float]:
    """Prints the progress line of the step just taken; returns its rates for the metrics."""
    rates, text = progress.report(self.step)
    self.print(f"step {self.step}/{progress.total_steps}  loss {metrics['loss']:.4f}  "
               f"acc {metrics['accuracy']:.3f}  |g| {metrics['grad_norm']:.3f}  lr {lr:.2e}  "
               f"{text}")
    return rates

  def _preempted(self, stop: "_StopSignal") -> bool:
    """True after SIGTERM or at a multi-host preemption sync point: the step is saved."""
    preempted = stop.received or (
        jax.process_count() > 1 and self.checkpointer.manager.reached_preemption(self.step))
    if preempted:
      self.save()
      self.checkpointer.wait()
      self.print(f"preempted: saved checkpoint at step {self.step}; exiting")
    return preempted

  def _stop(self, writer: MetricsWriter, metrics: Mapping[str, float], error: type[Exception],
            what: str, advice: str):
    """Ends the run at a step whose update was skipped: records its metrics, keeps the
    checkpoints and raises ``error``."""
    last = self.checkpointer.latest_step()
    writer.write(self.step + 1, metrics, prefix="train/")
    writer.close()
    self.checkpointer.wait()
    raise error(f"{what}: the update was skipped and training stopped. The last good checkpoint "
                f"({'step ' + str(last) if last is not None else 'none yet'}) in "
                f"{self.checkpointer.directory} is kept. {advice}")

  def _run_eval(self, writer: MetricsWriter) -> dict[str, float]:
    t0 = time.time()
    result = self.evaluate()
    for hook in self.eval_hooks:  # coding metrics (jaxicd.train.coding_eval)
      result.update(hook(self, self.step))
    self.print(f"eval @ step {self.step}: val loss {result['loss']:.4f}  "
               f"acc {result['accuracy']:.3f}  ({result['batches']} batches, "
               f"{time.time() - t0:.1f}s)")
    writer.write(self.step, result, prefix="eval/")
    return result

  def close(self) -> None:
    self.checkpointer.close()


# --- Helpers ------------------------------------------------------------------------------------

# The coding metrics whose change a run reports at its end (`learnt`).
_LEARNT = (("coding/micro_f1", "note micro-F1"), ("coding/macro_f1", "macro-F1"),
           ("coding/unseen_micro_f1", "unseen-code micro-F1"),
           ("coding/evidence_span_f1", "evidence span F1"), ("coding/span_exact", "span exact"),
           ("coding/codes_per_note", "codes per note"))


def learnt(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, list[float]]:
  """The coding metrics measured both before training and after it: name -> [before, after]."""
  return {name: [float(before[k]), float(after[k])] for k, name in _LEARNT
          if k in before and k in after}


def _token_kind_counts(batches: list[Mapping[str, np.ndarray]],
                       summary: Mapping[str, Any] | None) -> dict[str, float]:
  """Tokens (all, and target-only) from spans vs documents, by the pipeline's ``sources``
  feature; with named sources (``data.sources``) also tokens and examples per source."""
  ids = (summary or {}).get("source_ids", pipeline.SOURCE_IDS)
  kinds = (summary or {}).get("source_kinds", {"spans": "spans", "documents": "documents"})
  named = set(ids) != set(pipeline.SOURCE_IDS)
  out = dict(span=0.0, doc=0.0, span_target=0.0, doc_target=0.0)
  for b in batches:
    if "sources" not in b:
      continue
    for name, c in pipeline.count_sources(b, ids).items():
      kind = "span" if kinds[name] == "spans" else "doc"
      out[kind] += c["tokens"]
      out[f"{kind}_target"] += c["target_tokens"]
      if named:
        for what in ("tokens", "examples"):
          key = f"{PER_SOURCE}{name}:{what}"
          out[key] = out.get(key, 0.0) + c[what]
  return out
