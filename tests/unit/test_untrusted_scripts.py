"""Issue 16 §2: nothing injectable in the sbatch scripts `vit-scale slurm` renders.

Every field that reaches a script (working directory, interpreter, config path, overrides, run directory,
run.dir / run.name of the recipe, job name, SLURM options, the shards source, --out and build options) is set
in turn to a payload: control characters, `$(...)`, backticks, quotes, `;`, `#`, `%` and a backslash. A
control character must be refused with one line (exit 2) naming the field. Anything else is either refused
the same way or rendered so that `bash -n` accepts the script, sbatch's own reading of the #SBATCH lines
gives the value back, and running the script (stub `srun`, `scontrol`, `sbatch` on PATH, a recorder as
the interpreter) hands the job's command exactly the arguments given, and creates no payload's marker file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from vit_scale.cli import main as cli_main

# Each shell payload tries to create ./pwned_<name> in the directory the script runs in.
CONTROL = {
    "newline": "a\ntouch pwned_newline #",
    "cr": "a\rtouch pwned_cr #",
    "nul": "a\x00touch pwned_nul",
    "escape": "a\x1b[2Jtouch pwned_escape",  # another C0 control
    "nel": "a\x85touch pwned_nel",  # C1: NEXT LINE
    "del": "a\x7ftouch pwned_del",
    "not_utf8": "a\udcfftouch pwned_not_utf8",  # an undecodable byte of a file name, as Python passes it on
}
SHELL = {
    "subst": "a$(touch pwned_subst)",
    "backtick": "a`touch pwned_backtick`",
    "single_quote": "a'; touch pwned_single_quote; '",
    "double_quote": 'a"; touch pwned_double_quote; "',
    "semicolon": "a; touch pwned_semicolon",
    "hash": "a #b; touch pwned_hash",
    "percent": "a%x%j%%",  # SLURM's --output patterns
    "backslash": 'a\\"; touch pwned_backslash',
}
PAYLOADS = {**CONTROL, **SHELL}

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
    "data": {"workers": 1},
    "run": {"name": "tiny"},
}
SLURM_OPTIONS = ("--partition", "--account", "--qos", "--constraint", "--exclude", "--mem", "--time")


# ------------------------------------------------------------------ sbatch's reading of #SBATCH lines

C_SPACE = " \t\n\v\f\r"


def sbatch_options(script: str) -> list[str]:
    """The words sbatch takes from a script's #SBATCH lines: SLURM 22.05's _opt_batch_script and
    get_argument (src/sbatch/opt.c), line by line. Reading stops at the first line that is not a comment;
    words split at whitespace outside quotes; a backslash escapes the next character, also inside quotes;
    an unquoted '#' ends the line; an unmatched quote is fatal."""
    words = []
    for line in script.split("\n"):
        line = line.split("\0", 1)[0]  # C strings
        if not line.startswith("#SBATCH"):
            stripped = line.lstrip(C_SPACE)
            if stripped and not stripped.startswith("#"):
                break
            continue
        rest, i = line[len("#SBATCH") :], 0
        while True:
            while i < len(rest) and rest[i] in C_SPACE:
                i += 1
            word, quoted, quote, escape = [], False, "", False
            while i < len(rest) and (quoted or rest[i] not in C_SPACE):
                c = rest[i]
                if escape:
                    escape = False
                elif c == "\\":
                    escape, i = True, i + 1
                    continue
                elif quoted:
                    if c == quote:
                        quoted, i = False, i + 1
                        continue
                elif c in "\"'":
                    quoted, quote, i = True, c, i + 1
                    continue
                elif c == "#":
                    break
                word.append(c)
                i += 1
            if quoted:
                raise AssertionError(f"sbatch: unmatched {quote} in {line!r}")
            if not word:
                break
            words.append("".join(word))
    return words


def sbatch_values(script: str) -> dict[str, str]:
    out = {}
    for word in sbatch_options(script):
        key, _, value = word.partition("=")
        assert key not in out, f"{key} given twice: {sbatch_options(script)}"
        out[key] = value
    return out


def test_the_sbatch_reader_follows_slurm():
    script = '#!/bin/bash\n# c\n#SBATCH --a="x y"/z --b=\'q"r\' #c\n#SBATCH --c="s\\\\t\\"u"\necho\n#SBATCH --d=1\n'
    assert sbatch_options(script) == ["--a=x y/z", '--b=q"r', '--c=s\\t"u']


# ------------------------------------------------------------------ one job, one field set to a payload


@dataclass
class Job:
    """What `vit-scale slurm KIND` is given, and so what the scripts must hold."""

    kind: str
    tmp: Path
    cwd: Path
    python: str
    config: Path | None = None
    recipe: dict = field(default_factory=lambda: yaml.safe_load(yaml.safe_dump(TINY)))
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None
    job_name: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    source: str = "corpus"
    out: str = ""
    build_args: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # options that are not #SBATCH lines

    def argv(self) -> list[str]:
        argv = ["slurm", self.kind]
        if self.kind == "shards":
            argv += [self.source, "--out", self.out, "--array", "2"]
        else:
            argv += [str(self.config), *self.overrides, "--gpus-per-node", "0"]
            if self.run_dir is not None:
                argv += ["--run-dir", self.run_dir]
        if self.job_name is not None:
            argv += ["--job-name", self.job_name]
        for option, value in self.options.items():
            argv += [option, value]
        argv += [*self.extra, "--dry-run"]
        if self.kind == "shards":
            argv += ["--", *self.build_args]
        return argv

    # what the scripts must say

    def resolved_run_dir(self) -> Path:
        if self.kind == "shards":
            return (self.cwd / self.out).resolve()
        return (
            self.cwd / (self.run_dir or self.recipe["run"].get("dir") or f"runs/{self.recipe['run']['name']}")
        ).resolve()

    def name(self) -> str:
        if self.job_name is not None:
            return self.job_name
        if self.kind == "shards":
            return f"shards-{self.resolved_run_dir().name}"
        return self.recipe["run"]["name"] + ("-vtab" if self.kind == "vtab" else "")

    def commands(self) -> list[list[str]]:
        """The argv each script's job command must receive (the first array task for arrays)."""
        cli = [self.python, "-m", "vit_scale.cli"]
        run_dir = str(self.resolved_run_dir())
        if self.kind == "shards":
            build = [
                "shards",
                "build",
                self.source,
                "--out",
                run_dir,
                "--array-index",
                "0",
                "--array-count",
                "2",
            ]
            return [
                cli + build + ["--no-progress", *self.build_args],
                cli + ["shards", "merge-index", run_dir],
            ]
        recipe = [str(self.config.resolve()), *self.overrides]
        if self.kind == "vtab":
            return [
                cli + ["vtab", *recipe, "--task", "dtd", "--run-dir", f"{run_dir}/dtd"],
                cli + ["vtab", *recipe, "--collect", "--run-dir", run_dir],
            ]
        return [cli + [self.kind, *recipe, "--run-dir", run_dir]]

    def sbatch(self) -> list[dict[str, str]]:
        logs = str(self.resolved_run_dir() / "slurm").replace("%", "%%")
        array = self.kind in ("shards", "vtab")
        first = {
            "--chdir": str(self.cwd),
            "--job-name": self.name(),
            "--output": f"{logs}/%x-%A_%a.out" if array else f"{logs}/%x-%j.out",
            **self.options,
        }
        if not array:
            return [first]
        follow = {
            "--chdir": str(self.cwd),
            "--job-name": self.name() + ("-merge" if self.kind == "shards" else "-table"),
            "--output": f"{logs}/%x-%j.out",
            **self.options,
        }
        return [first, follow]


