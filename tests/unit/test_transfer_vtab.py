"""VTAB-1k table: the 19 tasks by name, group means and the overall mean as the paper reports them."""

import json
import re
from pathlib import Path

import pytest
from transfer_helpers import write_class_shards, write_vtab_task

from vit_scale.config import ConfigError, load_config, validate
from vit_scale.config.tasks import LABEL_CHANGING
from vit_scale.errors import UserError
from vit_scale.evaluate.vtab import GROUPS, TASKS, collect, select_tasks, summarise, task_name
from vit_scale.observe.results import write_results


def test_task_table_matches_the_paper():
    assert len(TASKS) == 19
    counts = {g: sum(1 for grp, _ in TASKS.values() if grp == g) for g in GROUPS}
    assert counts == {"Natural": 7, "Specialized": 4, "Structured": 8}
    assert TASKS["sun397"] == ("Natural", 397) and TASKS["smallnorb_ele"] == ("Structured", 9)
    assert task_name("smallnorb_elev") == "smallnorb_ele"
    with pytest.raises(UserError, match="unknown VTAB-1k task 'mnist'"):
        task_name("mnist")


def test_full_table_means():
    per_task = {t: {"top1": (i + 1) / 20} for i, t in enumerate(TASKS)}
    res = summarise(per_task, "B/16")
    assert list(res["datasets"]) == list(TASKS)
    natural = sum((i + 1) / 20 for i in range(7)) / 7
    specialized = sum((i + 1) / 20 for i in range(7, 11)) / 4
    structured = sum((i + 1) / 20 for i in range(11, 19)) / 8
    overall = sum((i + 1) / 20 for i in range(19)) / 19  # mean over tasks, not over groups
    assert res["summary"] == {
        "Natural mean": {"top1": pytest.approx(natural)},
        "Specialized mean": {"top1": pytest.approx(specialized)},
        "Structured mean": {"top1": pytest.approx(structured)},
        "VTAB mean (19 tasks)": {"top1": pytest.approx(overall)},
    }
    assert overall != pytest.approx((natural + specialized + structured) / 3)


def test_collect_marks_an_incomplete_table(tmp_path):
    for task, acc in (("svhn", 0.5), ("eurosat", 0.75)):
        write_results(
            tmp_path / task,
            {"kind": "finetune", "model": "w", "metric": "top1", "datasets": {task: {"top1": acc}}},
        )
    res = collect(tmp_path)
    assert res["model"] == "w"
    assert list(res["summary"]) == [
        "Natural (1/7 tasks)",
        "Specialized (1/4 tasks)",
        "VTAB mean (2/19 tasks)",
    ]
    assert res["summary"]["VTAB mean (2/19 tasks)"]["top1"] == 0.625
    table = (tmp_path / "results.md").read_text()
    assert "| svhn | 50.00 |" in table and "| **VTAB mean (2/19 tasks)** | 62.50 |" in table
    with pytest.raises(UserError, match="no finished VTAB tasks"):
        collect(tmp_path / "empty")


def test_task_selection(tmp_path):
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "svhn").mkdir()
    assert select_tasks(str(tmp_path), None) == ["svhn", "eurosat"]  # the paper's order
    assert select_tasks(str(tmp_path), "dmlab,svhn") == ["svhn", "dmlab"]
    with pytest.raises(UserError, match="no VTAB-1k task directories"):
        select_tasks(str(tmp_path / "eurosat"), None)


