"""Issue 16 §7: the report survives odd names.

Run directories, weights and datasets are named with `|`, `$` (and mathtext such as `$x^2$` or an unclosed
`\\frac{`), `\\`, `<`, `&`, `*`, `_` and non-ASCII text; `vit-scale eval` writes their results.json (so the model
label and the dataset name come from those names) and the real metrics writer their metrics.jsonl. The
Markdown tables must read back as the names (cells split and unescaped as GitHub-flavoured Markdown does),
the HTML page must show them as text, and the plots must draw them as written, never as mathtext.
"""

from __future__ import annotations

import html.parser
import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from transfer_helpers import class_images

from vit_scale.cli import main as cli_main
from vit_scale.data.shards import ShardWriter
from vit_scale.observe import inspect as ins
from vit_scale.observe import report as rep
from vit_scale.observe.metrics import MetricsLog
from vit_scale.observe.results import markdown_text, render_table, table_from_runs

# Names a directory can have (no '/'), one per kind of trouble, all of them in the first.
RUNS = [
    "run | $x^2$ \\frac{ <b>bold&gt; *em* _u_ Zürich",
    "Ωμέγα Жук — ünïcode",
]
DATASETS = ["pipe|set $a$", "back\\slash <i> & ~~del~~"]
WEIGHTS = ["w|$\\frac{$", "вес <w>"]
KEY = "fewshot/5-shot $k$ | ü"


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real run directories: metrics.jsonl from the metrics writer, results.json from `vit-scale eval`
    of weights and a dataset with odd names."""
    tmp = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    dirs = []
    for i, (run, dataset, weights) in enumerate(zip(RUNS, DATASETS, WEIGHTS, strict=True)):
        data = tmp / dataset / "test"
        with ShardWriter(data, classes=["c0", "c1"]) as w:
            for label in range(2):
                for j, img in enumerate(class_images(label, 3, 32, rng)):
                    w.write(f"s{label}_{j}", _png(img), "png", label, {})
        torch.manual_seed(i)
        model = VisionTransformer(
            img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=2
        )
        torch.save(model.state_dict(), tmp / f"{weights}.pth")
        run_dir = tmp / run
        assert (
            cli_main(["eval", str(tmp / f"{weights}.pth"), "--data", str(data), "--run-dir", str(run_dir)])
            == 0
        )
        log = MetricsLog(
            run_dir,
            {},
            wandb_setting="disabled",
            project="p",
            entity="",
            run_name=run,
            run_id=None,
            job_ids=[],
            resume_step=0,
        )
        for step in range(1, 6):
            log.log({"step": step, "loss": 2.0 / step + i, "lr": 0.1 * step})
        log.log({"step": 5, KEY: 0.5 + 0.1 * i})
        log.close()
        dirs.append(run_dir)
    return dirs


# ------------------------------------------------------------------ reading Markdown and HTML back


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of a GFM pipe table, as GitHub reads them: split at unescaped '|', then backslash escapes
    of ASCII punctuation undone (the delimiter row left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|(-+\|)+", line):
            continue
        cells, cell, i = [], "", 1
        while i < len(line):
            c = line[i]
            if c == "\\" and i + 1 < len(line):
                cell += line[i : i + 2]
                i += 2
                continue
            if c == "|":
                cells.append(cell.strip())
                cell = ""
            else:
                cell += c
            i += 1
        rows.append([re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", c) for c in cells])
    return rows


class _Cells(html.parser.HTMLParser):
    """The text of every <th>/<td> (per table, per row) and of <title>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables, self.title, self._in = [], "", None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self._in = "cell"
        elif tag == "title":
            self._in = "title"

    def handle_endtag(self, tag):
        if tag in ("td", "th", "title"):
            self._in = None

    def handle_data(self, data):
        if self._in == "cell":
            self.tables[-1][-1][-1] += data
        elif self._in == "title":
            self.title += data


# ------------------------------------------------------------------ tests


def test_markdown_tables_read_back_as_the_names(runs):
    for run, dataset, weights in zip(runs, DATASETS, WEIGHTS, strict=True):
        rows = markdown_rows((run / "results.md").read_text())
        assert rows[0] == ["dataset", weights]
        assert rows[1][0] == dataset and len(rows[1]) == 2
    rows = markdown_rows(table_from_runs(runs))
    assert rows[0] == ["dataset", *WEIGHTS]
    assert [r[0] for r in rows[1:]] == DATASETS and all(len(r) == 3 for r in rows)


