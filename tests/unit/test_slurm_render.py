"""`vit-scale slurm ... --dry-run`: every option lands in the script, and bad options are one-line errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vit_scale.cli import main as cli_main
from vit_scale.commands import slurm
from vit_scale.errors import UserError
from vit_scale.train.preempt import REQUEUE_EXIT_CODE

TINY = """\
model: {variant: vit_ti16, depth: 2, width: 32, heads: 2, mlp: 64, img_size: 32, patch: 8}
train: {steps: 10, global_batch: 24}
data: {workers: 3}
run: {name: tiny}
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def vtab_config(tmp_path):
    """The tiny model with the VTAB protocol's input, resized only: validation refuses crops on svhn."""
    path = tmp_path / "vtab.yaml"
    path.write_text(TINY.replace("data: {workers: 3}", "data: {workers: 3, augment: resize}"))
    return path


@pytest.fixture
def weights(tmp_path):
    """Starting weights for fine-tune and VTAB jobs: the dry-run checks what the job will, so they exist."""
    path = tmp_path / "w" / "vit.pt"
    path.parent.mkdir()
    path.write_bytes(b"")
    return path


@pytest.fixture
def vtab_root(tmp_path):
    from vit_scale.evaluate.vtab import TASKS

    for task in TASKS:
        for split in ("train800val200", "test"):
            (tmp_path / "vtab" / task / split).mkdir(parents=True)
    return tmp_path / "vtab"


