"""jaxicd command line: train, evaluate, predict or export with an ml_collections config.

  python -m jaxicd.main --config=configs/mixed.py --workdir=runs/mixed
  python -m jaxicd.main --config=configs/mixed.py --workdir=runs/mixed --config.train.steps=50
  python -m jaxicd.main --config=configs/mixed.py --workdir=runs/mixed --config.mode=eval
  python -m jaxicd.main --config=configs/predict.py --workdir=runs/mixed --config.input=note.txt
  python -m jaxicd.main --config=configs/mixed.py --workdir=runs/mixed --config.mode=export
  python -m jaxicd.main --config=configs/mixed.py --config.mode=plan   # costs; no workdir needed

Training resumes from the newest checkpoint in ``--workdir``; metrics go to
``<workdir>/metrics.jsonl`` and TensorBoard event files under ``<workdir>/tensorboard``.

A config is checked before anything is written (`jaxicd.train.config.validate`): unknown keys,
values that cannot work, data that lacks what the run needs, a checkpoint made with other
settings. Expected failures (bad input or config, missing files, a refused resume, an unreadable
checkpoint; `jaxicd.errors`) print one message naming the file, line or key and exit with status
2, without a traceback (``--verbose`` shows it); anything else keeps its traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxicd import errors
from jaxicd.train import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (any key overridable: --config.train.lr=1e-4).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, logs.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "eval", "predict", "export", "plan"],
                          "Shortcut for --config.mode.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the traceback of expected errors (bad input, config, files).")

MODES = ("train", "eval", "predict", "export", "plan")


def _add_xla_flags(flags: str) -> None:
  """Appends ``flags`` to $XLA_FLAGS; they only take effect if JAX has not started yet."""
  if not flags:
    return
  if "jax" in sys.modules:
    # Only when JAX is loaded already: loading it for this check would slow --help.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      print(f"note: JAX already started; config.cpu_xla_flags={flags!r} not applied",
            file=sys.stderr)
      return
  current = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in flags.split() if f.split("=")[0] not in current]
  os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


def compilation_cache_path(spec: str) -> pathlib.Path | None:
  """The directory of ``config.compilation_cache_dir``: "auto" is ``$XDG_CACHE_HOME/jaxicd/jax``
  (``~/.cache/jaxicd/jax`` without it), "" none."""
  if not spec:
    return None
  if spec == "auto":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    spec = os.path.join(base, "jaxicd", "jax")
  return pathlib.Path(spec).expanduser()


def _use_compilation_cache(spec: str) -> None:
  """Points JAX's persistent compilation cache at `spec` (`compilation_cache_path`), unless the
  user set one ($JAX_COMPILATION_CACHE_DIR). Takes effect if nothing was compiled yet."""
  path = compilation_cache_path(spec)
  import jax  # pylint: disable=g-import-not-at-top
  if path is None or jax.config.jax_compilation_cache_dir:
    return
  try:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
  except OSError as e:
    raise errors.ConfigError(f"config.compilation_cache_dir={spec!r}: cannot create {path} "
                             f"({e.strerror}); set another directory or \"\" for none") from e
  jax.config.update("jax_compilation_cache_dir", str(path))


def run(config, workdir: str) -> dict:
  """Runs ``config.mode`` in ``workdir``; returns a JSON-able summary.

  Everything that can refuse the run comes before the first write: the config's keys and
  values, its data (train, eval), predict's input and outputs, and the compatibility of the
  workdir's checkpoint. Only then is ``config.<mode>.json`` written (a refused run leaves the
  record of the last good one).
  """
  mode = config.mode
  if mode not in MODES:
    raise errors.ConfigError(f"config.mode={mode!r}: choose one of {', '.join(MODES)}")
  config_lib.validate(config)
  # Run modes and the cost model import JAX: here, not at the top, so that JAX loads after the
  # XLA flags are set and --help stays fast.
  if mode == "plan":  # the cost model: no accelerator, no weights, nothing written
    from jaxicd import cost_model  # pylint: disable=g-import-not-at-top
    return cost_model.run_plan(config)
  _add_xla_flags(config.cpu_xla_flags)
  _use_compilation_cache(config.compilation_cache_dir)
  from jaxicd import modes  # pylint: disable=g-import-not-at-top
  return modes.run(config, workdir)


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_STATUS)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an override of a key the config lacks (ml_collections raises a
  KeyError/AttributeError from inside the parser) becomes one line naming the flag."""
  try:
    return app.parse_flags_with_usage(argv)
  except SyntaxError as e:  # in the config file
    if "--verbose" in argv:
      raise
    _fail(f"{e.filename}:{e.lineno}: {e.msg} (--config)")
  except (AttributeError, KeyError) as e:
    if "--verbose" in argv:
      raise
    lines = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", "\n").splitlines()
    key = lines[0].strip("'\"\\") if lines else ""
    given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in given if key and key in re.split(r"[.\[\]]", a)] or given
    hint = " ".join(lines[1:])
    _fail(f"{' '.join(named) or '--config'}: the config has no key {key!r}"
          + (f" ({hint})" if hint else ""))


def main(argv) -> None:
  try:
    _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if not errors.is_expected(e) or _VERBOSE.value:
      raise
    _fail(errors.message(e))


def _load_config():
  """The parsed --config; a config file that failed to load is an expected failure."""
  config = _CONFIG.value
  try:
    config.mode  # pylint: disable=pointless-statement
  except OSError as e:  # ml_collections defers a load failure to the first attribute access
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    raise errors.ConfigError(f"--config: {lines[-1] if lines else e}") from e
  return config


def _main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and grain log every file operation at INFO; progress lines are printed instead.
    absl_logging.set_verbosity(absl_logging.WARNING)
  config = _load_config()
  if _MODE.value:
    with config.unlocked():
      config.mode = _MODE.value
  if _WORKDIR.value is None and config.mode != "plan":
    raise app.UsageError("--config and --workdir are required")
  summary = run(config, _WORKDIR.value)
  print(json.dumps({"mode": config.mode, **summary}, default=str), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
