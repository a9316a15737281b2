"""VTAB-1k table: the 19 tasks by name, group means and the overall mean as the paper reports them."""

import pytest

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
