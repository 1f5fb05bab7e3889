"""Helpers for the training tests, and scenarios they run in a subprocess with 8 fake devices.

XLA's device count is fixed when JAX initialises, so tests that need a (2, 2, 2) mesh run
``python tests/train_worker.py SCENARIO ARGS_JSON`` with ``XLA_FLAGS`` set (``run_worker``) and
read one JSON object back from its last stdout line. Nothing here changes the pytest process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_byte_tokenizer(directory: str | os.PathLike) -> pathlib.Path:
  """A byte-level BPE tokenizer without merges (259 ids: bytes + ChatML specials).

  The "tiny" model preset has a 512-token vocabulary, so it needs a tokenizer whose ids fit.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(dict(
      chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      bos_token=None, add_bos_token=False)))
  return directory


def tiny_config(tokenizer_dir: str | os.PathLike, **train_overrides):
  """configs/tiny.py with the byte tokenizer."""
  sys.path.insert(0, str(ROOT / "configs"))
  import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.model.tokenizer = str(tokenizer_dir)
  config.train.update(**train_overrides)
  return config


def subprocess_env(devices: int | None = None) -> dict[str, str]:
  """Environment of a child JAX process: CPU, optional fake devices, a shared compile cache.

  The persistent compilation cache lets the many short runs of the tests reuse each other's
  compiled steps (the tiny model's programs are identical across runs).
  """
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(pathlib.Path(tempfile.gettempdir())
                                         / "jaxicd-tests-xla-cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env.setdefault("PYTHONPATH", str(ROOT))
  return env


def worker_env(devices: int = 8) -> dict[str, str]:
  return subprocess_env(devices)


def run_worker(scenario: str, args: dict[str, Any], *, devices: int = 8,
               timeout: float = 300) -> dict[str, Any]:
  """Runs a scenario in a fresh interpreter with ``devices`` fake CPU devices."""
  proc = subprocess.run([PYTHON, str(pathlib.Path(__file__)), scenario, json.dumps(args)],
                        env=worker_env(devices), capture_output=True, text=True,
                        timeout=timeout, cwd=str(ROOT))
  if proc.returncode != 0:
    raise AssertionError(f"worker {scenario} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- scenarios (run in the subprocess) ------------------------------------------------------------


def _first_batch(config, tokenizer):
  from jaxicd.data import pipeline
  it = pipeline.make_train_iterator(config.data, tokenizer, prefetch=0)
  return {k: v for k, v in next(it).items()}


def scenario_parity(args: dict[str, Any]) -> dict[str, Any]:
  """Loss/grads on (2, 2, 2) vs one device; param shardings; base unchanged; overfit; NaN guard."""
  import jax
  import numpy as np
  from flax import nnx
  from jaxicd import sharding as shd
  from jaxicd.model import weights
  from jaxicd.train import trainer

  config = tiny_config(args["tokenizer_dir"], steps=40, lr=1e-2, warmup_steps=0)
  model, _ = weights.load_model("tiny", lora=trainer.lora_config(config), seed=1)
  from jaxicd.model.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(args["tokenizer_dir"])
  # Non-zero B so that gradients reach every adapter matrix (B = 0 at init).
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam) and np.all(np.asarray(var.get_value()) == 0):
      var.set_value(0.05 * jax.random.normal(jax.random.key(2), var.get_value().shape))
  parts = trainer.split_model(model)
  batch = _first_batch(config, tokenizer)
  tx = trainer.build_optimizer(config.train)
  out: dict[str, Any] = {"devices": jax.device_count()}

  results = {}
  for name, devices, sizes in (("single", jax.devices()[:1], dict(data=1)),
                               ("mesh222", jax.devices(), dict(data=2, fsdp=2, tensor=2))):
    mesh = shd.make_mesh(sizes, devices)
    fns = trainer.StepFunctions(parts, tx, mesh)
    params, base = fns.place_params(parts.params), fns.place_base(parts.base)
    rest = fns.place_rest(parts.rest)
    loss, grads = fns.grads(params, base, rest, fns.place_batch(batch))
    results[name] = (float(loss), {k: np.asarray(v) for k, v in jax.device_get(grads).items()})
    if name == "mesh222":
      out["mesh_shape"] = dict(mesh.shape)
      out["param_specs"] = {k: str(v.sharding.spec) for k, v in params.items()}
      out["base_specs"] = {
          trainer._path_name(p): str(v.sharding.spec)
          for p, v in jax.tree_util.tree_flatten_with_path(base)[0]}
      out["batch_spec"] = str(fns.place_batch(batch)["inputs"].sharding.spec)
      out["grad_specs"] = {k: str(v.sharding.spec) for k, v in grads.items()}
  out["loss_single"], out["loss_mesh"] = results["single"][0], results["mesh222"][0]
  out["max_grad_diff"] = max(float(np.max(np.abs(results["single"][1][k] -
                                                 results["mesh222"][1][k])))
                             for k in results["single"][1])
  out["max_grad_abs"] = max(float(np.max(np.abs(g))) for g in results["single"][1].values())
  out["grads_nonzero"] = sum(int(np.any(g != 0)) for g in results["single"][1].values())
  out["num_params"] = len(results["single"][1])

  # Gradient accumulation: 2 microbatches of 4 rows == one batch of 8 rows (same normalisation).
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
  fns2 = trainer.StepFunctions(parts, tx, mesh, grad_accum=2)
  halves = {k: np.stack([v[:4], v[4:]]) for k, v in batch.items() if k in trainer.BATCH_FIELDS}
  loss2, grads2 = fns2.grads(fns2.place_params(parts.params), fns2.place_base(parts.base),
                             fns2.place_rest(parts.rest), fns2.place_batch(halves))
  out["accum_loss_diff"] = abs(float(loss2) - results["single"][0])
  out["accum_max_grad_diff"] = max(
      float(np.max(np.abs(np.asarray(v) - results["single"][1][k])))
      for k, v in jax.device_get(grads2).items())

  # Overfit one batch on the (2, 2, 2) mesh; base weights must stay bit-identical.
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
  fns = trainer.StepFunctions(parts, tx, mesh)
  base_before = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(parts.base))]
  params, base = fns.place_params(parts.params), fns.place_base(parts.base)
  rest, opt_state = fns.place_rest(parts.rest), None
  opt_state = fns.init_opt_state(params)
  gbatch = fns.place_batch(batch)
  losses = []
  for _ in range(int(args.get("overfit_steps", 25))):
    params, opt_state, rest, metrics = fns.train_step(params, opt_state, base, rest, gbatch)
    losses.append(float(metrics["loss"]))
  out["overfit_losses"] = losses
  base_after = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(base))]
  out["base_unchanged"] = all(np.array_equal(a, b) for a, b in zip(base_before, base_after))
  out["params_changed"] = any(
      not np.array_equal(np.asarray(parts.params[k]), np.asarray(v)) for k, v in params.items())

  # NaN guard: an infinite loss weight makes the loss non-finite; the state must not move.
  bad = dict(batch)
  bad["loss_weights"] = batch["loss_weights"].copy()
  bad["loss_weights"][0, np.argmax(bad["loss_weights"][0] > 0)] = np.inf
  before = {k: np.asarray(v) for k, v in jax.device_get(params).items()}
  params, opt_state, rest, metrics = fns.train_step(params, opt_state, base, rest,
                                                    fns.place_batch(bad))
  out["nan_step_finite"] = float(metrics["finite"])
  out["nan_step_loss"] = str(float(metrics["loss"]))
  out["nan_step_params_kept"] = all(np.array_equal(before[k], np.asarray(v))
                                    for k, v in jax.device_get(params).items())
  return out


