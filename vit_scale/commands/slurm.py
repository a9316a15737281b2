"""`vit-scale slurm`: render sbatch scripts from the templates in slurm/ and a config, then submit them.

    vit-scale slurm pretrain CONFIG [key=value ...] --nodes N --gpus-per-node G [--partition P] [--time T]
                    [--account A] [--qos Q] [--constraint C] [--exclude NODES] [--mem M] [--dry-run]
                    [--gpu MODEL] [--force]
    vit-scale slurm finetune CONFIG [key=value ...] ...      (the same options)
    vit-scale slurm shards SOURCE --out DIR --array N ... [-- BUILD OPTIONS]
                    a job array: task I runs `vit-scale shards build SOURCE --out DIR --array-index I
                    --array-count N`; a follow-up job then runs `vit-scale shards merge-index DIR`
    vit-scale slurm vtab CONFIG [key=value ...] [--tasks a,b,...] ...
                    a job array, one task per VTAB-1k dataset; a follow-up job writes the table

`--dry-run` prints the scripts; otherwise they are written to RUN_DIR/slurm/ and submitted with sbatch.
For pretrain and finetune on GPUs whose model is known (`--gpu`, or a `--constraint` naming one), the job's
`vit-scale plan` is printed first (on stderr) and a job that will not fit is refused, with the largest
memory term and the `--fit` suggestion, unless `--force`.
Inside the job, launch/env.py turns SLURM_* into RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

Every value that reaches a script (paths, names, overrides, options) is checked first: a control character
is refused, shell lines get shell quoting and #SBATCH lines get sbatch's own (see `_sbatch_word`).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from vit_scale.commands.args import Parser
from vit_scale.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
KINDS = ("pretrain", "finetune", "shards", "vtab")

# SLURM's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# SLURM names and limits (partition, account, a100&ib, gpu[01-03], 64G) need no quoting: whitespace, quotes,
# a backslash or '#' in one is a typo, and sbatch would split the #SBATCH line there or end it as a comment.
_SAFE = re.compile(r"^[^\s'\"\\#]+$")
# What an #SBATCH word may hold without quotes.
_BARE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


@dataclass
class Job:
    """One script to submit; `after` makes it wait for the previous job of the plan ('afterok', ...)."""

    name: str  # file stem under RUN_DIR/slurm/
    script: str
    after: str = ""


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


def _text(option: str, value: str) -> str:
    """`value`, once it is known to be text a script can hold: no control character (a newline or CR would
    end the script's line and start a command of its own, a NUL cuts it), and encodable as UTF-8."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise UserError(
            f"{option} {value!r} holds the control character {bad!r}, which would break a line of the "
            "job script; rename it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{option} {value!r} is not valid UTF-8 text; rename it") from None
    return value


def _safe(option: str, value: str) -> str:
    _text(option, value)
    if not _SAFE.match(value):
        raise UserError(
            f"{option} {value!r} has whitespace, quotes, a backslash or '#', which an #SBATCH line cannot hold"
        )
    return value


def _job_name(option: str, value: str) -> str:
    # SLURM puts the job name into the log's file name (%x): a '/' would move the log to another directory.
    if "/" in _text(option, value):
        raise UserError(
            f"{option} {value!r} holds '/', but SLURM names the job's log file after the job (%x), which would "
            "put the log in another directory; give a --job-name without one"
        )
    return value


def _sbatch_word(value: str) -> str:
    """`value` as one word of an #SBATCH line. sbatch reads these lines itself, not through a shell: it splits
    them at whitespace, ends them at an unquoted '#', and honours quotes and backslash escapes (the escape
    also inside quotes), so a double-quoted word with '\\' and '"' escaped reads back as `value`."""
    if _BARE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _log_dir(option: str, path: Path) -> str:
    """The directory of a job's log as an #SBATCH --output prefix. --output is a file name pattern (%j, %x):
    a literal '%' is written '%%', and a backslash turns every pattern off, so it cannot be written at all."""
    if "\\" in str(path):
        raise UserError(
            f"{option} {str(path)!r} holds a backslash, which SLURM's --output cannot hold (it turns off the "
            "%j in the log's name); choose a path without one"
        )
    return _sbatch_word(str(path / "slurm").replace("%", "%%"))


