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


def test_shards_array_then_merge(slurm_cluster, tmp_path):
    """`vit-scale slurm shards`: two real array tasks convert an ImageFolder, the dependent job merges."""
    import glob
    import os

    import sklearn
    from PIL import Image

    photos = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "*.jpg")))
    src = tmp_path / "folder"
    for i in range(12):
        d = src / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        with Image.open(photos[i % len(photos)]) as im:
            im.convert("RGB").crop((i * 20, i * 10, i * 20 + 64, i * 10 + 48)).save(
                d / f"img{i}.jpg", quality=90
            )
    out_dir = tmp_path / "shards"
    root = Path(__file__).resolve().parents[2]
    out = slurm_cluster.run(
        [
            sys.executable,
            "-m",
            "vit_scale.cli",
            "slurm",
            "shards",
            str(src),
            "--out",
            str(out_dir),
            "--array",
            "2",
            "--cpus-per-task",
            "1",
            "--",
            "--workers",
            "1",
            "--shard-size",
            "4",
        ],
        cwd=root,
    )
    first = out.stdout.splitlines()[0]  # "submitted job A (then job B)"
    array_job, merge_job = int(first.split()[2]), int(first.split()[-1].rstrip(")"))
    info = slurm_cluster.wait_done(merge_job, timeout=120)
    logs = "".join(p.read_text() for p in sorted((out_dir / "slurm").glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs + slurm_cluster.log_tail()
    # merge-index refuses while parts are missing, so its success shows it waited for the whole array
    assert slurm_cluster.job(array_job)["JobState"] == "COMPLETED"
    index = json.loads((out_dir / "index.json").read_text())
    assert index["num_samples"] == 12 and sorted(index["parts"]) == ["part-00000", "part-00001"]
    assert "shard part 0 of 2" in logs and "shard part 1 of 2" in logs
