"""Issue 16 §2 on the real cluster: scripts rendered for odd paths and names, read by the real sbatch and
run by the real slurmd and srun.

The working directory, run directory and job name hold spaces, quotes, `$(...)`, `;`, `#` and `%`. The job's
interpreter is a recorder (the command's `sys.executable`), so the jobs run in a second and show what
arguments reached them. SLURM must put the log where the path says (sbatch unquotes the #SBATCH line, and
--output's `%` patterns must not eat the `%` of the path), start in the working directory, hand the
recorder exactly the arguments given, and no payload may run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from vit_scale.commands import slurm

pytestmark = pytest.mark.slurm

ODD = "a b'c\"d $(touch pwned_subst) `touch pwned_tick` #e %j%x;f"
TINY = {
    "model": {
        "variant": "vit_ti16",
        "depth": 2,
        "width": 32,
        "heads": 2,
        "mlp": 64,
        "img_size": 32,
        "patch": 8,
    },
    "train": {"steps": 10, "global_batch": 24},
    "data": {"workers": 0},
}
RECORDER = """#!/bin/bash
{{ pwd; printf '%s\\0' "$0" "$@"; }} > "{out}/call-$SLURM_JOB_ID-${{SLURM_ARRAY_TASK_ID:-x}}-$SLURM_PROCID"
"""


def _recorder(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "calls"
    calls.mkdir()
    python = tmp_path / f"bin {ODD}" / "python"
    python.parent.mkdir()
    python.write_text(RECORDER.format(out=calls))
    python.chmod(0o755)
    return python, calls


def _calls(calls: Path) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for f in sorted(calls.iterdir()):
        cwd, _, argv = f.read_text().partition("\n")
        out[f.name.split("-", 2)[2]] = (cwd, argv.split("\0")[:-1])
    return out


def _no_payload_ran(tmp_path: Path) -> None:
    ran = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f.startswith("pwned")]
    assert not ran, ran


def _submit(cluster, monkeypatch, python: Path, cwd: Path, argv: list[str]) -> list[int]:
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(cwd)
    kind = argv[0]
    args = slurm.build_parser(kind).parse_intermixed_args(argv[1:])
    jobs, run_dir = slurm.plan(kind, args)
    return slurm.submit(jobs, run_dir)


def test_pretrain_script_with_odd_paths_runs_as_written(slurm_cluster, tmp_path, monkeypatch):
    python, calls = _recorder(tmp_path)
    cwd = tmp_path / f"work {ODD}"
    cwd.mkdir()
    config = tmp_path / f"recipe {ODD}.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / f"run {ODD}"
    name = "odd 'job' #1 %j"
    override = f"logging.project=p {ODD}"
    (job,) = _submit(
        slurm_cluster,
        monkeypatch,
        python,
        cwd,
        [
            "pretrain",
            str(config),
            override,
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--run-dir",
            str(run_dir),
            "--job-name",
            name,
        ],
    )
    info = slurm_cluster.wait_done(job, timeout=60)
    log = run_dir / "slurm" / f"{name}-{job}.out"
    assert log.is_file(), (sorted(p.name for p in (run_dir / "slurm").iterdir()), slurm_cluster.log_tail())
    assert info["JobState"] == "COMPLETED", log.read_text()
    assert f"vit-scale: job {job} " in log.read_text()
    expected = [
        str(python),
        "-m",
        "vit_scale.cli",
        "pretrain",
        str(config),
        override,
        "--run-dir",
        str(run_dir),
    ]
    assert _calls(calls) == {"x-0": (str(cwd), expected), "x-1": (str(cwd), expected)}
    _no_payload_ran(tmp_path)


def test_vtab_array_and_table_with_odd_paths_run_as_written(slurm_cluster, tmp_path, monkeypatch):
    python, calls = _recorder(tmp_path)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({**TINY, "run": {"name": f"v {ODD}"}}))
    weights = tmp_path / f"w {ODD}.pt"
    weights.write_bytes(b"")
    root = tmp_path / f"vtab {ODD}"
    for split in ("train800val200", "test"):
        (root / "dtd" / split).mkdir(parents=True)
    run_dir = tmp_path / f"runs {ODD}"
    recipe = [str(config), f"init={weights}", f"eval.vtab_data={root}"]
    array, table = _submit(
        slurm_cluster,
        monkeypatch,
        python,
        tmp_path,
        [
            "vtab",
            *recipe,
            "--tasks",
            "dtd",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--run-dir",
            str(run_dir),
        ],
    )
    info = slurm_cluster.wait_done(table, timeout=90)
    logs = sorted(p.name for p in (run_dir / "slurm").glob("*.out"))
    name = f"v {ODD}-vtab"
    assert logs == sorted([f"{name}-{array}_0.out", f"{name}-table-{table}.out"]), logs
    assert info["JobState"] == "COMPLETED" and slurm_cluster.job(array)["JobState"] == "COMPLETED"
    cli = [str(python), "-m", "vit_scale.cli", "vtab", *recipe]
    assert _calls(calls) == {
        "0-0": (str(tmp_path), [*cli, "--task", "dtd", "--run-dir", f"{run_dir}/dtd"]),
        "x-0": (str(tmp_path), [*cli, "--collect", "--run-dir", str(run_dir)]),
    }
    _no_payload_ran(tmp_path)
