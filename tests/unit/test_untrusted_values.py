"""Issue 16 §5: every value is checked before work starts, in the one validation pass, and a bad one is a
one-line error (exit 2) that names it, never a traceback.

The command-line cases run the real commands on real inputs (a timm ViT state dict, real tar shards, an
ImageFolder of JPEGs) with the values a careless user types; each must stop at once, with one line on stderr
and nothing written. `vit-scale slurm --dry-run` must refuse exactly what the job's own command refuses.
"""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch
import yaml
from data_helpers import image_folder, write_corpus
from timm.models.vision_transformer import VisionTransformer

from vit_scale.cli import main as cli_main
from vit_scale.commands.args import memory_for
from vit_scale.config import ConfigError, load_config, validate
from vit_scale.config.loader import _all_keys
from vit_scale.config.validate import ELEMENT_RANGES, RANGES
from vit_scale.errors import UserError

TINY = {
    "model": {
        "variant": "vit_ti16",
        "depth": 1,
        "width": 32,
        "heads": 2,
        "mlp": 64,
        "img_size": 32,
        "patch": 8,
    },
    "train": {"steps": 1, "global_batch": 4},
    "data": {"workers": 0},
    "logging": {"wandb": "disabled", "progress": False},
}


def _recipe(tmp_path, **sections) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def _files(root) -> set:
    return {p for p in root.rglob("*")}


def refused(capsys, argv: list[str]) -> str:
    """Run `vit-scale ARGV`; it must exit 2 with one line on stderr; that line."""
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ------------------------------------------------------------------ the config tree


def test_every_numeric_setting_has_a_range():
    """A number nothing bounds is a number a typo can set to -1: every int or float setting is in RANGES (or,
    for lists, ELEMENT_RANGES)."""

    def numeric(tp) -> bool:
        args = typing.get_args(tp)
        return tp in (int, float) or any(numeric(a) for a in args if a is not type(None))

    unbounded = [
        key
        for key, tp in _all_keys().items()
        if numeric(tp)
        and key not in RANGES
        and key not in ELEMENT_RANGES
        and typing.get_origin(tp) is not typing.Literal  # enumerated: checked against its choices
    ]
    assert unbounded == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seed=-1", "train.seed=-1 must be a finite number >= 0 and <= 2147483647"),
        ("train.seed=2147483648", "train.seed=2147483648 must be a finite number >= 0 and <= 2147483647"),
        ("data.randaugment=rand-zz9", "data.randaugment='rand-zz9' is not a timm RandAugment spec"),
        ("data.randaugment=m9-mstd0.5", "data.randaugment='m9-mstd0.5' is not a timm RandAugment spec"),
    ],
)
def test_values_the_run_would_trip_on_are_refused_first(override, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, [override]), 1)
    assert message in str(e.value)
    validate(load_config(None, ["data.randaugment=rand-m9-mstd0.5", "train.seed=2147483647"]), 1)


@pytest.mark.parametrize(
    ("key", "value", "bad"),
    [
        ("run.name", "a\nb", "\n"),
        ("run.dir", "runs/x\r", "\r"),
        ("data.train", "shards\x00/train", "\x00"),
        ("logging.project", "p\x1b[2J", "\x1b"),
        ("eval.vtab_data", "root\x85", "\x85"),
        ("init", "w\x7f.pt", "\x7f"),
    ],
)
def test_a_control_character_in_a_setting_is_refused(tmp_path, key, value, bad):
    """Strings become paths, table cells and job-script lines: a control character would split them."""
    section, _, leaf = key.rpartition(".")
    cfg = load_config(_recipe(tmp_path, **({section: {leaf: value}} if section else {leaf: value})))
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value) == f"{key}={value!r} holds the control character {bad!r}; remove it"


def test_text_that_is_not_utf8_is_refused(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["data.train=/data/\udcffimages"])
    with pytest.raises(ConfigError, match=r"data.train='/data/\\udcffimages' is not valid UTF-8 text"):
        validate(cfg, 1)