def test_collect_from_the_command_line_after_a_slurm_array(tmp_path, capsys):
    from vit_scale.cli import main as cli

    # The array template names directories by the cluster's task names, e.g. smallnorb_elev.
    for task, acc in (("dtd", 0.25), ("smallnorb_elev", 0.5)):
        write_results(
            tmp_path / task,
            {"kind": "finetune", "model": "vit", "metric": "top1", "datasets": {task: {"top1": acc}}},
        )
    assert cli(["vtab", "weights.pth", "--collect", "--run-dir", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| smallnorb_ele | 50.00 |" in table and "| **VTAB mean (2/19 tasks)** | 37.50 |" in table
    assert cli(["vtab", "weights.pth", "--data", str(tmp_path), "--task", "imagenet"]) == 2
    assert "unknown VTAB-1k task 'imagenet'" in capsys.readouterr().err


# ---------------------------------------------------------------- augmentations that change a task's label

REPO = Path(__file__).resolve().parents[2]
VTAB_RECIPE = REPO / "configs" / "vtab" / "vtab1k.yaml"
FINETUNE_RECIPE = REPO / "configs" / "finetune" / "cifar10_vit_b16.yaml"  # inception crops and flips


def finetune_config(tmp_path, recipe, *overrides):
    init = tmp_path / "w.pth"
    init.touch()
    shards = write_class_shards(tmp_path / "shards", num_classes=10, per_class=1)
    base = [
        f"init={init}",
        f"data.train={shards}",
        f"data.test={shards}",
        "model.num_classes=10",
        "sweep.lr=[]",
    ]
    return load_config(recipe, [*base, *overrides])


def test_every_task_with_rules_is_a_vtab_task_and_says_why():
    assert set(LABEL_CHANGING) <= set(TASKS)
    assert {
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "clevr_count",
        "clevr_dist",
        "kitti_dist",
    } <= set(LABEL_CHANGING)
    for task, rules in LABEL_CHANGING.items():
        assert rules and set(rules) <= {"flip", "crop"}, task
        assert all(why.startswith("its label") for why in rules.values()), task


@pytest.mark.parametrize(
    "task, overrides, refused",
    [
        (
            "dsprites_loc",
            [],
            "data.augment=inception crops the training images, but dsprites_loc: its label is",
        ),
        ("dsprites_loc", ["data.augment=resize"], None),  # hflip is inert without inception crops
        (
            "dsprites_ori",
            ["data.augment=center"],
            "data.augment=center crops the training images, but dsprites_ori",
        ),
        (
            "smallnorb_azi",
            [],
            "data.hflip=true mirrors the training images, but smallnorb_azi: its label is the",
        ),
        ("smallnorb_azi", ["data.hflip=false"], None),  # its label survives a crop
        ("smallnorb_elev", ["data.hflip=false"], "but smallnorb_elev: its label is the camera elevation"),
        (
            "clevr_count",
            ["data.hflip=false"],
            "data.augment=inception crops the training images, but clevr_count",
        ),
        (
            "clevr_count",
            ["data.augment=resize", "data.eval_crop=center"],
            "data.eval_crop=center crops the images",
        ),
        ("clevr_count", ["data.augment=resize"], None),
        (
            "kitti_dist",
            ["data.augment=resize", "data.eval_crop=center"],
            "but kitti_dist: its label is the distance",
        ),
        ("svhn", ["data.augment=resize", "data.eval_crop=center"], "but svhn: its label is the centre digit"),
        (
            "smallnorb_azi",
            ["data.hflip=false", "data.randaugment=rand-m9"],
            "data.randaugment='rand-m9' rotates",
        ),
        (
            "dtd",
            ["data.randaugment=rand-m9", "data.eval_crop=center"],
            None,
        ),  # textures: crops and flips are fine
        ("", ["data.augment=resize", "data.randaugment=rand-m9"], "applies to inception crops only"),
        ("mnist", [], "data.task='mnist' is not a VTAB-1k task"),
    ],
)
def test_a_crop_or_flip_that_changes_the_label_is_refused_naming_the_task(tmp_path, task, overrides, refused):
    cfg = finetune_config(tmp_path, FINETUNE_RECIPE, f"data.task={task}", *overrides)
    if refused is None:
        validate(cfg, 1, "finetune")
        return
    with pytest.raises(ConfigError, match=re.escape(refused)) as e:
        validate(cfg, 1, "finetune")
    assert "\n" not in str(e.value)


def test_the_vtab_recipe_resizes_only_and_passes_every_tasks_rules(tmp_path):
    cfg = finetune_config(tmp_path, VTAB_RECIPE)
    assert (cfg.data.augment, cfg.data.hflip, cfg.data.eval_crop, cfg.data.randaugment) == (
        "resize",
        False,
        "none",
        "",
    )
    for task in TASKS:
        cfg.data.task = task
        validate(cfg, 1, "finetune")


def test_shards_built_from_a_vtab_folder_record_their_task_and_validation_reads_it(tmp_path, capsys):
    from vit_scale.cli import main as cli

    for name, task in (
        ("dsprites_loc", None),
        ("smallnorb_elev", None),
        ("images", "kitti_dist"),
        ("x", None),
    ):
        folder = write_vtab_task(tmp_path / "raw", name, 2)
        out = tmp_path / "shards" / name
        args = ["shards", "build", str(folder), "--out", str(out), "--format", "vtab", "--split", "test"]
        assert cli([*args, "--workers", "1", "--no-progress", *(["--task", task] if task else [])]) == 0
    recorded = {n: json.loads((tmp_path / "shards" / n / "index.json").read_text()).get("task") for n in
                ("dsprites_loc", "smallnorb_elev", "images", "x")}  # fmt: skip
    assert recorded == {
        "dsprites_loc": "dsprites_loc",
        "smallnorb_elev": "smallnorb_ele",
        "images": "kitti_dist",
        "x": None,
    }

    # A fine-tune recipe with inception crops, pointed at those shards, is refused before any work.
    shards = tmp_path / "shards" / "dsprites_loc"
    init = tmp_path / "w.pth"
    init.touch()
    cfg = load_config(FINETUNE_RECIPE, [f"init={init}", f"data.train={shards}", f"data.test={shards}",
                                        "model.num_classes=2", "sweep.lr=[]"])  # fmt: skip
    with pytest.raises(ConfigError, match="crops the training images, but dsprites_loc"):
        validate(cfg, 1, "finetune")
    assert cli(["eval", str(init), "--data", str(tmp_path / "shards" / "images"), "--crop", "center"]) == 2
    assert "--crop center cuts the borders of the images scored, but kitti_dist" in capsys.readouterr().err
    bad = ["shards", "build", str(tmp_path / "raw" / "x"), "--out", str(tmp_path / "y"), "--task", "mnist"]
    assert cli(bad) == 2
    assert "--task 'mnist' is not a VTAB-1k task" in capsys.readouterr().err


def test_vtab_command_refuses_an_override_that_crops_a_structured_task(tmp_path, capsys):
    from vit_scale.cli import main as cli

    root = tmp_path / "vtab"
    for split in ("train800val200", "test"):
        write_class_shards(root / "clevr_count" / split, num_classes=8, per_class=1)
    init = tmp_path / "w.pth"
    init.touch()
    argv = ["vtab", str(init), "--data", str(root), "--task", "clevr_count", "data.augment=inception"]
    assert cli([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and "crops the training images, but clevr_count: its label is the number" in err
    )