def dry_run(capsys, *argv) -> str:
    assert slurm.main([argv[0], "--dry-run", *argv[1:]]) == 0
    return capsys.readouterr().out


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_pretrain_every_option(capsys, config, tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    out = dry_run(
        capsys,
        "pretrain",
        str(config),
        "train.steps=4",
        "--run-dir",
        str(run_dir),
        "--nodes",
        "3",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--time",
        "2-00:00:00",
        "--account",
        "proj1",
        "--qos",
        "high",
        "--constraint",
        "a100&ib",
        "--exclude",
        "gpu[01-03],gpu07",
        "--mem",
        "64G",
        "--signal-seconds",
        "600",
        "--cpus-per-task",
        "6",
        "--job-name",
        "vitb",
    )
    assert out.startswith("#!/bin/bash\n")
    assert sbatch_lines(out) == [
        "--job-name=vitb",
        "--nodes=3",
        "--ntasks-per-node=4",
        "--cpus-per-task=6",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=2-00:00:00",
        "--account=proj1",
        "--qos=high",
        "--constraint=a100&ib",
        "--exclude=gpu[01-03],gpu07",
        "--mem=64G",
        "--signal=USR1@600",
        "--requeue",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        f"--output={run_dir}/slurm/%x-%j.out",
    ]
    assert "srun --kill-on-bad-exit=1 bash -c '" in out
    ranks = next(line for line in out.splitlines() if line.startswith('  exit "$rc"\' rank '))
    assert ranks == (
        f'  exit "$rc"\' rank {sys.executable} -m vit_scale.cli pretrain {config} '
        f"train.steps=4 --run-dir {run_dir} &"
    )
    assert f'if [ "$rc" -eq {REQUEUE_EXIT_CODE} ]; then touch "$VIT_SCALE_REQUEUE_MARK"' in out
    assert f'mark={run_dir}/slurm/.requeue-"$SLURM_JOB_ID"' in out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert "{{" not in out


def test_cpu_defaults_one_rank_per_node_and_cpus_from_workers(capsys, config):
    out = dry_run(capsys, "pretrain", str(config), "--nodes", "2", "--gpus-per-node", "0")
    lines = sbatch_lines(out)
    assert "--ntasks-per-node=1" in lines
    assert "--cpus-per-task=4" in lines  # data.workers + 1
    assert not any(line.startswith(("--gpus", "--partition", "--time", "--account")) for line in lines)
    assert f"--output={Path.cwd() / 'runs' / 'tiny'}/slurm/%x-%j.out" in lines  # run.dir's default


def test_finetune_runs_the_finetune_command(capsys, config, weights, tmp_path):
    data = f"data.train={tmp_path} data.test={tmp_path}".split()
    out = dry_run(capsys, "finetune", str(config), f"init={weights}", *data, "--gpus-per-node", "1")
    assert f"-m vit_scale.cli finetune {config} init={weights} {' '.join(data)} --run-dir" in out
    assert "--signal=USR1@300" in sbatch_lines(out)


def test_vtab_array_one_task_per_dataset_then_the_table(capsys, vtab_config, tmp_path, weights, vtab_root):
    config = vtab_config
    out = dry_run(
        capsys,
        "vtab",
        str(config),
        f"init={weights}",
        f"eval.vtab_data={vtab_root}",
        "--tasks",
        "dtd,svhn,eurosat",
        "--gpus-per-node",
        "1",
        "--run-dir",
        str(tmp_path / "v"),
        "--time",
        "90",
        "--partition",
        "p",
    )
    array, table = out.split("#!/bin/bash\n")[1:]
    lines = sbatch_lines(array)
    assert "--array=0-2" in lines and "--time=90" in lines and "--partition=p" in lines
    assert "--gpus-per-node=1" in lines
    assert "TASKS=(dtd svhn eurosat)" in array
    assert array.strip().endswith(
        f'vtab {config} init={weights} eval.vtab_data={vtab_root} --task "$task" --run-dir {tmp_path / "v"}/"$task"'
    )
    assert "--partition=p" in sbatch_lines(table)
    assert not any(line.startswith("--gpus") for line in sbatch_lines(table))
    assert table.strip().endswith(
        f"vtab {config} init={weights} eval.vtab_data={vtab_root} --collect --run-dir {tmp_path / 'v'}"
    )


def test_vtab_defaults_to_all_19(capsys, vtab_config, weights, vtab_root):
    out = dry_run(capsys, "vtab", str(vtab_config), f"init={weights}", f"eval.vtab_data={vtab_root}")
    assert "--array=0-18" in sbatch_lines(out)


def test_shards_array_builds_parts_then_merges(capsys, tmp_path):
    out_dir = tmp_path / "shards"
    out = dry_run(
        capsys,
        "shards",
        "/data/my images",
        "--out",
        str(out_dir),
        "--array",
        "4",
        "--mem",
        "8G",
        "--",
        "--format",
        "imagefolder",
        "--max-side",
        "384",
    )
    array, merge = out.split("#!/bin/bash\n")[1:]
    assert sbatch_lines(array)[-4:] == [
        "--array=0-3",
        "--requeue",
        f"--chdir={Path.cwd()}",
        f"--output={out_dir}/slurm/%x-%A_%a.out",
    ]
    assert "--mem=8G" in sbatch_lines(array) and "--mem=8G" in sbatch_lines(merge)
    command = array.strip().splitlines()[-1]
    # The arguments as the array task's shell sees them, for task 2.
    shown = subprocess.run(
        [
            "bash",
            "-c",
            f"SLURM_ARRAY_TASK_ID=2; set -- {command.split(' shards ', 1)[1]}; printf '%s|' \"$@\"",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == (
        f"build|/data/my images|--out|{out_dir}|--array-index|2|--array-count|4|--no-progress|"
        "--format|imagefolder|--max-side|384|"
    )
    assert merge.strip().endswith(f"-m vit_scale.cli shards merge-index {out_dir}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain", "{cfg}", "--nodes", "2"], "give --gpus-per-node"),
        (["pretrain", "{cfg}", "--gpus-per-node", "0", "--nodes", "0"], "--nodes must be at least 1"),
        (["pretrain", "{cfg}", "--gpus-per-node", "-1"], "--gpus-per-node must be 0 or more"),
        (["pretrain", "{cfg}", "--gpus-per-node", "0", "--time", "1h"], "is not a SLURM time limit"),
        (
            ["pretrain", "{cfg}", "--gpus-per-node", "0", "--time", "5"],
            "is not shorter than --time 5 (300 s)",
        ),
        (
            ["pretrain", "{cfg}", "--gpus-per-node", "0", "--partition", "a b"],
            "--partition 'a b' has whitespace",
        ),
        (["pretrain", "{cfg}", "--gpus-per-node", "0", "model.dept=3"], "unknown config key 'model.dept'"),
        (["pretrain", "{cfg}", "--gpus-per-node", "0", "--bogus"], "unrecognized arguments: --bogus"),
        # 5 nodes x 1 rank cannot split a global batch of 24: caught at submission, not in the job.
        (["pretrain", "{cfg}", "--gpus-per-node", "0", "--nodes", "5"], "× world size 5"),
        (["vtab", "{cfg}", "--tasks", "dtd,mnist"], "unknown VTAB-1k datasets ['mnist']"),
        (["shards", "src", "--array", "2"], "the following arguments are required: --out"),
        (["shards", "src", "--out", "o", "--array", "0"], "--array must be at least 1"),
        (["serve", "{cfg}"], "unknown job kind 'serve'"),
    ],
)
def test_bad_options_are_user_errors(config, argv, message):
    argv = [a.replace("{cfg}", str(config)) for a in argv]
    with pytest.raises(UserError, match=re.escape(message)):
        slurm.main([argv[0], "--dry-run", *argv[1:]])


