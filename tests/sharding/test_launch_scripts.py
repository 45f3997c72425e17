"""launch/slurm_gpu.sbatch and launch/tpu_pod.sh with stand-ins for srun/scontrol/gcloud."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_bin(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
  # srun: run the step once per task, with the variables SLURM sets per task.
  _script(bin_dir / "srun", """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@" || exit $?
done
""")
  _script(bin_dir / "fake_etjax", """#!/usr/bin/env bash
echo "id=$JAX_PROCESS_ID n=$JAX_NUM_PROCESSES coord=$JAX_COORDINATOR_ADDRESS \
local=${JAX_LOCAL_DEVICE_IDS:-all} lhs=$(echo $XLA_FLAGS | grep -c latency_hiding) args=$*"
""")
  return bin_dir


def _sbatch_env(bin_dir, tasks, per_node):
  return dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
              SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS=str(tasks),
              SLURM_NTASKS_PER_NODE=str(per_node), SLURM_JOB_NUM_NODES="2",
              ETJAX=str(bin_dir / "fake_etjax"), XLA_FLAGS="")


def test_slurm_one_process_per_node(tmp_path):
  bin_dir = _fake_bin(tmp_path)
  proc = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "gin/runs/x.gin", "--gin.a=1"],
                        env=_sbatch_env(bin_dir, 2, 1), cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith("id=")]
  assert lines == [
      f"id={i} n=2 coord=node-a:12355 local=all lhs=1 "
      "args=train --gin_file=gin/runs/x.gin --gin.a=1" for i in range(2)], (
          proc.stdout, proc.stderr)


def test_slurm_one_process_per_gpu(tmp_path):
  bin_dir = _fake_bin(tmp_path)
  proc = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "gin/runs/x.gin"],
                        env=_sbatch_env(bin_dir, 4, 2), cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  got = [l.split()[3] for l in proc.stdout.splitlines() if l.startswith("id=")]
  assert got == ["local=0", "local=1", "local=0", "local=1"]


def test_slurm_usage_error():
  proc = subprocess.run(["bash", "launch/slurm_gpu.sbatch"], cwd=REPO,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2 and "usage:" in proc.stderr


def test_tpu_pod_runs_the_job_on_every_worker():
  env = dict(os.environ, DRY_RUN="1", PROJECT="proj")
  proc = subprocess.run(["bash", "launch/tpu_pod.sh", "pod", "us-central2-b",
                         "gin/runs/t5.gin", "--gin.train.num_steps=5"], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for part in ("gcloud compute tpus tpu-vm ssh pod", "--zone=us-central2-b",
               "--worker=all", "--project=proj", "LIBTPU_INIT_ARGS",
               "etjax\\ train\\ --gin_file=gin/runs/t5.gin\\ --gin.train.num_steps=5"):
    assert part in out, (part, out)
