"""`vit-scale slurm`: render an sbatch script from a template in slurm/ and a config, then submit it.

    vit-scale slurm pretrain CONFIG [key=value ...] --nodes N --gpus-per-node G [--partition P] [--time T]
                    [--account A] [--qos Q] [--constraint C] [--exclude NODES] [--dry-run]
    vit-scale slurm finetune CONFIG ...                 (same options)
    vit-scale slurm shards --array N [options] -- ARGS  (a job array; each task runs `vit-scale shards ARGS`)
    vit-scale slurm vtab CONFIG [--tasks a,b,...] ...   (a job array, one task per VTAB dataset)

`--dry-run` prints the script; otherwise it is written to RUN_DIR/slurm/ and submitted with sbatch.
The ranks inside the job find their place through launch/env.py (SLURM_* -> RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from vit_scale.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"
KINDS = ("pretrain", "finetune", "shards", "vtab")
# The exit code a rank uses after committing a checkpoint on SIGUSR1/SIGTERM or before the time limit.
# It mirrors vit_scale.train's constant (checked by tests/unit/test_slurm_render.py) so rendering needs no torch.
REQUEUE_EXIT_CODE = 75
# VTAB-1k's 19 datasets (natural, specialized, structured), the array tasks of `vit-scale slurm vtab`.
VTAB_TASKS = (
    "caltech101",
    "cifar100",
    "dtd",
    "oxford_flowers102",
    "oxford_iiit_pet",
    "sun397",
    "svhn",
    "patch_camelyon",
    "eurosat",
    "resisc45",
    "diabetic_retinopathy",
    "clevr_count",
    "clevr_dist",
    "dmlab",
    "kitti_dist",
    "dsprites_loc",
    "dsprites_ori",
    "smallnorb_azi",
    "smallnorb_elev",
)

# SLURM's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# #SBATCH lines are not shell-parsed, so a value may hold SLURM's own syntax (a100&ib, gpu[01-03]) but no
# whitespace or quotes, which would end or garble the option.
_SAFE = re.compile(r"^[^\s'\"\\]+$")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see `vit-scale slurm {self.prog.split()[-1]} --help`)")


def time_limit_seconds(text: str) -> int:
    """Seconds in a SLURM --time value; UserError when SLURM would not accept it."""
    m = _TIME.match(text)
    if not m:
        raise UserError(
            f"--time {text!r} is not a SLURM time limit; use MINUTES, HH:MM:SS or DAYS-HH:MM:SS (e.g. 2-00:00:00)"
        )
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((int(days) * 24 + a) * 60 + b) * 60 + c
    if m.group(4) is not None:  # hours:minutes:seconds
        return (a * 60 + b) * 60 + c
    return a * 60 + b  # minutes[:seconds]


def _safe(option: str, value: str) -> str:
    if not _SAFE.match(value):
        raise UserError(f"{option} {value!r} has whitespace or quotes, which an #SBATCH line cannot hold")
    return value


def _common_options(p: argparse.ArgumentParser, array: bool) -> None:
    if not array:
        p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
        p.add_argument(
            "--gpus-per-node",
            type=int,
            default=None,
            help="GPUs per node, one rank each; 0 for CPU-only nodes (one rank per node)",
        )
    else:
        p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per array task (default 0)")
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        help="CPUs per rank (default: data.workers + 1, for the data loader workers)",
    )
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00; the trainer checkpoints before it")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--exclude", help="nodes to avoid, e.g. gpu[01-03],gpu07")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--job-name", help="job name (default: the run name)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")


def build_parser(kind: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"vit-scale slurm {kind}", description=__doc__.split("\n\n")[0])
    if kind in ("pretrain", "finetune", "vtab"):
        p.add_argument("config", help="recipe YAML")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed on to the job")
        p.add_argument("--run-dir", help="run directory (default: the config's run.dir)")
    if kind in ("pretrain", "finetune"):
        _common_options(p, array=False)
        p.add_argument(
            "--signal-seconds",
            type=int,
            default=300,
            help="SIGUSR1 this many seconds before the time limit, to checkpoint (default 300)",
        )
    elif kind == "vtab":
        _common_options(p, array=True)
        p.add_argument("--tasks", help="comma-separated VTAB datasets (default: all 19)")
    else:
        _common_options(p, array=True)
        p.add_argument("--array", type=int, required=True, help="number of array tasks")
        p.add_argument("--run-dir", required=True, help="directory for the job's script and logs")
        p.add_argument(
            "args",
            nargs=argparse.REMAINDER,
            help="after --: the `vit-scale shards` arguments; {task} and {tasks} become the "
            "array index and the task count",
        )
    return p


def render_template(name: str, values: dict[str, object]) -> str:
    text = (TEMPLATES / f"{name}.sbatch").read_text()
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if missing:
        raise KeyError(f"slurm/{name}.sbatch needs values for {', '.join(missing)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)


def _resources(args, gpus: int) -> str:
    lines = []
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    for option in ("partition", "time", "account", "qos", "constraint", "exclude", "mem"):
        value = getattr(args, option)
        if value:
            lines.append(f"--{option}={_safe('--' + option, value)}")
    return "\n".join(f"#SBATCH {line}" for line in lines) or "# (no partition, time limit or account given)"


def _python() -> str:
    return shlex.quote(sys.executable)


def _config(args, world_size: int | None):
    from vit_scale.config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size)
    return cfg


def _cpus(args, cfg) -> int:
    cpus = args.cpus_per_task if args.cpus_per_task is not None else (cfg.data.workers + 1 if cfg else 1)
    if cpus < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {cpus}")
    return cpus


def render(kind: str, args) -> tuple[str, Path]:
    """The sbatch script for `kind` and the run directory it writes into."""
    gpus = args.gpus_per_node
    if gpus is None:
        raise UserError(f"give --gpus-per-node (0 for CPU-only nodes) to `vit-scale slurm {kind}`")
    if gpus < 0:
        raise UserError(f"--gpus-per-node must be 0 or more, got {gpus}")
    seconds = time_limit_seconds(args.time) if args.time else None
    common = dict(
        workdir=shlex.quote(str(Path.cwd())), resources=_resources(args, gpus), requeue_code=REQUEUE_EXIT_CODE
    )

    if kind in ("pretrain", "finetune"):
        if args.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {args.nodes}")
        if args.signal_seconds < 1:
            raise UserError(f"--signal-seconds must be positive, got {args.signal_seconds}")
        if seconds is not None and args.signal_seconds >= seconds:
            raise UserError(
                f"--signal-seconds {args.signal_seconds} is not shorter than --time {args.time} ({seconds} s): "
                "the job would be signalled before it starts; lower --signal-seconds or raise --time"
            )
        tasks_per_node = max(gpus, 1)
        cfg = _config(args, args.nodes * tasks_per_node)
        run_dir = Path(args.run_dir or cfg.run.dir).resolve()
        command = [
            _python(),
            "-m",
            "vit_scale.cli",
            kind,
            shlex.quote(str(Path(args.config).resolve())),
            *map(shlex.quote, args.overrides),
            "--run-dir",
            shlex.quote(str(run_dir)),
        ]
        return render_template(
            kind,
            dict(
                common,
                job_name=_safe("--job-name", args.job_name or cfg.run.name),
                nodes=args.nodes,
                tasks_per_node=tasks_per_node,
                cpus_per_task=_cpus(args, cfg),
                signal_seconds=args.signal_seconds,
                run_dir=shlex.quote(str(run_dir)),
                command=" ".join(command),
            ),
        ), run_dir

    if kind == "vtab":
        known = VTAB_TASKS
        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else list(known)
        unknown = [t for t in tasks if t not in known]
        if unknown or not tasks:
            raise UserError(f"--tasks names unknown VTAB datasets {unknown}; known: {', '.join(known)}")
        cfg = _config(args, max(gpus, 1))
        run_dir = Path(args.run_dir or cfg.run.dir).resolve()
        command = [
            _python(),
            "-m",
            "vit_scale.cli",
            "vtab",
            shlex.quote(str(Path(args.config).resolve())),
            *map(shlex.quote, args.overrides),
            "--task",
            '"$task"',
            "--run-dir",
            shlex.quote(str(run_dir)) + '/"$task"',
        ]
        return render_template(
            "vtab",
            dict(
                common,
                job_name=_safe("--job-name", args.job_name or f"{cfg.run.name}-vtab"),
                tasks_per_node=max(gpus, 1),
                cpus_per_task=_cpus(args, cfg),
                run_dir=shlex.quote(str(run_dir)),
                array_size=len(tasks),
                array_last=len(tasks) - 1,
                tasks=" ".join(tasks),
                command=" ".join(command),
            ),
        ), run_dir

    if args.array < 1:
        raise UserError(f"--array must be at least 1, got {args.array}")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not rest:
        raise UserError(
            "give the `vit-scale shards` arguments after --, e.g. -- build SRC OUT --part {task}/{tasks}"
        )
    run_dir = Path(args.run_dir).resolve()
    # Quote each argument for the shell but let {task}/{tasks} expand inside the job.
    quoted = [
        shlex.quote(a).replace("{task}", "'\"$task\"'").replace("{tasks}", "'\"$tasks\"'") for a in rest
    ]
    command = [_python(), "-m", "vit_scale.cli", "shards", *quoted]
    return render_template(
        "shards",
        dict(
            common,
            job_name=_safe("--job-name", args.job_name or "shards"),
            cpus_per_task=_cpus(args, None),
            run_dir=shlex.quote(str(run_dir)),
            array_size=args.array,
            array_last=args.array - 1,
            command=" ".join(command),
        ),
    ), run_dir


def submit(script: str, run_dir: Path, kind: str) -> int:
    """Write the script into RUN_DIR/slurm/ and submit it; the job id."""
    from vit_scale.io import atomic_write_text

    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch is not on PATH: run this on a SLURM login node, or add --dry-run to see the script"
        )
    path = run_dir / "slurm" / f"{kind}.sbatch"
    atomic_write_text(path, script)  # also creates RUN_DIR/slurm, where the job's log goes
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise UserError(f"sbatch refused {path}: {out.stderr.strip() or out.stdout.strip()}")
    return int(out.stdout.strip().split(";")[0])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    parser = build_parser(kind)
    args = parser.parse_args(rest) if kind == "shards" else parser.parse_intermixed_args(rest)
    script, run_dir = render(kind, args)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = submit(script, run_dir, kind)
    log = run_dir / "slurm" / (f"*-{job_id}.out" if kind in ("pretrain", "finetune") else f"*-{job_id}_*.out")
    print(
        f"submitted job {job_id}\nrun directory: {run_dir}\n"
        f"follow it:     squeue -j {job_id}; tail -f {log}\n"
        f"report:        vit-scale report {run_dir}"
    )
    return 0