def _mkdir(path: Path) -> bool:
    """Make `path` (a name may hold anything but NUL and '/'); False when the system cannot."""
    try:
        os.makedirs(os.fsencode(path), exist_ok=True)
    except (ValueError, OSError):
        return False
    return True


def _touch(path: Path) -> None:
    if _mkdir(path.parent):
        try:
            with open(os.fsencode(path), "wb"):
                pass
        except (ValueError, OSError):
            pass


RECORDER = """#!/bin/bash
printf '%s\\0' "$0" "$@" > "$(mktemp "$RECORD/call.XXXXXX")"
"""
# srun runs its command after its own options; sbatch and scontrol must not be reached at all here.
STUBS = {
    "srun": '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\ntouch "$RECORD/../scontrol-called"\n',
    "sbatch": '#!/bin/bash\ntouch "$RECORD/../sbatch-called"\n',
}


def _executable(path: Path, text: str) -> None:
    _mkdir(path.parent)
    with open(os.fsencode(path), "w") as f:
        f.write(text)
    os.chmod(os.fsencode(path), 0o755)


def make_job(kind: str, target: str, payload: str, tmp: Path, monkeypatch) -> Job:
    """A job of `kind` whose field `target` holds `payload`; every file it names exists where it can."""
    tmp = tmp.resolve()
    cwd = tmp / (f"cwd{payload}" if target == "working directory" else "cwd")
    if not _mkdir(cwd):
        pytest.skip(f"no directory can be named {payload!r}")
    monkeypatch.chdir(os.fsencode(cwd))
    python = tmp / (f"py{payload}" if target == "interpreter" else "py") / "python"
    try:
        _executable(python, RECORDER)
    except (ValueError, OSError):
        pass  # the interpreter's path is refused before anything runs it
    monkeypatch.setattr(sys, "executable", str(python))
    job = Job(kind, tmp, cwd, str(python))
    if target in SLURM_OPTIONS:
        job.options[target] = payload
    elif target == "--job-name":
        job.job_name = payload
    elif target == "run.name":
        job.recipe["run"]["name"] = payload
    elif target == "run.dir":
        job.recipe["run"]["dir"] = str(tmp / f"rd{payload}")
    elif target == "--run-dir":
        job.run_dir = str(tmp / f"rd{payload}")
    elif target == "SOURCE":
        job.source = f"src{payload}"
    elif target == "build option":
        job.build_args = ["--split", payload]
    if kind == "shards":
        job.out = str(tmp / (f"out{payload}" if target == "--out" else "out"))
        return job

    job.config = tmp / (f"cfg{payload}.yaml" if target == "CONFIG" else "cfg.yaml")
    if _mkdir(job.config.parent):
        try:
            with open(os.fsencode(job.config), "w") as f:
                f.write(yaml.safe_dump(job.recipe))
        except (ValueError, OSError):
            pass
    odd = payload if target == "override" else ""
    if kind == "pretrain":
        job.overrides = [f"logging.project=p{odd}"]
    else:
        weights = tmp / f"w{odd}" / "vit.pt"
        _touch(weights)
        job.overrides = [f"init={weights}"]
    if kind == "finetune":
        job.overrides += [f"data.train={tmp / 'train'}", f"data.test={tmp / 'test'}"]
        _mkdir(tmp / "train")
        _mkdir(tmp / "test")
    if kind == "vtab":
        root = tmp / "vtab"
        for split in ("train800val200", "test"):
            _mkdir(root / "dtd" / split)
        job.overrides += [f"eval.vtab_data={root}"]
        job.extra = ["--tasks", "dtd"]
    return job


