"""`vit-scale report RUN_DIR [RUN_DIR ...]`: PNG plots and one HTML page from metrics.jsonl and results.json.

Works offline from the run directories alone (no wandb account). Several runs are overlaid on each
plot. The page embeds the plots, so it can be mailed or copied as one file; the PNGs sit beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from vit_scale.errors import UserError
from vit_scale.io import atomic_write_bytes, atomic_write_text

METRICS = "metrics.jsonl"
RESULTS = "results.json"


@dataclass(frozen=True)
class Panel:
    name: str  # PNG file stem
    title: str
    keys: tuple[str, ...] = ()  # metric keys drawn as one line per run
    prefix: str = ""  # or: every key starting with this, one line per run and key
    scale: float = 1.0  # fractions shown as percentages
    log_y: bool = False
    smooth: bool = False  # noisy per-step values: draw them faint, with a moving average on top


PANELS = (
    Panel("loss", "training loss", ("loss",), smooth=True),
    Panel("lr", "learning rate", ("lr",)),
    Panel("throughput", "throughput (images / s)", ("images_per_s",)),
    Panel("mfu", "model FLOPs utilisation (%)", ("mfu",), scale=100),
    Panel("data_wait", "time waiting for data (% of step)", ("data_wait_frac",), scale=100),
    Panel("grad_norm", "gradient norm (before clipping)", ("grad_norm",), log_y=True),
    Panel("fewshot", "few-shot linear accuracy (%)", prefix="fewshot", scale=100),
)


@dataclass
class Run:
    path: Path
    label: str
    steps: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # one per step, the last record written for that step
    bad_lines: int = 0
    results: dict | None = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) where `key` has a finite number."""
        xs, ys = [], []
        for step, row in zip(self.steps, self.rows):
            v = row.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(step)
                ys.append(float(v))
        return xs, ys

    def keys(self) -> set[str]:
        return {k for row in self.rows for k in row}


def read_metrics(path: Path) -> tuple[dict[int, dict], int]:
    """Records by step from a metrics.jsonl, and the number of unreadable lines skipped.

    A resumed run logs again the steps after its last checkpoint; the later record of a step wins,
    so the curve shows what the finished run computed. A torn last line (a run still writing) is skipped.
    """
    by_step: dict[int, dict] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: a step of 1e999
                bad += 1
                continue
            # Records of one step merge (an eval line beside the train line); a re-logged key overwrites.
            by_step[step] = {**by_step.get(step, {}), **row}
    return by_step, bad


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist")
    metrics, results = path / METRICS, path / RESULTS
    if not metrics.exists() and not results.exists():
        raise UserError(f"{path} has neither {METRICS} nor {RESULTS}: is it a run directory?")
    run = Run(path=path, label=path.name)
    if metrics.exists():
        by_step, run.bad_lines = read_metrics(metrics)
        run.steps = sorted(by_step)
        run.rows = [by_step[s] for s in run.steps]
    if results.exists():
        try:
            run.results = json.loads(results.read_text())
        except ValueError:
            raise UserError(f"{results} is not valid JSON") from None
    return run


def _label_runs(runs: list[Run]) -> None:
    """Unique, short labels: the directory name, with its parent where two names clash."""
    names = [r.path.name for r in runs]
    for r in runs:
        if names.count(r.path.name) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"


# ------------------------------------------------------------------ plots

SMOOTH_MIN_POINTS = 50


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with TensorBoard-style debiasing, so the start is not pulled to 0."""
    alpha = 2 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _lines(panel: Panel, runs: list[Run]) -> list[tuple[str, int, int, list[int], list[float]]]:
    """(legend label, run index, key index, steps, values) for every run and matching key with numbers."""
    out = []
    for i, run in enumerate(runs):
        keys = panel.keys or tuple(sorted(k for k in run.keys() if k.startswith(panel.prefix)))
        for j, key in enumerate(keys):
            xs, ys = run.series(key)
            if not xs:
                continue
            if panel.keys:
                label = run.label
            else:
                label = f"{run.label}: {key}" if len(runs) > 1 else key
            out.append((label, i, j, xs, [y * panel.scale for y in ys]))
    return out


# Run names and metric keys come from directory names and files others wrote: every text of a plot is drawn
# as it is written, never as mathtext ('$' pairs, '\\frac'), which would garble it or fail to parse.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def plot_panel(panel: Panel, runs: list[Run]) -> bytes | None:
    """The panel as PNG bytes, or None when no run has its metric."""
    import matplotlib

    with matplotlib.rc_context(PLAIN_TEXT):
        fig = panel_figure(panel, runs)
        if fig is None:
            return None
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    return buf.getvalue()


def panel_figure(panel: Panel, runs: list[Run]):
    """The panel's matplotlib Figure, or None when no run has its metric."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = _lines(panel, runs)
    if not lines:
        return None
    with matplotlib.rc_context(PLAIN_TEXT):
        fig = Figure(figsize=(7, 4), dpi=110)
        FigureCanvasAgg(fig)
        _draw(fig.add_subplot(), panel, runs, lines)
        fig.tight_layout()
    return fig


