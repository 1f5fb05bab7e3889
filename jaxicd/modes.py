"""The run modes of ``jaxicd.main``: train, eval, predict and export in a workdir.

`run` checks what can refuse the run before the first write (the data of train and eval,
predict's input and outputs, the compatibility of the workdir's checkpoint), records the config
and runs the mode. Eval, predict and export read the workdir's trained model through
`jaxicd.train.trained.TrainedModel` (eval's loss needs the trainer's eval step: it builds a
`Trainer`).
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax

from jaxicd import sharding
from jaxicd.data import mixture
from jaxicd.errors import InputError
from jaxicd.infer import predict
from jaxicd.model import export, weights
from jaxicd.train import config as config_lib
from jaxicd.train.coding_eval import CodingEval
from jaxicd.train.metrics_writer import MetricsWriter
from jaxicd.train.trained import TrainedModel
from jaxicd.train.trainer import Trainer, check_checkpoints, config_tokenizer


def run(config, workdir: str) -> dict[str, Any]:
  """Runs ``config.mode`` (train, eval, predict or export; the config already validated) in
  ``workdir``; returns a JSON-able summary. ``config.<mode>.json`` is written only once nothing
  can refuse the run (a refused run leaves the record of the last good one)."""
  mode = config.mode
  # Multi-host: the one start-up, before anything else touches JAX (CPU collectives use gloo,
  # JAX's default).
  sharding.maybe_initialize_distributed(config.distributed)
  plan = tokenizer = None
  if mode == "predict":  # input, output paths and checkpoint
    plan = predict.preflight(config, workdir, config_lib.checkpoint_directory(config, workdir))
  if mode in ("train", "eval"):
    tokenizer = config_tokenizer(config)
    config_lib.validate_data(config, tokenizer, mixture.documents(config.data))
  check_checkpoints(config, workdir, resume=mode == "train",
                    warn=lambda line: print(line, file=sys.stderr, flush=True))
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:  # processes share the workdir; one copy is enough
    # Keep the exact config of every invocation next to the run.
    (pathlib.Path(workdir) / f"config.{mode}.json").write_text(
        config.to_json_best_effort(indent=2))
  if mode == "train":
    summary = run_train(config, workdir, tokenizer)
    summary.pop("history", None)
    return summary
  if mode == "predict":
    return run_predict(config, workdir, plan)
  if mode == "export":
    return run_export(config, workdir)
  return run_eval(config, workdir, tokenizer)


def _add_coding_eval(trainer: Trainer) -> None:
  """Registers coding metrics on held-out notes when ``eval_coding.documents > 0``."""
  if int(trainer.cfg.eval_coding.documents) > 0:
    trainer.eval_hooks.append(CodingEval(trainer.cfg, trainer.tokenizer))


def run_train(cfg, workdir: str, tokenizer=None) -> dict[str, Any]:
  """Trains in ``workdir``, resuming from its newest checkpoint."""
  trainer = Trainer(cfg, workdir, tokenizer=tokenizer)
  _add_coding_eval(trainer)
  try:
    return trainer.train()
  finally:
    trainer.close()


def run_eval(cfg, workdir: str, tokenizer=None) -> dict[str, float]:
  """Validation loss and coding metrics of the newest checkpoint (the base model with untrained
  adapters when there is none), with an evidence report of the coded notes."""
  trainer = Trainer(cfg, workdir, tokenizer=tokenizer)
  try:
    step = trainer.restore_latest(with_data=False)
    result = trainer.evaluate()
    _add_coding_eval(trainer)
    for hook in trainer.eval_hooks:
      if hasattr(hook, "report_path"):  # eval mode: an evidence report of the coded notes
        hook.report_path = trainer.workdir / f"report.{cfg.eval_coding.split}.html"
      result.update(hook(trainer, max(step or 0, 1)))  # coding runs even without a checkpoint
    result["step"] = step or 0
    where = (f"checkpoint step {step}" if step is not None
             else "no checkpoint in the workdir: base model, adapters untrained")
    trainer.print(f"eval ({where}): val loss {result['loss']:.4f}  "
                  f"acc {result['accuracy']:.3f} over {result['batches']} batches")
    writer = MetricsWriter(trainer.workdir, enabled=trainer.is_chief)
    writer.write(step or 0, result, prefix="eval/")
    writer.close()
    return result
  finally:
    trainer.close()


def run_predict(cfg, workdir: str, plan: predict.Plan | None = None) -> dict[str, Any]:
  """Codes ``cfg.input`` with the newest checkpoint in ``workdir`` (`jaxicd.infer.predict`)."""
  checkpoints = config_lib.checkpoint_directory(cfg, workdir)
  plan = plan or predict.preflight(cfg, workdir, checkpoints)  # bad input fails fast
  with TrainedModel(cfg, workdir) as trained:
    if plan.notes.ignored:
      trained.print(f"predict: {plan.notes.ignored} files in {cfg.input} are not .txt notes and "
                    "were left out")
    step = trained.restore()
    directory = trained.checkpointer.directory
    if step is None:
      if not bool(cfg.allow_untrained):
        raise InputError(f"no usable checkpoint in {directory}; pass "
                         "--config.allow_untrained=True to code with the base model on purpose")
      trained.print(f"warning: no checkpoint in {directory}: coding with the base model and "
                    "untrained adapters (config.allow_untrained)")
    return predict.code_notes(cfg, workdir, plan, trained.model, trained.tokenizer, step=step,
                              checkpoints=str(directory), is_chief=trained.is_chief,
                              print_fn=trained.print)


def run_export(cfg, workdir: str) -> dict[str, Any]:
  """Writes the newest checkpoint of ``workdir`` as ``<output>/peft`` (the adapters) and
  ``<output>/merged`` (base + adapters, a transformers checkpoint with the tokenizer), where
  ``output`` is ``cfg.output`` or ``<workdir>/export``. The merged weights are stored in
  ``cfg.model.param_dtype``; earlier export files there are replaced."""
  out = pathlib.Path(cfg.output or pathlib.Path(workdir) / "export")
  with TrainedModel(cfg, workdir) as trained:
    step = trained.restore()
    if step is None:
      raise export.ExportError(f"export: no checkpoint in {trained.checkpointer.directory}; "
                               "train first (or point --workdir at a trained run)")
    model = trained.model
    source = weights.resolve_source(cfg.model.source)
    summary = dict(step=step)
    if trained.is_chief:
      summary["peft"] = export.export_peft(model, out / "peft", overwrite=True,
                                           base_model_name_or_path=str(source.path or source.name))
      summary["merged"] = export.export_merged(model, out / "merged", tokenizer=trained.tokenizer,
                                               dtype=cfg.model.param_dtype, overwrite=True)
      trained.print(f"export (checkpoint step {step}): adapters -> {out / 'peft'}, merged "
                    f"{cfg.model.param_dtype} checkpoint -> {out / 'merged'}")
    return summary
