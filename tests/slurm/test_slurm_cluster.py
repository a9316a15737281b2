"""The cluster fixture itself: a real two-node job through sbatch and srun."""

import json
import shlex
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def test_two_node_job_runs_one_task_per_node(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(
        [
            "-N2",
            "--ntasks-per-node=1",
            f"--output={out}",
            "--wrap",
            "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS'",
        ],
    )
    info = slurm_cluster.wait_done(job, timeout=60)
    assert info["JobState"] == "COMPLETED", out.read_text() if out.exists() else info
    lines = sorted(out.read_text().split("\n")[:-1])
    assert lines == ["n1 0 2", "n2 1 2"]


def test_launch_env_under_real_srun(slurm_cluster, tmp_path):
    """launch/env.py inside real srun tasks: ranks, the first node as master, the job's port and end time."""
    out = tmp_path / "env.txt"
    probe = (
        "import json, os, time; from launch.env import distributed_env; "
        "print(json.dumps({**distributed_env(os.environ), 'now': time.time()}))"
    )
    root = Path(__file__).resolve().parents[2]
    job = slurm_cluster.sbatch(
        [
            "-N2",
            "--ntasks-per-node=1",
            "--time=7",
            f"--output={out}",
            f"--chdir={root}",
            "--wrap",
            f"srun {sys.executable} -c {shlex.quote(probe)}",
        ],
    )
    info = slurm_cluster.wait_done(job, timeout=60)
    assert info["JobState"] == "COMPLETED", out.read_text() if out.exists() else info
    envs = sorted(
        (json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")),
        key=lambda e: e["RANK"],
    )
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in envs] == [("0", "2", "0"), ("1", "2", "0")]
    assert {e["MASTER_ADDR"] for e in envs} == {"n1"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and {e["VIT_SCALE_JOB_ID"] for e in envs} == {str(job)}
    for e in envs:  # the job ends 7 minutes after it started; SLURM's clock has whole seconds
        assert 7 * 60 - 5 <= int(e["VIT_SCALE_DEADLINE"]) - e["now"] <= 7 * 60 + 1
