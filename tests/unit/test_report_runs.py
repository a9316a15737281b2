"""`vit-scale report`: plots and the HTML page from metrics.jsonl and results.json alone."""

import json
import math
import re

import pytest
from PIL import Image

from vit_scale.cli import main as cli_main
from vit_scale.commands import report as report_command
from vit_scale.errors import UserError
from vit_scale.observe import report as rep
from vit_scale.observe.results import write_results


def write_metrics(run_dir, rows, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def training_rows(steps, lr_peak, seed):
    rows = []
    for s in range(1, steps + 1):
        rows.append(
            {
                "step": s,
                "loss": 4.0 * math.exp(-s / (20 + seed)) + 0.1 * seed,
                "lr": lr_peak * min(1, s / 10),
                "grad_norm": 2.0 / s,
                "images_per_s": 100.0 + seed + s % 3,
                "mfu": 0.3 + 0.01 * seed,
                "data_wait_frac": 0.05,
            }
        )
        if s % 10 == 0:
            rows.append({"step": s, "fewshot/10shot": 0.2 + s / 200, "fewshot/25shot": 0.3 + s / 200})
    return rows


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    rows_a = training_rows(40, 1e-3, 0)
    # Run a was preempted after step 30 and resumed from its step-25 checkpoint: steps 26..30 are logged twice,
    # and the second time (the resumed run's numbers) is what the finished run computed.
    resumed = [dict(r, loss=r["loss"] + 1.0) for r in rows_a if 26 <= r["step"] <= 30 and "loss" in r]
    order = [r for r in rows_a if r["step"] <= 30] + resumed + [r for r in rows_a if r["step"] > 30]
    write_metrics(a, order, tail='{"step": 41, "loss": 0.')  # torn last line of a run still writing
    write_metrics(b, training_rows(30, 3e-3, 1) + [{"step": 31, "loss": float("nan")}])
    for run, top1 in ((a, 0.9), (b, 0.8)):
        write_results(
            run,
            {
                "kind": "finetune",
                "model": run.name,
                "metric": "top1",
                "datasets": {"cifar10": {"top1": top1, "top5": 1.0, "n": 100}},
            },
        )
    return a, b, resumed


def test_resumed_steps_keep_the_last_record_and_torn_lines_are_counted(two_runs):
    a, _, resumed = two_runs
    run = rep.load_run(a)
    assert run.steps == list(range(1, 41))
    assert run.bad_lines == 1
    xs, ys = run.series("loss")
    assert ys[25:30] == [r["loss"] for r in resumed]
    assert run.series("fewshot/10shot") == ([10, 20, 30, 40], [0.2 + s / 200 for s in (10, 20, 30, 40)])


def test_non_finite_values_are_left_out_of_series(two_runs):
    _, b, _ = two_runs
    xs, _ = rep.load_run(b).series("loss")
    assert xs == list(range(1, 31))


def test_report_writes_every_plot_and_one_page(two_runs, tmp_path, capsys):
    a, b, _ = two_runs
    out = tmp_path / "report"
    assert cli_main(["report", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'index.html'} with 7 plots" in printed
    assert "skipped 1 unreadable line(s)" in printed
    for panel in rep.PANELS:
        with Image.open(out / f"{panel.name}.png") as im:
            assert im.format == "PNG" and im.size == (770, 440)
    page = (out / "index.html").read_text()
    assert page.count("<img ") == 7 and page.count("data:image/png;base64,") == 7
    # The results table, with both runs as columns and percentages as in the paper's tables.
    assert "<th>dataset</th><th>a</th><th>b</th>" in page
    assert "<td>cifar10</td><td>90.00</td><td>80.00</td>" in page
    # The training summary row of run a: last step 40, min loss at step 40 (the resumed steps are higher).
    row_a = re.search(r"<tr><td>a</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row_a)
    assert cells[0] == "40" and float(cells[1]) == pytest.approx(4.0 * math.exp(-2), rel=1e-3)
    assert cells[-1] == "1"  # the torn line


def test_overlaid_runs_differ_in_the_picture(two_runs, tmp_path):
    a, b, _ = two_runs
    one = rep.plot_panel(rep.PANELS[1], [rep.load_run(a)])
    both = rep.plot_panel(rep.PANELS[1], [rep.load_run(a), rep.load_run(b)])
    assert one[:8] == b"\x89PNG\r\n\x1a\n" and one != both


def test_metrics_missing_from_every_run_are_named(tmp_path):
    run = tmp_path / "bare"
    write_metrics(run, [{"step": s, "loss": 1.0 / s} for s in range(1, 5)])
    written, _ = rep.report([run], tmp_path / "out")
    assert sorted(written) == ["html", "loss"]
    page = written["html"].read_text()
    assert "Not logged by these runs: learning rate, throughput (images / s)" in page


def test_results_only_run_has_a_table_and_no_plots(tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    write_results(
        run,
        {
            "kind": "vtab",
            "model": "vit_b16",
            "metric": "top1",
            "datasets": {"dtd": {"top1": 0.5}},
            "summary": {"VTAB mean": {"top1": 0.5}},
        },
    )
    written, _ = rep.report([run], run / "report")
    page = written["html"].read_text()
    assert "<td><b>VTAB mean</b></td><td>50.00</td>" in page and "<img" not in page


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has neither metrics.jsonl nor results.json"),
        (lambda d: (d.mkdir(), (d / "results.json").write_text("{oops")), "is not valid JSON"),
    ],
)
def test_bad_run_directories_are_user_errors(tmp_path, make, message):
    d = tmp_path / "r"
    make(d)
    with pytest.raises(UserError, match=message):
        rep.report([d], tmp_path / "out")


def test_default_output_is_inside_a_single_run(tmp_path, capsys):
    run = tmp_path / "solo"
    write_metrics(run, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    assert report_command.main([str(run)]) == 0
    assert (run / "report" / "index.html").exists() and (run / "report" / "loss.png").exists()


def test_moving_average_is_debiased():
    assert rep.ema([3.0] * 5, span=9) == pytest.approx([3.0] * 5)  # no pull towards 0 at the start
    assert rep.ema([2.0, 4.0], span=1) == [2.0, 4.0]
    assert rep.ema([2.0, 4.0], span=3) == pytest.approx([2.0, 2.5 / 0.75])