def build_parser(kind: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"vit-scale slurm {kind}", description=__doc__.split("\n\n")[0])
    if kind == "shards":
        p.add_argument("source", help="image corpus, as for `vit-scale shards build`")
        p.add_argument("--out", required=True, help="shard directory; the parts go to OUT/part-*/")
        p.add_argument("--array", type=int, required=True, help="number of array tasks (parts)")
        p.add_argument("build_args", nargs="*", help="after --: more `vit-scale shards build` options")
    else:
        p.add_argument("config", help="recipe YAML")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed on to the job")
        p.add_argument("--run-dir", help="run directory (default: the config's run.dir)")
    if kind in ("pretrain", "finetune"):
        p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
        p.add_argument(
            "--gpus-per-node",
            type=int,
            default=None,
            help="GPUs per node, one rank each; 0 for CPU-only nodes (one rank per node)",
        )
        p.add_argument(
            "--signal-seconds",
            type=int,
            default=300,
            help="SIGUSR1 this many seconds before the time limit, to checkpoint (default 300)",
        )
        p.add_argument("--gpu", help="GPU model for the memory check (`vit-scale plan --help` lists them); "
                       "default: the one --constraint names, if it names one")
        p.add_argument("--force", action="store_true", help="queue the job even if the plan says it will not fit")
    else:
        p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per array task (default 0)")
    if kind == "vtab":
        p.add_argument("--tasks", help="comma-separated VTAB-1k datasets (default: all 19)")
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
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch scripts instead of submitting them"
    )
    return p


