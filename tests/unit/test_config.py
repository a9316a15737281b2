"""The typed config tree: YAML inheritance, overrides, and every error path with its message."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vit_scale.config import (
    ConfigError,
    from_dict,
    load_config,
    resolve_batch,
    save_config,
    to_dict,
    validate,
)
from vit_scale.config.schema import TrainConfig


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.schedule.warmup_steps == 10000 and cfg.schedule.decay == "linear"
    assert cfg.train.global_batch == 4096 and cfg.optim.grad_clip == 1.0


def test_inheritance_then_overrides(tmp_path):
    write(tmp_path / "pretrain/base.yaml", """
        model: {variant: vit_b16, dropout: 0.1}
        optim: {lr: 0.001, weight_decay: 0.03}
        train: {global_batch: 4096}
    """)
    child = write(tmp_path / "finetune/child.yaml", """
        base: ../pretrain/base.yaml
        optim:
          lr: 0.01
        model:
          img_size: 384
    """)
    cfg = load_config(child, ["optim.lr=0.03", "sweep.lr=[0.001, 0.003]", "run.name=x1", "init=w.npz"])
    assert cfg.model.variant == "vit_b16" and cfg.model.dropout == 0.1  # inherited
    assert cfg.model.img_size == 384  # child wins over base
    assert cfg.optim.weight_decay == 0.03
    assert cfg.optim.lr == 0.03  # command line wins over files
    assert cfg.sweep.lr == [0.001, 0.003]
    assert cfg.run.name == "x1" and cfg.run.dir == "runs/x1"
    assert cfg.init == "w.npz"


def test_run_name_defaults_to_config_file_name(tmp_path):
    cfg = load_config(write(tmp_path / "my_recipe.yaml", "train: {steps: 5}\n"))
    assert cfg.run.name == "my_recipe" and cfg.run.dir == "runs/my_recipe"


def test_int_accepted_where_float_expected_and_exponent_strings(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "optim: {lr: 1e-3, weight_decay: 0}\n"))
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.weight_decay, float)


def test_unknown_key_in_file_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  variant: vit_b16\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"unknown config key 'optim.lrr' at {path.resolve()}:4 (did you mean optim.lr?)"


def test_unknown_key_on_command_line_suggests_right_section():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=0.1"])
    assert "unknown config key 'train.lr' at command line (train.lr=0.1)" in str(e.value)
    assert "did you mean optim.lr?" in str(e.value)


def test_wrong_type_names_key_expected_and_given(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.global_batch=big"])
    assert str(e.value) == "config key train.global_batch at command line (train.global_batch=big) expects int, got 'big'"
    path = write(tmp_path / "c.yaml", "parallel:\n  activation_checkpointing: 3\n")
    with pytest.raises(ConfigError, match=r"parallel.activation_checkpointing at .*c.yaml:2 expects bool, got 3"):
        load_config(path)


def test_choice_is_checked():
    with pytest.raises(ConfigError, match="precision.dtype .* must be one of fp32, bf16, fp16; got 'fp8'"):
        load_config(None, ["precision.dtype=fp8"])


def test_missing_file_and_inheritance_loop(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(tmp_path / "a.yaml")


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.global_batch=64", "train.micro_batch_per_rank=8", "train.grad_accum=2"], 2,
         "train.global_batch=64 but train.micro_batch_per_rank=8 × train.grad_accum=2 × world size 2 = 32"),
        (["model.img_size=230"], 1, "model.img_size=230 is not divisible by the patch size 16"),
        (["model.img_size=8"], 1, "model.img_size=8 is smaller than one 16-pixel patch"),
        (["parallel.offload_optimizer=true", "parallel.zero_stage=1"], 1,
         "parallel.offload_optimizer needs ZeRO stage 2 or 3, but parallel.zero_stage=1"),
        (["parallel.offload_params=true", "parallel.zero_stage=2"], 1,
         "parallel.offload_params needs ZeRO stage 3, but parallel.zero_stage=2"),
        (["parallel.offload_optimizer=true", "parallel.zero_stage=2", "optim.name=sgd"], 1,
         "parallel.offload_optimizer steps with DeepSpeed's CPU Adam only, but optim.name=sgd"),
        (["model.variant=vit_x16"], 1, "model.variant='vit_x16' is not a known variant"),
        (["eval.img_size=390"], 1, "eval.img_size=390 is not a multiple of the patch size 16"),
        (["data.train=a::b", "data.weights=[1.0]"], 1, "data.weights has 1 values but data.train names 2"),
        (["train.steps=10", "train.epochs=2"], 1, "give only one of train.steps, train.epochs, train.examples"),
        (["parallel.world_size=8"], 2, "parallel.world_size=8 but 2 processes were launched"),
        (["eval.every_steps=100"], 1, "eval.every_steps=100 scores data.val; set data.val=SHARDS"),
        (["data.cutmix=-1"], 1, "data.cutmix=-1.0 must be a finite number >= 0.0"),
        (["data.mixup=0.8", "data.labels=multi"], 1, "data.mixup / data.cutmix mix single labels"),
        (["data.cutmix=1", "optim.loss=sigmoid"], 1, "with data.labels=multi or optim.loss=sigmoid set both"),
        (["data.mixup=0.8", "train.global_batch=6"], 2, "so it must be even, not 3 per rank"),
    ],
)
def test_impossible_combinations(overrides, world, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world)
    assert message in str(e.value)


def test_batch_arithmetic_derives_accumulation():
    assert resolve_batch(TrainConfig(global_batch=4096, micro_batch_per_rank=64), 16) == (64, 4)
    assert resolve_batch(TrainConfig(global_batch=512, grad_accum=2), 4) == (64, 2)
    assert resolve_batch(TrainConfig(global_batch=32), 2) == (16, 1)
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_per_rank=48"):
        resolve_batch(TrainConfig(global_batch=4096, micro_batch_per_rank=48), 16)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.variant=vit_l16", "sweep.lr=[0.01]", "optim.lr=0.0004"])
    save_config(cfg, tmp_path / "run/config.yaml")
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert from_dict(saved) == cfg and to_dict(cfg) == saved


def test_checkpoint_async_is_a_key_though_async_is_a_python_keyword(tmp_path):
    """The schema's field is `async_`; YAML, the command line, config.yaml and a manifest say `async`."""
    assert load_config().checkpoint.async_ is True
    cfg = load_config(write(tmp_path / "a.yaml", "checkpoint: {async: false, verify: size}\n"))
    assert cfg.checkpoint.async_ is False and cfg.checkpoint.verify == "size"
    assert load_config(None, ["checkpoint.async=false"]).checkpoint.async_ is False
    saved = to_dict(cfg)
    assert saved["checkpoint"]["async"] is False and "async_" not in saved["checkpoint"]
    assert from_dict(saved) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'checkpoint.async_'.*did you mean checkpoint.async"):
        load_config(None, ["checkpoint.async_=false"])


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vit_scale.cli", "pretrain", "nope.yaml"], capture_output=True, text=True
    )
    # pretrain may or may not have landed; either way: exit 2, one line, no traceback.
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr=nan must be a finite number > 0.0"),
        ("optim.lr=.inf", "optim.lr=inf must be a finite number > 0.0"),
        ("optim.lr=0", "optim.lr=0.0 must be a finite number > 0.0"),
        ("optim.lr=-1e-3", "optim.lr=-0.001 must be a finite number > 0.0"),
        ("logging.every_steps=0", "logging.every_steps=0 must be a finite number >= 1"),
        ("checkpoint.every_steps=-5", "checkpoint.every_steps=-5 must be a finite number >= 0 (0 turns it off)"),
        ("checkpoint.every_minutes=-1", "checkpoint.every_minutes=-1.0 must be a finite number >= 0.0 (0.0 turns"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be a finite number >= 1"),
        ("train.steps=0", "train.steps=0 must be a finite number >= 1"),
        ("train.global_batch=0", "train.global_batch=0 must be a finite number >= 1"),
        ("train.micro_batch_per_rank=0", "train.micro_batch_per_rank=0 must be a finite number >= 1"),
        ("model.depth=0", "model.depth=0 must be a finite number >= 1"),
        ("model.width=0", "model.width=0 must be a finite number >= 1"),
        ("model.dropout=1.0", "model.dropout=1.0 must be a finite number >= 0.0 and < 1.0"),
        ("data.crop_area_min=0", "data.crop_area_min=0.0 must be a finite number > 0.0 and <= 1.0"),
        ("optim.ema_decay=1", "optim.ema_decay=1.0 must be a finite number >= 0.0 and < 1.0 (0.0 turns it off)"),
        ("optim.ema_decay=-0.5", "optim.ema_decay=-0.5 must be a finite number >= 0.0 and < 1.0"),
        ("data.workers=-1", "data.workers=-1 must be a finite number >= 0"),
        ("optim.betas=[0.9, 1.5]", "optim.betas=[0.9, 1.5]: every value must be a finite number >= 0.0 and < 1.0"),
        ("sweep.lr=[0.01, 0]", "sweep.lr=[0.01, 0.0]: every value must be a finite number > 0.0"),
        ("eval.fewshot_shots=[0, 5]", "eval.fewshot_shots=[0, 5]: every value must be a finite number >= 1"),
    ],
)
def test_every_numeric_setting_has_its_range(override, message):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    assert message in str(e.value)