def may_refuse(kind: str, target: str, name: str) -> bool:
    """Whether a field may refuse a shell payload (never a control character: that it must refuse)."""
    if target in SLURM_OPTIONS:
        return True  # SLURM's names and limits: whitespace, quotes, '\\' or '#' in one is a typo
    # SLURM's --output cannot hold a backslash (it turns the %j pattern off); the run directory is also
    # where run.dir's default, runs/<run.name> under the working directory, puts it.
    holds_logs = ("--run-dir", "run.dir", "--out") + (
        ("run.name", "working directory") if kind != "shards" else ()
    )
    return target in holds_logs and name == "backslash"


FIELDS = {
    "pretrain": [
        "working directory",
        "interpreter",
        "CONFIG",
        "override",
        "--run-dir",
        "run.dir",
        "run.name",
        "--job-name",
        *SLURM_OPTIONS,
    ],
    "finetune": ["CONFIG", "override", "--run-dir", "--job-name"],
    "vtab": ["working directory", "CONFIG", "override", "--run-dir", "run.name", "--job-name", "--partition"],
    "shards": ["working directory", "interpreter", "SOURCE", "--out", "build option", "--job-name", "--mem"],
}
CASES = [(kind, target) for kind, targets in FIELDS.items() for target in targets]


def _files(root: Path) -> set[bytes]:
    return {os.path.join(d, f) for d, _, files in os.walk(os.fsencode(root)) for f in files}


def _run(script: bytes, job: Job, where: Path) -> subprocess.CompletedProcess:
    stubs, record = job.tmp / "stubs", where / "record"
    for name, text in STUBS.items():
        _executable(stubs / name, text)
    record.mkdir(parents=True, exist_ok=True)
    path = where / "job.sbatch"
    path.write_bytes(script)
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "RECORD": str(record),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_TASK_COUNT": "2",
    }
    return subprocess.run(["bash", str(path)], cwd=where, env=env, capture_output=True, timeout=60)


