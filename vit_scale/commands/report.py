"""`vit-scale report RUN_DIR...`: plots and one HTML page from run directories."""

from __future__ import annotations

from pathlib import Path

from vit_scale.commands.args import Parser
from vit_scale.observe.report import METRICS, report


def main(argv: list[str]) -> int:
    p = Parser(prog="vit-scale report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--out", help="output directory (default: RUN_DIR/report for one run, ./report for several)"
    )
    args = p.parse_args(argv)
    out = (
        Path(args.out)
        if args.out
        else (Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1 else Path("report"))
    )
    written, runs = report(args.run_dirs, out)
    skipped = sum(r.bad_lines for r in runs)
    plots = [p.name for k, p in written.items() if k != "html"]
    print(f"wrote {written['html']} with {len(plots)} plots ({', '.join(plots) or 'none'})")
    if skipped:
        print(f"skipped {skipped} unreadable line(s) in {METRICS}")
    return 0
