"""`vit-scale slurm pretrain|finetune` runs `vit-scale plan` for the job's GPUs before queueing: the plan goes
to stderr (a --dry-run script on stdout stays a script), a job that will not fit is refused with the term
that breaks it and the --fit suggestion, and --force queues it anyway."""

import re
from pathlib import Path

import pytest

from vit_scale.cli import main as cli_main
from vit_scale.commands import slurm
from vit_scale.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
H14 = str(ROOT / "configs" / "pretrain" / "vit_h14_jft.yaml")
TINY = """\
model: {variant: vit_ti16, depth: 2, width: 32, heads: 2, mlp: 64, img_size: 32, patch: 8}
train: {steps: 10, global_batch: 24}
run: {name: tiny}
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def test_dry_run_prints_the_plan_above_the_script(capsys, config):
    assert slurm.main(["pretrain", config, "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--gpu", "h100-80gb"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("#!/bin/bash\n")  # the script alone on stdout
    assert "on 2 node(s) x 4 h100-80gb (8 GPUs)" in captured.err
    assert re.search(r"total +[0-9.]+  of 79.1 GiB: fits", captured.err)
    assert "Time per optimizer step" in captured.err


def test_a_constraint_naming_one_gpu_model_selects_the_plan(capsys, config):
    slurm.main(["pretrain", config, "--dry-run", "--gpus-per-node", "8", "--constraint", "a100-80gb&ib"])
    assert "8 a100-80gb (8 GPUs)" in capsys.readouterr().err
    slurm.main(["pretrain", config, "--dry-run", "--gpus-per-node", "8", "--constraint", "a100|h100"])
    err = capsys.readouterr().err
    assert "no memory check: give --gpu" in err and "Memory per GPU" not in err


def test_cpu_only_jobs_are_not_planned(capsys, config):
    slurm.main(["pretrain", config, "--dry-run", "--gpus-per-node", "0", "--gpu", "h100-80gb"])
    assert capsys.readouterr().err == ""


def test_a_job_that_will_not_fit_is_refused_with_the_offending_term_and_the_fit(capsys):
    """The H/14 recipe on one node of eight 80 GB GPUs derives a micro batch of 512 per GPU."""
    argv = ["pretrain", H14, "--dry-run", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "a100-80gb"]
    with pytest.raises(UserError) as e:
        slurm.main(argv)
    message = str(e.value)
    assert message.startswith("the job will not fit: activations saved for backward (micro batch 512) (")
    assert "GiB per GPU on a100-80gb (79.2 GiB)" in message and message.endswith("or pass --force")
    assert "`vit-scale plan --fit` suggests: parallel.zero_stage=" in message
    assert "train.micro_batch_per_rank=" in message
    captured = capsys.readouterr()
    assert captured.out == ""  # no script: nothing would be queued
    assert "DOES NOT FIT: activations saved for backward (micro batch 512) is the largest term" in captured.err
    assert "allocated peak (torch.cuda.max_memory_allocated)" in captured.err  # the breakdown

    # the suggestion, applied, is accepted
    suggested = message.split("suggests: ")[1].split(";")[0].split()
    assert slurm.main([argv[0], H14, *suggested, *argv[2:]]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash\n")

    # --force queues it anyway, and the cli turns the refusal into one line and exit 2
    assert slurm.main([*argv, "--force"]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash\n")
    assert cli_main(["slurm", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vit-scale slurm: error: the job will not fit: activations saved for backward")


def test_an_unknown_gpu_is_a_one_line_error(config):
    with pytest.raises(UserError, match=re.escape("unknown GPU 'v100'; known: a100-40gb")):
        slurm.main(["pretrain", config, "--dry-run", "--gpus-per-node", "8", "--gpu", "v100"])