def test_cli_turns_errors_into_one_line_and_exit_2(capsys, config):
    assert (
        cli_main(["slurm", "pretrain", str(config), "--gpus-per-node", "0", "--time", "1h", "--dry-run"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit-scale slurm: error: --time '1h'") and "\n" not in err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 5400),
        ("90:30", 5430),
        ("4:00:00", 14400),
        ("2-00:00:00", 172800),
        ("1-12", 129600),
        ("1-0:30", 88200),
    ],
)
def test_time_limit_formats(text, seconds):
    assert slurm.time_limit_seconds(text) == seconds


def test_submit_without_sbatch_says_what_to_do(config, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        slurm.main(["pretrain", str(config), "--gpus-per-node", "0"])


@pytest.mark.parametrize(
    ("rank_exit", "wrapper_exit", "marked"), [(0, 0, False), (3, 3, False), (75, 0, True)]
)
def test_rank_wrapper_turns_the_requeue_code_into_a_mark(
    capsys, config, tmp_path, rank_exit, wrapper_exit, marked
):
    """The per-rank wrapper of the template, run by bash as srun would, around a rank exiting with `rank_exit`."""
    out = dry_run(capsys, "pretrain", str(config), "--gpus-per-node", "0")
    wrapper = out.split("bash -c '", 1)[1].split("' rank ", 1)[0]
    mark = tmp_path / "mark"
    done = subprocess.run(
        ["bash", "-c", wrapper, "rank", "bash", "-c", f"exit {rank_exit}"],
        env={"VIT_SCALE_REQUEUE_MARK": str(mark), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == wrapper_exit
    assert mark.exists() == marked


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("finetune", [], "fine-tuning needs starting weights: set init=PATH"),
        ("finetune", ["init=/nonexistent/w.pt"], "init=/nonexistent/w.pt does not exist"),
        ("vtab", [], "name the VTAB-1k data"),
        ("pretrain", ["optim.lr=-1"], "optim.lr=-1.0 must be a finite number > 0.0"),
        ("pretrain", ["train.global_batch=7"], "train.global_batch=7 is not divisible by train.grad_accum=1 × world size 2"),
    ],
)
def test_dry_run_refuses_what_the_job_would_refuse(capsys, config, kind, extra, message):
    """The same validation pass as the job's ranks, for the job's world size (2 nodes x 1 GPU here)."""
    with pytest.raises(UserError) as e:
        nodes = ["--nodes", "2"] if kind != "vtab" else []  # a VTAB array task runs on one node
        slurm.main([kind, str(config), *extra, *nodes, "--gpus-per-node", "1", "--dry-run"])
    assert message in str(e.value)


def test_gpu_decode_is_checked_against_the_jobs_gpus_not_the_login_node(capsys, config):
    """The dry-run runs where no GPU is: data.decode=gpu passes for GPU nodes and is refused for CPU ones."""
    assert "#SBATCH --gpus-per-node=2" in dry_run(
        capsys, "pretrain", str(config), "data.decode=gpu", "--gpus-per-node", "2"
    )
    with pytest.raises(UserError, match="data.decode=gpu decodes with nvJPEG"):
        slurm.main(["pretrain", "--dry-run", str(config), "data.decode=gpu", "--gpus-per-node", "0"])