def test_a_config_that_cannot_be_read_is_one_line(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "latin1.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    assert refused(capsys, ["pretrain", str(tmp_path / "dir.yaml")]).endswith(": Is a directory")
    assert "latin1.yaml is not UTF-8 text (byte 16); save it as UTF-8" in refused(
        capsys, ["slurm", "pretrain", str(tmp_path / "latin1.yaml"), "--gpus-per-node", "0", "--dry-run"]
    )


# ------------------------------------------------------------------ command-line options


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_corpus(root / "ds" / "train", 10, shard_size=5)
    write_corpus(root / "ds" / "test", 5, shard_size=5)
    image_folder(root / "folder", {"a": 2, "b": 2})
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=5)
    torch.save(model.state_dict(), root / "w.pth")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


# (argv with {w} weights, {d} shards root, {f} image folder, {c} recipe, {o} output; the error's words)
OPTIONS = [
    ("eval {w} --data {d}/test --batch-size 0", "--batch-size must be at least 1, got 0"),
    ("eval {w} --data {d}/test --img-size 0", "--img-size must be at least 1, got 0"),
    ("eval {w} --data {d}/test --img-size -16", "--img-size must be at least 1, got -16"),
    (
        "eval {w} --data {d}/test --img-size 40",
        "--img-size: resolution 40 is not a multiple of the patch size 16",
    ),
    ("eval {w} --data {d}/test --batch-size x", "--batch-size must be an integer, got 'x'"),
    ("fewshot {w} --train {d}/train --test {d}/test --shots 0", "--shots must be positive integers, got '0'"),
    ("fewshot {w} --train {d}/train --test {d}/test --seeds 0", "--seeds must be at least 1, got 0"),
    ("fewshot {w} --train {d}/train --test {d}/test --l2 -1", "--l2 must be a finite number > 0, got -1"),
    ("fewshot {w} --train {d}/train --test {d}/test --l2 nan", "--l2 must be a finite number > 0, got nan"),
    (
        "fewshot {w} --train {d}/train --test {d}/test --batch-size 0",
        "--batch-size must be at least 1, got 0",
    ),
    ("vtab {w} --data {d} --task-index -1", "--task-index must be at least 0, got -1"),
    ("pretrain {c} --nproc 0", "--nproc must be at least 1, got 0"),
    ("finetune {c} init={w} --nproc 1 --max-restarts -1", "--max-restarts must be at least 0, got -1"),
    ("shards build {f} --out {o} --shard-size 0", "--shard-size must be at least 1, got 0"),
    ("shards build {f} --out {o} --workers -1", "--workers must be at least 1, got -1"),
    ("shards build {f} --out {o} --max-side -5", "--max-side must be at least 0, got -5"),
    ("shards build {f} --out {o} --quality 0", "--quality must be between 1 and 100, got 0"),
    ("shards build {f} --out {o} --quality 101", "--quality must be between 1 and 100, got 101"),
    ("shards build {f} --out {o} --val-holdout -1", "--val-holdout must be at least 0, got -1"),
    ("shards build {f} --out {o} --array-count 0", "--array-count must be at least 1, got 0"),
    ("shards build {f} --out {o} --shard-bytes 0", "--shard-bytes must be at least 1, got 0"),
    (
        "shards synth fractals --classes 2 --per-class 1 --workers 0 --out {o}",
        "--workers must be at least 1, got 0",
    ),
    (
        "shards synth fractals --classes 2 --per-class 1 --workers -2 --out {o}",
        "--workers must be at least 1",
    ),
    ("shards synth digits --size 0 --out {o}", "digits: --size must be at least the native 8 px (got 0)"),
    ("demo --workers -1 --out {o}", "--workers must be at least 1, got -1"),
    ("demo --nproc 0 --out {o}", "--nproc must be at least 1, got 0"),
    ("demo --pretrain-size 25 --out {o}", "model.img_size=25 is not divisible by the patch size 4"),
    ("demo --finetune-size 30 --out {o}", "model.img_size=30 is not divisible by the patch size 4"),
    ("demo --nproc 3 --out {o}", "not divisible by train.grad_accum=1 × world size 3"),
    ("models --bogus", "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("argv", "message"), OPTIONS, ids=[a for a, _ in OPTIONS])
def test_a_bad_option_stops_the_command_at_once(inputs, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # where a command that did not stop would write runs/
    argv = argv.format(
        w=inputs / "w.pth", d=inputs / "ds", f=inputs / "folder", c=inputs / "tiny.yaml", o=tmp_path / "out"
    )
    before = _files(inputs)
    err = refused(capsys, argv.split())
    assert message in err
    assert _files(tmp_path) == set() and _files(inputs) == before  # nothing written, nothing started


def test_running_out_of_memory_names_the_options():
    with pytest.raises(
        UserError, match=r"^out of memory with --img-size 99999 and --batch-size 256; lower them$"
    ):
        with memory_for("--img-size 99999 and --batch-size 256"):
            torch.empty(2**50, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="unrelated"), memory_for("x"):
        raise RuntimeError("unrelated")


def test_nccl_without_a_gpu_is_a_config_error():
    from vit_scale.train.engine import backend_name

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs GPUs and this process sees none"):
        backend_name(load_config(None, ["parallel.backend=nccl"]))


# ------------------------------------------------------------------ the job's checks, before it is queued


def _vtab_root(root):
    for split in ("train800val200", "test"):
        (root / "vtab" / "dtd" / split).mkdir(parents=True, exist_ok=True)
    return root / "vtab"


@pytest.mark.parametrize(
    "override",
    [
        "train.seed=-1",
        "data.randaugment=rand-zz9",
        "optim.lr=0",
        "train.global_batch=6",  # does not split over 4 ranks
        "run.name=a\tb",
        "model.img_size=36",
        "parallel.world_size=3",
    ],
)
@pytest.mark.parametrize("kind", ["pretrain", "finetune", "vtab"])
def test_slurm_dry_run_refuses_exactly_what_the_job_refuses(
    inputs, tmp_path, capsys, monkeypatch, kind, override
):
    """The job's ranks and `vit-scale slurm KIND --dry-run` run the same validation pass for the same world
    size (2 nodes x 2 GPUs for pretrain and fine-tuning, one 4-GPU node per VTAB array task): the same
    message, before anything starts or is queued."""
    monkeypatch.chdir(tmp_path)
    recipe = [str(inputs / "tiny.yaml")]
    if kind == "finetune":
        recipe += [
            f"init={inputs / 'w.pth'}",
            f"data.train={inputs / 'ds' / 'train'}",
            f"data.test={inputs / 'ds' / 'test'}",
        ]
    if kind == "vtab":
        recipe += [f"init={inputs / 'w.pth'}", f"eval.vtab_data={_vtab_root(tmp_path)}"]
    job = [kind, *recipe, override] + (
        ["--task", "dtd", "--nproc", "4"] if kind == "vtab" else ["--nproc", "4"]
    )
    plan = ["slurm", kind, *recipe, override, "--gpus-per-node", "4", "--dry-run"]
    plan += ["--tasks", "dtd"] if kind == "vtab" else ["--nodes", "1"]
    by_job = refused(capsys, job).split(": error: ", 1)[1]
    by_plan = refused(capsys, plan).split(": error: ", 1)[1]
    assert by_plan == by_job
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ found by trying


def test_report_skips_a_metrics_line_with_an_infinite_step(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1e999, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert cli_main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().out


def test_resuming_a_run_directory_with_another_model_is_one_line(inputs, tmp_path):
    """A run directory reused after changing the model: the checkpoint's weights cannot be loaded."""
    run = tmp_path / "run"

    def pretrain(*overrides):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "vit_scale.cli",
                "pretrain",
                str(inputs / "tiny.yaml"),
                f"data.train={inputs / 'ds' / 'train'}",
                *overrides,
                "--run-dir",
                str(run),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = pretrain()
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain("model.width=64")
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("vit-scale pretrain: error:")]
    assert line == (
        f"vit-scale pretrain: error: {run}/checkpoints/step_000000001 holds the weights of another model "
        "(cls_token is [1, 1, 32] there and [1, 1, 64] now): resuming needs the model settings it was saved "
        f"with (its manifest.json lists them); to start afresh use another --run-dir, or fine-tune from it "
        f"with init={run}/checkpoints/step_000000001"
    )
