"""launch/env.py (torchrun and srun variables -> torch.distributed's), preemption flags, metrics and wandb."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from launch import env as launch_env
from vit_scale.observe import metrics
from vit_scale.train.preempt import DEADLINE_ENV, REQUEUE_EXIT_CODE, PreemptionWatch, job_deadline


def test_torchrun_variables_pass_through():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env.distributed_env(torchrun) == {}
    assert launch_env.distributed_env({"RANK": "2", "WORLD_SIZE": "4"}) == {"LOCAL_RANK": "2"}
    assert launch_env.under_launcher(torchrun) and not launch_env.under_launcher({})


@pytest.mark.skipif(
    shutil.which("scontrol") is None and not (os.environ.get("CI") == "true" and os.geteuid() == 0),
    reason="scontrol (SLURM client) not installed; .ci/run installs it (and there this test must run)",
)
def test_srun_task_variables_become_torch_distributed_ones(tmp_path):
    # scontrol expands node lists from its config file alone; no daemon is involved.
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=t\nSlurmctldHost=localhost\nNodeName=gpu[001-020] CPUs=1\nPartitionName=p Nodes=ALL\n"
    )
    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[007-008,012]",
        "SLURM_JOB_END_TIME": "1900000000",
        "SLURM_CONF": str(conf),
        "PATH": os.environ["PATH"],
    }
    out = launch_env.distributed_env(srun)
    assert out == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 20000),
        "VIT_SCALE_JOB_ID": "123456",
        "VIT_SCALE_DEADLINE": "1900000000",
    }
    full = dict(srun)
    assert launch_env.apply(full) == 8 and full["RANK"] == "5"


def test_signal_only_sets_a_flag_and_the_deadline_comes_from_the_launcher(monkeypatch):
    """The deadline's arithmetic (the next checkpoint interval) is the checkpoint policy's: see
    tests/unit/test_checkpoint_policy.py."""
    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    assert job_deadline() is None
    watch = PreemptionWatch()
    try:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.requested and watch.reason == "SIGUSR1"
    finally:
        watch.restore()
    monkeypatch.setenv(DEADLINE_ENV, "1900000000")
    assert job_deadline() == 1900000000.0
    assert REQUEUE_EXIT_CODE == 75


def test_throughput_and_mfu_from_analytic_flops():
    t = metrics.throughput(
        images=800, seconds=2.0, data_seconds=0.5, world=4, flops_per_image=1e12, peak=100.0
    )
    assert t["images_per_s"] == 400 and t["images_per_s_per_rank"] == 100
    assert t["tflops_per_device"] == pytest.approx(100.0) and t["mfu"] == pytest.approx(1.0)
    assert t["data_wait_frac"] == 0.25
    assert metrics.peak_tflops(42.0) == 42.0


def test_wandb_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert metrics.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics.wandb_mode("auto") == "online"
    assert metrics.wandb_mode("disabled") == "disabled"


def test_metrics_log_drops_rewound_steps_and_resumes_the_same_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    kw = dict(wandb_setting="offline", project="p", entity="", run_name="r")
    log = metrics.MetricsLog(tmp_path, {"a": 1}, run_id=None, job_ids=["111"], resume_step=0, **kw)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": float(step)})
    run_id = log.run_id
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by a kill
    log = metrics.MetricsLog(tmp_path, {"a": 1}, run_id=run_id, job_ids=["111", "222"], resume_step=2, **kw)
    assert log.run_id == run_id
    assert log.run.config["slurm_job_ids"] == ["111", "222"]
    log.log({"step": 3, "loss": 30.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))


def test_pretrain_refuses_a_bad_config_before_starting_any_process(tmp_path, capsys):
    from vit_scale.cli import main

    tiny = str(launch_env.__file__).replace("launch/env.py", "configs/pretrain/tiny_cpu.yaml")
    rc = main(["pretrain", tiny, "train.global_batch=7", "--nproc", "2", "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.global_batch=7 is not divisible by train.grad_accum=1 × world size 2" in err
    assert not (tmp_path / "run").exists()
    assert main(["pretrain", tiny, "parallel.zero_stag=2", "--run-dir", str(tmp_path / "run")]) == 2
    assert "did you mean parallel.zero_stage" in capsys.readouterr().err


def test_local_group_stops_on_a_ranks_user_error_instead_of_restarting(tmp_path):
    """A rank's exit 2 is final: restarting would print the same error max_restarts more times."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "vit_scale.cli", "pretrain", "configs/pretrain/tiny_cpu.yaml",
         f"data.train={tmp_path / 'missing'}", "--nproc", "2", "--max-restarts", "3",
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.count(f"shard source {tmp_path / 'missing'} does not exist") == 2  # once per rank
    assert "restarting the group" not in proc.stderr