def _recorded(where: Path) -> list[list[str]]:
    calls = sorted((where / "record").glob("call.*"))
    return [[os.fsdecode(a) for a in c.read_bytes().split(b"\0")[:-1]] for c in calls]


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize(("kind", "target"), CASES)
def test_no_payload_reaches_a_shell(kind, target, name, tmp_path, monkeypatch, capsys):
    payload = PAYLOADS[name]
    job = make_job(kind, target, payload, tmp_path, monkeypatch)
    before = _files(tmp_path)
    code = cli_main(job.argv())
    out, err = capsys.readouterr()
    assert _files(tmp_path) == before, "a dry run wrote a file"

    if code != 0:
        assert name in CONTROL or may_refuse(kind, target, name), f"{target} = {payload!r} refused: {err}"
        assert code == 2 and out == "", err
        assert err.startswith("vit-scale slurm: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
        # A setting the job itself would refuse is refused by the validation pass, which names its key.
        named = {
            "working directory": "working directory",
            "override": "init=" if kind != "pretrain" else "logging.project=",
        }.get(target, target.split()[0])
        named = named if not (target == "override" and "override" in err) else "override"
        # A run directory that cannot hold the logs is named as the run directory, run.dir's default or not.
        assert named in err or (name == "backslash" and "run.dir" in err), err
        return
    assert name not in CONTROL, f"{target} = {payload!r} was not refused"

    scripts = ["#!/bin/bash\n" + s for s in out.split("#!/bin/bash\n")[1:]]
    assert len(scripts) == len(job.commands()) == len(job.sbatch())
    for i, (script, command, sbatch) in enumerate(zip(scripts, job.commands(), job.sbatch(), strict=True)):
        data = script.encode("utf-8")
        syntax = subprocess.run(["bash", "-n"], input=data, capture_output=True, timeout=30)
        assert syntax.returncode == 0, syntax.stderr.decode()
        values = sbatch_values(script)
        for key, value in sbatch.items():
            assert values.get(key) == value, (key, values)

        where = tmp_path / f"exec{i}"
        where.mkdir()
        done = _run(data, job, where)
        assert done.returncode == 0, done.stderr.decode()
        assert _recorded(where) == [command]
        assert not any(os.path.basename(f).startswith(b"pwned_") for f in _files(tmp_path)), "a payload ran"
        assert not (tmp_path / "scontrol-called").exists() and not (tmp_path / "sbatch-called").exists()


def test_a_newline_in_the_run_directory_cannot_start_a_command(tmp_path, monkeypatch, capsys):
    """The example of the issue: a run directory whose name ends an #SBATCH line and starts a command."""
    job = make_job("pretrain", "--run-dir", CONTROL["newline"], tmp_path, monkeypatch)
    assert cli_main(job.argv()) == 2
    err = capsys.readouterr().err
    assert err == (
        f"vit-scale slurm: error: --run-dir {job.run_dir!r} holds the control character '\\n', which would "
        "break a line of the job script; rename it\n"
    )


def test_a_job_name_with_a_slash_would_move_the_log(tmp_path, monkeypatch, capsys):
    job = make_job("pretrain", "--job-name", "../../elsewhere", tmp_path, monkeypatch)
    assert cli_main(job.argv()) == 2
    assert "--job-name '../../elsewhere' holds '/'" in capsys.readouterr().err
    job.job_name = None
    job.recipe["run"]["name"] = "exp/1"
    job.config.write_text(yaml.safe_dump(job.recipe))
    assert cli_main(job.argv()) == 2
    assert "run.name (the default --job-name) 'exp/1' holds '/'" in capsys.readouterr().err


def test_every_task_of_an_array_gets_its_own_quoted_arguments(tmp_path, monkeypatch, capsys):
    """The shards array's task index comes from SLURM at run time; odd paths stay single arguments."""
    job = make_job("shards", "--out", SHELL["semicolon"], tmp_path, monkeypatch)
    job.source = "my images; $(touch pwned_src)"
    assert cli_main(job.argv()) == 0
    array = "#!/bin/bash\n" + capsys.readouterr().out.split("#!/bin/bash\n")[1]
    where = tmp_path / "task1"
    where.mkdir()
    stubs = job.tmp / "stubs"
    for name, text in STUBS.items():
        _executable(stubs / name, text)
    (where / "record").mkdir()
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "RECORD": str(where / "record"),
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_COUNT": "2",
    }
    done = subprocess.run(["bash", "-c", array], cwd=where, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (argv,) = _recorded(where)
    assert argv[argv.index("--array-index") + 1] == "1" and argv[argv.index("build") + 1] == job.source
    assert not any(os.path.basename(f).startswith(b"pwned_") for f in _files(tmp_path))
