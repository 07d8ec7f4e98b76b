"""launch/local.sh's real two-process run is tests/train/test_trainer.py's jax.distributed test; here its failure
path runs for real. The TPU and SLURM launchers are checked through --dry-run (gcloud, sbatch, srun are not
installed here), with a fake `scontrol` on PATH."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.environment import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
TINY = "--config=tests/train/tiny.py:mqar"


def _bash(*args, env=None, timeout=60):
  return subprocess.run(["bash", *args], cwd=ROOT, env=subprocess_env(PYTHON=sys.executable, **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


def _one_line_error(result, expected):
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stderr.strip().splitlines() == [result.stderr.strip()] and expected in result.stderr, result.stderr


@pytest.mark.slow
def test_local_fails_when_a_process_fails(tmp_path):
  result = _bash("launch/local.sh", "2", TINY, f"--workdir={tmp_path}", "--config.train.nonsense=1", timeout=120)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "exited with status" in result.stderr and "unknown config key 'train.nonsense'" in result.stderr


def test_local_dry_run_and_usage(tmp_path):
  result = _bash("launch/local.sh", "--dry-run", "3", TINY, f"--workdir={tmp_path}", env={"PORT": "4567"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == f"mkdir -p {tmp_path}/logs" and len(lines) == 4
  for i, line in enumerate(lines[1:]):
    words = shlex.split(line)
    assert words[:3] == [sys.executable, "-m", "experiments.train"] and words[-4:] == [
        ">", f"{tmp_path}/logs/process_{i}.log", "2>&1", "&"]
    assert words[3:8] == [TINY, f"--workdir={tmp_path}", "--num_processes=3",
                          "--coordinator_address=127.0.0.1:4567", f"--process_id={i}"]
  _one_line_error(_bash("launch/local.sh", "0"), "N must be a positive integer, got '0'")
  assert _bash("launch/local.sh").returncode == 2


def _tpu(*args):
  return _bash("launch/tpu_pod.sh", "--dry-run", "--name=pod", "--zone=us-central2-b", *args)


def test_tpu_dry_run_prints_every_command():
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  up = [shlex.split(line) for line in _tpu("--type=v4-32", "--spot", "up").stdout.splitlines() if line[0] != "#"]
  assert up[0] == gcloud + ["describe", "pod", "--zone=us-central2-b"]
  assert up[1] == gcloud + ["create", "pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
                            "--version=tpu-ubuntu2204-base", "--spot"]
  assert up[2][:2] == ["git", "ls-files"] and up[2][-6:] == ["|", "tar", "czf", "/tmp/mesanet-code.tar.gz", "--null",
                                                           "-T", "-"][-6:]
  assert up[3] == gcloud + ["scp", "/tmp/mesanet-code.tar.gz", "pod:mesanet-code.tar.gz", "--worker=all",
                            "--zone=us-central2-b"]
  assert up[4][:7] == gcloud + ["ssh", "pod", "--worker=all"] and "tar xzf mesanet-code.tar.gz -C mesanet" in up[4][-1]
  assert up[5][-1].endswith("cd mesanet && bash launch/install.sh tpu")
  assert _tpu("--type=v5litepod-16", "up").stdout.count("--version=v2-alpha-tpuv5-lite") == 1

  flags = [TINY, "--workdir=/mnt/shared/run a", "--config.data.path=/data/it's"]
  (run,) = [shlex.split(line) for line in _tpu("run", *flags).stdout.splitlines()]
  assert run[:8] == gcloud + ["ssh", "pod", "--worker=all", "--zone=us-central2-b"]
  remote = run[8].removeprefix("--command=")
  assert remote.startswith("cd mesanet && mkdir -p logs && { nohup ")
  assert "> logs/train-$(hostname).log 2>&1 < /dev/null & echo $! > logs/train.pid; }" in remote
  train = shlex.split(remote.split("nohup ")[1].split(" > logs/")[0])  # the flags survive both levels of quoting
  assert train == [".venv/bin/python", "-m", "experiments.train", "--distributed_auto", *flags]

  assert shlex.split(_tpu("stop").stdout)[-1] == "--command=kill -TERM $(cat mesanet/logs/train.pid)"
  assert shlex.split(_tpu("delete").stdout) == gcloud + ["delete", "pod", "--zone=us-central2-b", "--quiet"]
  logs = _tpu("logs").stdout.splitlines()
  assert logs[0] == "mkdir -p runs/tpu-logs/pod" and "pod:mesanet/logs/train-*.log" in shlex.split(logs[1])


def test_tpu_errors_are_one_line():
  _one_line_error(_bash("launch/tpu_pod.sh", "--dry-run", "--name=pod", "stop"), "no zone")
  _one_line_error(_tpu("up"), "creating needs the accelerator type")
  _one_line_error(_tpu("--type=v9-8", "up"), "no default runtime version for type 'v9-8'")
  _one_line_error(_tpu("launch"), "unknown command 'launch'")
  _one_line_error(_tpu("stop", "--workdir=x"), "'stop' takes no train flags")


def test_slurm_dry_run(tmp_path):
  result = _bash("launch/gpu_slurm.sbatch", "--dry-run", "--workdir=/shared/a b")
  assert shlex.split(result.stdout) == ["srun", "--kill-on-bad-exit=1", "--label", "bash", "launch/slurm_task.sh",
                                        "--workdir=/shared/a b"]
  scontrol = tmp_path / "scontrol"  # what `scontrol show hostnames gpu[07-08]` prints
  scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] || exit 1\necho gpu07\necho gpu08\n')
  scontrol.chmod(0o755)
  slurm = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8"}
  task = shlex.split(_bash("launch/slurm_task.sh", "--dry-run", "--workdir=/shared/r", env=slurm).stdout)
  assert task == ["env", "CUDA_VISIBLE_DEVICES=1", sys.executable, "-m", "experiments.train", "--workdir=/shared/r",
                  "--coordinator_address=gpu07:29500", "--num_processes=16", "--process_id=9"]
  per_node = dict(slurm, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1",
                  MESANET_PORT="1234")
  task = shlex.split(_bash("launch/slurm_task.sh", "--dry-run", env=per_node).stdout)
  assert task == ["env", sys.executable, "-m", "experiments.train", "--coordinator_address=gpu07:1234",
                  "--num_processes=2", "--process_id=1"]
  _one_line_error(_bash("launch/slurm_task.sh", "--dry-run", env={"SLURM_JOB_NODELIST": ""}),
                  "$SLURM_JOB_NODELIST is not set")