def test_batch_that_cannot_split_over_the_ranks_is_refused():
    cfg = load_config(None, ["train.global_batch=3"])
    with pytest.raises(ConfigError, match="train.global_batch=3 is not divisible by train.grad_accum=1 × world size 2"):
        validate(cfg, world_size=2)
    assert validate(load_config(None, ["train.global_batch=8"]), world_size=2).micro_batch_per_rank == 4


@pytest.mark.parametrize("base", ["3", "[a.yaml, 7]", "notes.txt", "subdir.yaml"])
def test_base_must_name_yaml_files(tmp_path, base):
    (tmp_path / "subdir.yaml").mkdir()
    (tmp_path / "notes.txt").write_text("model: {}\n")
    path = write(tmp_path / "c.yaml", f"base: {base}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: base: .* must be the path of a YAML file"):
        load_config(path)


def test_gpu_decode_needs_cuda_and_no_randaugment():
    cfg = load_config(None, ["data.decode=gpu"])
    with pytest.raises(ConfigError, match="data.decode=gpu decodes with nvJPEG on a CUDA device, and none is"):
        validate(cfg, world_size=1, cuda=False)
    validate(cfg, world_size=1, cuda=True)
    cfg = load_config(None, ["data.decode=gpu", "data.randaugment=rand-m9-mstd0.5"])
    with pytest.raises(ConfigError, match="data.randaugment='rand-m9-mstd0.5' runs on CPU images"):
        validate(cfg, world_size=1, cuda=True)
    with pytest.raises(ConfigError, match="data.decode .* must be one of cpu, gpu; got 'nvjpeg'"):
        load_config(None, ["data.decode=nvjpeg"])