def _draw(ax, panel: Panel, runs: list[Run], lines) -> None:
    # One colour per run, one line style per key, so a run's few-shot curves read as a family.
    styles = ("-", "--", ":", "-.")
    for label, i, j, xs, ys in lines:
        style = dict(color=f"C{i % 10}", linestyle=styles[j % len(styles)])
        if panel.smooth and len(xs) >= SMOOTH_MIN_POINTS:
            ax.plot(xs, ys, linewidth=0.8, alpha=0.3, **style)
            ax.plot(
                xs, ema(ys, max(10, len(xs) // 10)), label=f"{label} (moving average)", linewidth=1.6, **style
            )
        else:
            ax.plot(
                xs,
                ys,
                label=label,
                linewidth=1.4,
                marker="o" if len(xs) <= 30 else None,
                markersize=3,
                **style,
            )
    if panel.log_y and all(y > 0 for *_, ys in lines for y in ys):
        ax.set_yscale("log")
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(runs) > 1 or not panel.keys:
        ax.legend(fontsize=8)


# ------------------------------------------------------------------ tables


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def summary_rows(runs: list[Run]) -> list[list[str]]:
    """One row per run: what a reader checks first."""

    def stat(run, key, fn, scale=1.0):
        _, ys = run.series(key)
        return fn(ys) * scale if ys else None

    def median(ys):
        s = sorted(ys)
        return s[len(s) // 2]

    rows = []
    for r in runs:
        rows.append(
            [
                r.label,
                _fmt(r.steps[-1] if r.steps else None),
                _fmt(stat(r, "loss", lambda y: y[-1])),
                _fmt(stat(r, "loss", min)),
                _fmt(stat(r, "images_per_s", median)),
                _fmt(stat(r, "mfu", lambda y: sum(y) / len(y), 100), 3),
                _fmt(stat(r, "data_wait_frac", lambda y: sum(y) / len(y), 100), 3),
                str(r.bad_lines),
            ]
        )
    return rows


SUMMARY_HEADER = [
    "run",
    "last step",
    "last loss",
    "min loss",
    "median images/s",
    "mean MFU %",
    "mean data wait %",
    "skipped lines",
]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def results_html(runs: list[Run]) -> str:
    """The results table of the runs that have results.json, as HTML (from the cells, not the Markdown)."""
    with_results = [r for r in runs if r.results is not None]
    if not with_results:
        return ""
    from vit_scale.observe.results import table

    try:
        t = table([r.results for r in with_results])
    except (KeyError, TypeError, AttributeError):
        raise UserError(
            "a results.json lacks 'model', 'metric' or 'datasets': "
            + ", ".join(str(r.path / RESULTS) for r in with_results)
        ) from None
    rows = [[html.escape(c) for c in row] for row in t.rows]
    rows += [[f"<b>{html.escape(name)}</b>", *map(html.escape, cells)] for name, *cells in t.summary]
    return f"<p>{html.escape(t.title)}</p>\n" + _html_table(t.header, rows)


# ------------------------------------------------------------------ page

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1em}.note{color:#777}"""


def render_page(runs: list[Run], plots: dict[str, bytes], missing: list[str]) -> str:
    names = ", ".join(html.escape(r.label) for r in runs)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>vit-scale report: {names}</title>",
        f"<style>{STYLE}</style></head><body><h1>vit-scale report</h1>",
        "<p>" + "<br>".join(html.escape(str(r.path.resolve())) for r in runs) + "</p>",
    ]
    if any(r.rows for r in runs):
        rows = [[html.escape(c) for c in row] for row in summary_rows([r for r in runs if r.rows])]
        parts += ["<h2>Training</h2>", _html_table(SUMMARY_HEADER, rows)]
    results = results_html(runs)
    if results:
        parts += ["<h2>Results</h2>", results]
    if plots:
        parts.append("<h2>Plots</h2><div class='grid'>")
        for name, png in plots.items():
            data = base64.b64encode(png).decode()
            parts.append(f"<div><img alt='{name}' src='data:image/png;base64,{data}'></div>")
        parts.append("</div>")
    if missing:
        parts.append(f"<p class='note'>Not logged by these runs: {html.escape(', '.join(missing))}.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def report(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> tuple[dict[str, Path], list[Run]]:
    """Write the PNGs and index.html into `out`; the written files by name, and the runs read."""
    runs = [load_run(d) for d in run_dirs]
    _label_runs(runs)
    out = Path(out)
    plots, missing, written = {}, [], {}
    for panel in PANELS:
        png = plot_panel(panel, runs)
        if png is None:
            missing.append(panel.title)
            continue
        plots[panel.name] = png
        written[panel.name] = out / f"{panel.name}.png"
        atomic_write_bytes(written[panel.name], png)
    written["html"] = out / "index.html"
    atomic_write_text(written["html"], render_page(runs, plots, missing))
    return written, runs