def render_template(name: str, values: dict[str, object]) -> str:
    text = (TEMPLATES / f"{name}.sbatch").read_text()
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if missing:
        raise KeyError(f"slurm/{name}.sbatch needs values for {', '.join(missing)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)


def _resources(args, gpus: int) -> str:
    lines = [f"--gpus-per-node={gpus}"] if gpus else []
    for option in ("partition", "time", "account", "qos", "constraint", "exclude", "mem"):
        value = getattr(args, option)
        if value:
            lines.append(f"--{option}={_safe('--' + option, value)}")
    return (
        "\n".join(f"#SBATCH {line}" for line in lines)
        or "# (no GPUs, partition, time limit or account given)"
    )


def _vit_scale(*args: str) -> str:
    """The command line that runs `vit-scale ARGS` with this very interpreter (the user's environment)."""
    python = _text("the Python interpreter's path", sys.executable)
    return " ".join([shlex.quote(python), "-m", "vit_scale.cli", *args])


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _words(option: str, values: list[str]) -> list[str]:
    """`values` (overrides, build options) as shell words for the job's command line."""
    return [shlex.quote(_text(option, v)) for v in values]


def _cpus(args, workers: int) -> int:
    cpus = args.cpus_per_task if args.cpus_per_task is not None else workers + 1
    if cpus < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {cpus}")
    return cpus


def _config(args, kind: str, world_size: int, gpus: int):
    """The config as the job will load it, through the validation pass the job's ranks will run, for the
    job's world size and GPUs, before anything is queued."""
    from vit_scale.config import load_config, validate

    cfg = load_config(_text("CONFIG", args.config), args.overrides)
    validate(cfg, world_size, kind, cuda=gpus > 0)
    return cfg


def _check_fits(cfg, args, gpus: int) -> None:
    """Print the job's plan (stderr, so a --dry-run script on stdout stays a script) and refuse a job that
    will not fit on its GPUs, unless --force."""
    from vit_scale.plan import cluster, fit, gpu_from_constraint, lookup, make_plan
    from vit_scale.plan.text import render

    name = args.gpu or (gpu_from_constraint(args.constraint) if args.constraint else None)
    if name is None:
        print("vit-scale slurm: no memory check: give --gpu (or a --constraint naming one GPU model)", file=sys.stderr)
        return
    cl = cluster(lookup(name), args.nodes, gpus)
    p = make_plan(cfg, cl).to_dict()
    print(render(p) + "\n", file=sys.stderr)
    if p["fits"] or args.force:
        return
    found = fit(cfg, cl)
    suggestion = (f"`vit-scale plan --fit` suggests: {' '.join(found[1])}" if found
                  else f"nothing fits on {cl.world} x {name}: use more or larger GPUs")
    print(suggestion, file=sys.stderr)
    largest = next(r for r in p["memory"] if r["label"] == p["offending"])
    raise UserError(
        f"the job will not fit: {p['offending']} ({largest['gib']:.1f} GiB) brings the total to "
        f"{p['total_gib']:.1f} GiB per GPU on {name} ({p['capacity_gib']:g} GiB); {suggestion}; or pass --force"
    )


def _run_dir(args, cfg) -> tuple[Path, str]:
    """The job's run directory, resolved, and the #SBATCH --output prefix of its logs (RUN_DIR/slurm)."""
    option = "--run-dir" if args.run_dir else "run.dir"
    run_dir = Path(_text(option, args.run_dir or cfg.run.dir)).resolve()
    return run_dir, _log_dir(option, run_dir)


def _recipe(args) -> list[str]:
    """CONFIG and the overrides as the job's command line passes them on. Called after the validation pass,
    so that a setting the job would refuse is refused with the job's own message."""
    return [_q(Path(args.config).resolve()), *_words("override", args.overrides)]


def plan(kind: str, args) -> tuple[list[Job], Path]:
    """The scripts to submit, in order, and the directory whose slurm/ folder holds them and the logs."""
    from vit_scale.train.preempt import REQUEUE_EXIT_CODE

    gpus = args.gpus_per_node
    if gpus is None:
        raise UserError(f"give --gpus-per-node (0 for CPU-only nodes) to `vit-scale slurm {kind}`")
    if gpus < 0:
        raise UserError(f"--gpus-per-node must be 0 or more, got {gpus}")
    seconds = time_limit_seconds(_safe("--time", args.time)) if args.time else None
    workdir = _sbatch_word(_text("the working directory", str(Path.cwd())))
    common = dict(workdir=workdir, resources=_resources(args, gpus))
    follow_up = dict(common, resources=_resources(args, 0))  # merging indexes or a table needs no GPU
    if args.job_name is not None:
        _job_name("--job-name", args.job_name)

    if kind in ("pretrain", "finetune"):
        if args.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {args.nodes}")
        if args.signal_seconds < 1:
            raise UserError(f"--signal-seconds must be positive, got {args.signal_seconds}")
        if seconds is not None and args.signal_seconds >= seconds:
            raise UserError(
                f"--signal-seconds {args.signal_seconds} is not shorter than --time {args.time} ({seconds} s): "
                "the job would be told to stop as it starts; lower --signal-seconds or raise --time"
            )
        tasks_per_node = max(gpus, 1)
        cfg = _config(args, kind, args.nodes * tasks_per_node, gpus)
        if gpus:
            _check_fits(cfg, args, gpus)
        recipe = _recipe(args)
        run_dir, log_dir = _run_dir(args, cfg)
        name = args.job_name or _job_name("run.name (the default --job-name)", cfg.run.name)
        script = render_template(
            kind,
            dict(
                common,
                job_name=_sbatch_word(name),
                nodes=args.nodes,
                tasks_per_node=tasks_per_node,
                cpus_per_task=_cpus(args, cfg.data.workers),
                signal_seconds=args.signal_seconds,
                requeue_code=REQUEUE_EXIT_CODE,
                run_dir=_q(run_dir),
                log_dir=log_dir,
                command=_vit_scale(kind, *recipe, "--run-dir", _q(run_dir)),
            ),
        )
        return [Job(kind, script)], run_dir

    if kind == "vtab":
        from vit_scale.evaluate.vtab import TASKS

        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else list(TASKS)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise UserError(f"--tasks names unknown VTAB-1k datasets {unknown}; known: {', '.join(TASKS)}")
        from vit_scale.config import load_config
        from vit_scale.evaluate.vtab import check_tasks

        cfg = load_config(_text("CONFIG", args.config), args.overrides)
        check_tasks(cfg, cfg.eval.vtab_data, tasks, False, max(gpus, 1), cuda=gpus > 0)  # as each array task
        recipe = _recipe(args)
        run_dir, log_dir = _run_dir(args, cfg)
        name = args.job_name or _job_name("run.name (the default --job-name)", f"{cfg.run.name}-vtab")
        array = render_template(
            "vtab",
            dict(
                common,
                job_name=_sbatch_word(name),
                tasks_per_node=max(gpus, 1),
                cpus_per_task=_cpus(args, cfg.data.workers),
                run_dir=_q(run_dir),
                log_dir=log_dir,
                array_size=len(tasks),
                array_last=len(tasks) - 1,
                tasks=" ".join(tasks),
                command=_vit_scale(
                    "vtab", *recipe, "--task", '"$task"', "--run-dir", f'{_q(run_dir)}/"$task"'
                ),
            ),
        )
        collect = render_template(
            "collect",
            dict(
                follow_up,
                job_name=_sbatch_word(f"{name}-table"),
                log_dir=log_dir,
                what="the VTAB-1k table",
                command=_vit_scale("vtab", *recipe, "--collect", "--run-dir", _q(run_dir)),
            ),
        )
        # afterany: a table of the tasks that finished is still worth having when one task failed.
        return [Job("vtab", array), Job("vtab_table", collect, after="afterany")], run_dir

    if args.array < 1:
        raise UserError(f"--array must be at least 1, got {args.array}")
    out = Path(_text("--out", args.out)).resolve()
    log_dir = _log_dir("--out", out)
    name = args.job_name or f"shards-{out.name}"
    build = _vit_scale(
        "shards",
        "build",
        shlex.quote(_text("SOURCE", args.source)),
        "--out",
        _q(out),
        "--array-index",
        '"$SLURM_ARRAY_TASK_ID"',
        "--array-count",
        str(args.array),
        "--no-progress",
        *_words("build option", args.build_args),
    )
    array = render_template(
        "shards",
        dict(
            common,
            job_name=_sbatch_word(name),
            cpus_per_task=_cpus(args, 0),
            out=_q(out),
            log_dir=log_dir,
            array_size=args.array,
            array_last=args.array - 1,
            command=build,
        ),
    )
    merge = render_template(
        "collect",
        dict(
            follow_up,
            job_name=_sbatch_word(f"{name}-merge"),
            log_dir=log_dir,
            what=f"the part indexes into {out}/index.json",
            command=_vit_scale("shards", "merge-index", _q(out)),
        ),
    )
    return [Job("shards", array), Job("shards_merge", merge, after="afterok")], out


def submit(jobs: list[Job], run_dir: Path) -> list[int]:
    """Write each script into RUN_DIR/slurm/ and submit it, chaining dependencies; the job ids."""
    from vit_scale.io import atomic_write_text

    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch is not on PATH: run this on a SLURM login node, or add --dry-run to see the script"
        )
    ids: list[int] = []
    for job in jobs:
        path = run_dir / "slurm" / f"{job.name}.sbatch"
        atomic_write_text(path, job.script)  # also creates RUN_DIR/slurm, where the job's log goes
        cmd = ["sbatch", "--parsable"]
        if job.after:
            cmd.append(f"--dependency={job.after}:{ids[-1]}")
        out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise UserError(f"sbatch refused {path}: {out.stderr.strip() or out.stdout.strip()}")
        ids.append(int(out.stdout.strip().split(";")[0]))
    return ids


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    args = build_parser(kind).parse_intermixed_args(rest)
    jobs, run_dir = plan(kind, args)
    if args.dry_run:
        print("\n".join(job.script for job in jobs), end="")
        return 0
    ids = submit(jobs, run_dir)
    logs = run_dir / "slurm"
    lines = [f"submitted job {ids[0]}" + "".join(f" (then job {i})" for i in ids[1:])]
    lines.append(f"run directory: {run_dir}")
    lines.append(f"follow it:     squeue -j {','.join(map(str, ids))}; tail -f {logs}/*-{ids[0]}*.out")
    if kind in ("pretrain", "finetune"):
        lines.append(f"report:        vit-scale report {run_dir}")
    print("\n".join(lines))
    return 0
