"""results.json + results.md per run, and one table across runs laid out like the paper's Tables 2 and 5."""

import json

import pytest

from vit_scale.errors import UserError
from vit_scale.observe.results import read_results, table_from_runs, write_results


def _run(tmp_path, name, model, datasets, summary=None):
    d = tmp_path / name
    write_results(
        d,
        {
            "kind": "finetune",
            "model": model,
            "metric": "top1",
            "datasets": datasets,
            **({"summary": summary} if summary else {}),
        },
    )
    return d


def test_one_run_writes_json_and_markdown(tmp_path):
    d = _run(tmp_path, "r", "ViT-B/16", {"cifar10": {"top1": 0.98954, "top5": 1.0, "n": 10000}})
    assert json.loads((d / "results.json").read_text())["datasets"]["cifar10"]["top1"] == 0.98954
    lines = (d / "results.md").read_text().splitlines()
    assert lines[0] == "top-1 accuracy (%)"
    assert lines[2] == "| dataset | ViT-B/16 |"
    assert lines[4] == "| cifar10 | 98.95 |"


def test_many_runs_compare_side_by_side(tmp_path):
    a = _run(tmp_path, "a", "B/16", {"cifar10": {"top1": 0.9895}, "cifar100": {"top1": 0.9167}})
    b = _run(
        tmp_path,
        "b",
        "L/16",
        {"cifar100": {"top1": 0.9344, "top1_std": 0.0005}, "pets": {"top1": 0.9473}},
        summary={"VTAB mean": {"top1": 0.7272}},
    )
    c = _run(tmp_path, "c", "B/16", {"cifar10": {"top1": 0.5}})
    rows = table_from_runs([a, b, c]).splitlines()[2:]
    assert rows[0] == "| dataset | B/16 | L/16 | B/16 (2) |"
    assert rows[2] == "| cifar10 | 98.95 | – | 50.00 |"
    assert rows[3] == "| cifar100 | 91.67 | 93.44 ± 0.05 | – |"
    assert rows[4] == "| pets | – | 94.73 | – |"
    assert rows[5] == "| **VTAB mean** | – | 72.72 | – |"


def test_missing_or_torn_results_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_results(tmp_path)
