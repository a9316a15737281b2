"""Run results: `results.json` per run, a Markdown table beside it, and one table from many runs.

results.json holds one object:

    {
      "kind": "finetune" | "eval" | "fewshot" | "vtab",
      "model": "column label (the weights or run name)",
      "metric": "top1",                                    # the number tables show
      "datasets": {"cifar100": {"top1": 0.9325, "top5": 0.99, "n": 10000}, ...},
      "summary": {"VTAB mean (19 tasks)": {"top1": 0.72}, ...},   # optional rows after the datasets
      "details": {...}                                     # sweep, weights, resolution, ...
    }

Accuracies are fractions in [0, 1]; tables show percentages with two decimals, as the paper's
Tables 2 and 5 do (datasets as rows, models as columns).
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from vit_scale.errors import UserError
from vit_scale.io import atomic_write_json, atomic_write_text

RESULTS = "results.json"
TABLE = "results.md"


def write_results(run_dir: str | os.PathLike, results: dict) -> Path:
    """Write results.json and results.md (the one-column table of this run) into `run_dir`."""
    for key in ("kind", "model", "metric", "datasets"):
        if key not in results:
            raise ValueError(f"results lack {key!r}")
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / RESULTS, results)
    atomic_write_text(run_dir / TABLE, render_table([results]))
    return run_dir / RESULTS


def read_results(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir)
    path = path if path.suffix == ".json" else path / RESULTS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: the run has not finished or is not a transfer run") from None
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def weights_label(path: str) -> str:
    """A table column name for weights: the run's name for checkpoint paths, else the file's stem."""
    p = Path(path.rstrip("/"))
    if p.name.startswith("step_") and p.parent.name == "checkpoints":
        return p.parent.parent.name
    if p.name == "checkpoints":
        return p.parent.name
    return p.stem


def _cell(entry: dict | None, metric: str, where: str) -> str:
    if not entry or entry.get(metric) is None:
        return "–"
    values = [entry[metric], entry.get(f"{metric}_std")]
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise UserError(f"results of {where}: {metric} is {v!r}, not a number")
    text = f"{100 * values[0]:.2f}"
    return f"{text} ± {100 * values[1]:.2f}" if values[1] is not None else text


@dataclass
class Table:
    """Datasets as rows (then the summary rows, shown bold), runs as columns; cells are plain text."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    summary: list[list[str]] = field(default_factory=list)


def table(results: list[dict], metric: str | None = None) -> Table:
    """The comparison of `results` (results.json objects) as text cells, for Markdown or HTML to render."""
    if not results:
        raise UserError("no results to tabulate")
    labels: list[str] = []
    for r in results:
        label = str(r["model"])
        n = 2
        while label in labels:  # two runs of the same weights stay apart
            label = f"{r['model']} ({n})"
            n += 1
        labels.append(label)
    rows: list[str] = []
    summary_rows: list[str] = []
    for r in results:
        rows += [str(d) for d in r["datasets"] if str(d) not in rows]
        summary_rows += [str(d) for d in r.get("summary", {}) if str(d) not in summary_rows]
    metrics = {str(metric or r["metric"]) for r in results}
    title = "top-1 accuracy (%)" if metrics == {"top1"} else ", ".join(sorted(metrics)) + " (%)"
    out = Table(title, ["dataset", *labels])
    for names, part, cells in ((rows, "datasets", out.rows), (summary_rows, "summary", out.summary)):
        for name in names:
            cells.append(
                [name]
                + [
                    _cell(r.get(part, {}).get(name), str(metric or r["metric"]), label)
                    for r, label in zip(results, labels)
                ]
            )
    return out


# Characters with a meaning in (GitHub-flavoured) Markdown inside a table cell: the cell separator, the
# backslash itself, emphasis, code, links, HTML and entities, strike-through and math. '_' only opens or
# closes emphasis next to something that is not a letter or digit, so inside a word (smallnorb_ele) it stays.
_MARKDOWN = re.compile(r"[\\|*`\[\]<>&~$]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def markdown_text(text: str) -> str:
    """`text` as it must be written in a Markdown table cell to read back as itself (a control character,
    which would end the row, reads back as its \\xNN escape)."""
    text = "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c for c in text)
    return _MARKDOWN.sub(lambda m: "\\" + m.group(0), text)


def render_table(results: list[dict], metric: str | None = None) -> str:
    """A Markdown table: one row per dataset (then summary rows), one column per run."""
    t = table(results, metric)
    lines = [
        "| " + " | ".join(map(markdown_text, t.header)) + " |",
        "|" + "---|" * len(t.header),
    ]
    for row in t.rows:
        lines.append("| " + " | ".join(map(markdown_text, row)) + " |")
    for name, *cells in t.summary:
        lines.append("| " + " | ".join([f"**{markdown_text(name)}**", *cells]) + " |")
    return f"{markdown_text(t.title)}\n\n" + "\n".join(lines) + "\n"


def table_from_runs(run_dirs: list[str | os.PathLike], metric: str | None = None) -> str:
    """One Markdown table comparing the runs side by side (the report calls this)."""
    return render_table([read_results(d) for d in run_dirs], metric)


def write_table(run_dirs: list[str | os.PathLike], out: str | os.PathLike, metric: str | None = None) -> Path:
    atomic_write_text(out, table_from_runs(run_dirs, metric))
    return Path(out)
