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
import os
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


def _cell(entry: dict | None, metric: str) -> str:
    if not entry or entry.get(metric) is None:
        return "–"
    text = f"{100 * entry[metric]:.2f}"
    std = entry.get(f"{metric}_std")
    return f"{text} ± {100 * std:.2f}" if std is not None else text


def render_table(results: list[dict], metric: str | None = None) -> str:
    """A Markdown table: one row per dataset (then summary rows), one column per run."""
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
        rows += [d for d in r["datasets"] if d not in rows]
        summary_rows += [d for d in r.get("summary", {}) if d not in summary_rows]
    metrics = {metric or r["metric"] for r in results}
    title = "top-1 accuracy (%)" if metrics == {"top1"} else ", ".join(sorted(metrics)) + " (%)"
    lines = [
        "| " + " | ".join(["dataset", *labels]) + " |",
        "|" + "---|" * (len(labels) + 1),
    ]
    for name in rows:
        cells = [_cell(r["datasets"].get(name), metric or r["metric"]) for r in results]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    for name in summary_rows:
        cells = [_cell(r.get("summary", {}).get(name), metric or r["metric"]) for r in results]
        lines.append("| " + " | ".join([f"**{name}**", *cells]) + " |")
    return f"{title}\n\n" + "\n".join(lines) + "\n"


def table_from_runs(run_dirs: list[str | os.PathLike], metric: str | None = None) -> str:
    """One Markdown table comparing the runs side by side (the report calls this)."""
    return render_table([read_results(d) for d in run_dirs], metric)


def write_table(run_dirs: list[str | os.PathLike], out: str | os.PathLike, metric: str | None = None) -> Path:
    atomic_write_text(out, table_from_runs(run_dirs, metric))
    return Path(out)