def scenario_restore(args: dict[str, Any]) -> dict[str, Any]:
  """Restores the newest checkpoint of ``workdir`` onto the mesh ``mesh``; dumps LoRA params."""
  import jax
  import numpy as np
  from jaxicd.train import trainer

  config = tiny_config(args["tokenizer_dir"])
  config.mesh.update(**args["mesh"])
  t = trainer.Trainer(config, args["workdir"], print_fn=lambda s: None)
  try:
    step = t.restore_latest(with_data=False)
    np.savez(args["out"], **t.lora_params_host())
    return dict(step=step, mesh=dict(t.mesh.shape), devices=jax.device_count(),
                specs={k: str(v.sharding.spec) for k, v in t.params.items()},
                opt_leaf_specs=sorted({str(getattr(x, "sharding", None) and x.sharding.spec)
                                       for x in jax.tree.leaves(t.opt_state)}))
  finally:
    t.close()


def scenario_process_shards(args: dict[str, Any]) -> dict[str, Any]:
  """The reference of a multi-process run, in one process: the same global batches, no
  ``jax.distributed``, no checkpoints.

  Each step's global batch is the concatenation of the batches that processes
  ``0..processes-1`` of a ``processes``-process run read from their own pipeline shards. Saves
  the LoRA params after each step in ``save_steps`` to ``out`` (``step<N>.<param>``) and
  returns the per-step losses.
  """
  import jax
  import numpy as np
  from jaxicd.data import pipeline
  from jaxicd.train import trainer

  config = tiny_config(args["tokenizer_dir"], steps=int(args["steps"]), eval_batches=0)
  t = trainer.Trainer(config, args["workdir"], print_fn=lambda s: None)
  n = int(args["processes"])
  shards = [pipeline.make_train_iterator(config.data, t.tokenizer, process_index=i,
                                         process_count=n, prefetch=0) for i in range(n)]
  params, opt_state, rest = t.params, t.opt_state, t.rest
  losses, saved = [], {}
  try:
    for step in range(1, int(args["steps"]) + 1):
      local = [next(it) for it in shards]
      batch = {k: np.concatenate([b[k] for b in local]) for k in trainer.BATCH_FIELDS}
      params, opt_state, rest, metrics = t.fns.train_step(params, opt_state, t.base, rest,
                                                          t.fns.place_batch(batch))
      losses.append(float(metrics["loss"]))
      if step in args["save_steps"]:
        saved.update({f"step{step}.{k}": np.asarray(v)
                      for k, v in jax.device_get(params).items()})
    np.savez(args["out"], **saved)
    return dict(losses=losses, devices=jax.device_count(), mesh=dict(t.mesh.shape),
                processes=jax.process_count())
  finally:
    t.close()


SCENARIOS = {"parity": scenario_parity, "restore": scenario_restore,
             "process_shards": scenario_process_shards}

if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  result = SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
  print(json.dumps(result, default=str), flush=True)
