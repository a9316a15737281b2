"""The cluster fixture itself: a real two-node job through sbatch and srun."""

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