def test_markdown_keeps_plain_names_plain():
    """Escapes only where Markdown would read something else: the tables of ordinary runs do not change."""
    assert (
        markdown_text("smallnorb_ele ViT-B/16 (2) 93.44 ± 0.05") == "smallnorb_ele ViT-B/16 (2) 93.44 ± 0.05"
    )
    assert markdown_text("_x_ a*b") == "\\_x\\_ a\\*b"
    assert markdown_text("line\nbreak") == "line\\\\x0abreak"  # a control character would end the row
    table = render_table(
        [
            {
                "model": "m",
                "metric": "top1",
                "datasets": {"a": {"top1": 0.5}},
                "summary": {"**mean** |": {"top1": 0.5}},
            }
        ]
    )
    assert markdown_rows(table)[2] == ["****mean** |**", "50.00"]  # the bold markers around the name


def test_report_page_shows_the_names_as_text(runs, tmp_path, capsys):
    out = tmp_path / "report <&>"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert not [
        w for w in caught if "missing from font" in str(w.message)
    ]  # Latin, Greek, Cyrillic all drawn
    assert "wrote" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    parsed = _Cells()
    parsed.feed(page)
    assert parsed.title == "vit-scale report: " + ", ".join(RUNS)
    training, results = parsed.tables
    assert [row[0] for row in training[1:]] == RUNS
    assert results[0] == ["dataset", *WEIGHTS]
    assert [row[0] for row in results[1:]] == DATASETS
    assert "<b>bold" not in page and "<i>" not in page  # names are text, never markup
    for name in ("loss", "lr", "fewshot"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG"


def test_plot_labels_are_drawn_as_written(runs):
    """Legend entries are the run names and metric keys themselves: no mathtext, so `$x^2$` keeps its dollars
    and an unclosed `\\frac{` draws instead of failing."""
    loaded = [rep.load_run(r) for r in runs]
    fig = rep.panel_figure(rep.PANELS[1], loaded)
    texts = fig.axes[0].get_legend().get_texts()
    assert [t.get_text() for t in texts] == RUNS
    assert not any(t.get_parse_math() for t in texts)
    fig = rep.panel_figure(next(p for p in rep.PANELS if p.name == "fewshot"), loaded)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [f"{r}: {KEY}" for r in RUNS]
    png = rep.plot_panel(rep.PANELS[0], loaded)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_picture_titles_of_image_files_are_drawn_as_written():
    """`vit-scale inspect --images` titles each picture with its file name."""
    images = torch.zeros(2, 3, 16, 16)
    png = ins.draw_rollout(images, torch.rand(2, 4), ["cat $\\frac{$.jpg", "a|b <c>.png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_with_a_value_that_is_not_a_number_are_a_user_error(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "results.json").write_text(
        json.dumps({"kind": "eval", "model": "m", "metric": "top1", "datasets": {"d": {"top1": "high"}}})
    )
    assert cli_main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "vit-scale report: error: results of m: top1 is 'high', not a number\n"


# ------------------------------------------------------------------ console output names files as they are


def test_shards_verify_prints_odd_shard_paths_as_they_are(tmp_path, capsys):
    """A merged index names shards under their part directories; rich must not read '[/x]' as markup."""
    from data_helpers import write_corpus

    out = tmp_path / "shards"
    write_corpus(out, 6, shard_size=3)
    index = json.loads((out / "index.json").read_text())
    entry = index["shards"][0]
    odd = "part[/x] [bold]"
    (out / odd).mkdir(parents=True)
    (out / entry["name"]).rename(out / odd / entry["name"])
    entry["name"] = f"{odd}/{entry['name']}"
    (out / "index.json").write_text(json.dumps(index))
    assert cli_main(["shards", "verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{odd}/shard-000000.tar" in printed and "ok: 2 shards, 6 samples" in printed


def test_progress_and_stage_lines_print_paths_as_they_are(capsys):
    from vit_scale.commands import demo
    from vit_scale.evaluate.classify import _Progress

    with _Progress(True, "eval runs[/x]", 2) as advance:
        advance()
    demo._announce("corpus", "building runs/[/x] [bold]/data")
    assert "building runs/[/x] [bold]/data" in capsys.readouterr().err
