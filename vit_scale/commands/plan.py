"""`vit-scale plan CONFIG [key=value ...] --gpu NAME --nodes N --gpus-per-node G`: memory, speed and cost
of a training configuration on a cluster, before it is queued.

    vit-scale plan configs/pretrain/vit_h14_jft.yaml --gpu h100-80gb --nodes 16 --gpus-per-node 8 --epoch-size 303000000
    vit-scale plan configs/pretrain/vit_h14_jft.yaml --gpu a100-80gb --nodes 4 --gpus-per-node 8 --fit
    vit-scale plan configs/pretrain/vit_b16_in21k.yaml --gpu a100-80gb,h100-80gb --nodes 1 --gpus-per-node 8 \\
        --grid parallel.zero_stage=1,2,3 --grid parallel.activation_checkpointing=false,true
    vit-scale plan configs/pretrain/vit_l16_in21k.yaml --gpu h100-80gb --nodes 1,2,4,8 --summary --epoch-size 14200000

`--fit` searches micro batch x activation checkpointing (off, every k-th block) x ZeRO stage 1-3 x offload and
prints the fastest predicted configuration that fits, with the overrides that select it. `--summary` prints one
row per GPU x node count (and per combination of `--grid KEY=A,B`, repeatable) at the largest micro batch that
fits, instead of the full plan. `--json` prints the same numbers as the table. docs/planning.md gives the
formulas, their sources and how they were checked.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json

from vit_scale.commands.args import Parser
from vit_scale.config import load_config
from vit_scale.errors import UserError


def parser() -> argparse.ArgumentParser:
    from vit_scale.plan import GPUS

    p = Parser(prog="vit-scale plan", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("config", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value settings on top of the recipe")
    p.add_argument("--gpu", required=True, help=f"GPU model, or several separated by commas: {', '.join(GPUS)}")
    p.add_argument("--nodes", default="1", help="nodes (default 1), or several separated by commas")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (default 8)")
    p.add_argument("--interconnect-gbps", type=float, help="network bandwidth per GPU between nodes, Gbit/s "
                   "(default: the GPU table's)")
    p.add_argument("--mfu", type=float, help="model-FLOPs utilisation to assume (default: measured, else 0.40)")
    p.add_argument("--gpu-table", help="YAML mapping GPU names to fields merged over the built-in table "
                   "(memory_gib, peak_tflops, intra_node_gbs, inter_node_gbps, pcie_gbs, hbm_tbs, reserve_gib)")
    p.add_argument("--epoch-size", type=int, help="images per epoch, to cost a recipe given in train.epochs "
                   "(default: data.train's index.json when it exists here)")
    p.add_argument("--fit", action="store_true", help="search for the fastest configuration that fits")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=A,B",
                   help="one summary row per value (repeatable; combinations of all); implies --summary")
    p.add_argument("--summary", action="store_true", help="one row per GPU, node count and --grid combination")
    p.add_argument("--markdown", action="store_true", help="with --summary: a markdown table (one column per GPU "
                   "when there are several), as docs/planning.md shows them")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def _clusters(args):
    from vit_scale.plan import cluster, load_table, lookup

    table = load_table(args.gpu_table)
    names = [n for n in args.gpu.split(",") if n]
    if not names:
        raise UserError("--gpu names no GPU")
    try:
        nodes = [int(n) for n in args.nodes.split(",") if n]
    except ValueError:
        raise UserError(f"--nodes {args.nodes!r} must be a number or numbers separated by commas") from None
    return [cluster(lookup(name, table), n, args.gpus_per_node, args.interconnect_gbps, args.mfu)
            for name in names for n in nodes]


def _grid(args) -> list[list[str]]:
    axes = []
    for spec in args.grid:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserError(f"--grid {spec!r} must look like section.key=value1,value2")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]  # one empty combination without --grid


def fit_result(cfg, cl, epoch_size):
    """(plan dict of the fastest fitting configuration, its overrides), or raise when nothing fits."""
    from vit_scale.plan import fit, make_plan

    found = fit(cfg, cl)
    if found is None:
        raise UserError(
            f"no configuration of ZeRO stage, offload, activation checkpointing and micro batch fits "
            f"{cfg.model.variant} at {cfg.model.img_size} px with global batch {cfg.train.global_batch} on "
            f"{cl.world} x {cl.gpu.name}; use more or larger GPUs"
        )
    chosen, overrides, _ = found
    return make_plan(chosen, cl, epoch_size).to_dict(), overrides


def grid_rows(args, clusters) -> list[dict]:
    from vit_scale.plan import make_plan

    rows = []
    for cl in clusters:
        seen = set()
        for combo in _grid(args):
            cfg = load_config(args.config, [*args.overrides, *combo])
            base = make_plan(cfg, cl, args.epoch_size).to_dict()
            same = json.dumps(base["config"], sort_keys=True)  # e.g. every k-th block with checkpointing off
            if same in seen:
                continue
            seen.add(same)
            micro = base["largest_valid_micro_batch"]
            if not cfg.parallel.activation_checkpointing:  # its every-k setting is not in effect: not shown
                combo = [x for x in combo if not x.startswith("parallel.checkpoint_every_k_blocks=")]
            row = dict(gpu=cl.gpu.name, nodes=cl.nodes, gpus_per_node=cl.gpus_per_node, settings=combo,
                       fitting_micro_batch=micro)
            if micro:
                per_rank = cfg.train.global_batch // cl.world
                sized = copy.deepcopy(cfg)
                sized.train.micro_batch_per_rank, sized.train.grad_accum = micro, per_rank // micro
                d = make_plan(sized, cl, args.epoch_size).to_dict()
                t = d["time"]
                row.update(memory_gib=d["total_gib"], images_per_s_per_gpu=t["images_per_s_per_gpu"],
                           images_per_s=t["images_per_s"],
                           scaling_efficiency_vs_one_node=t["scaling_efficiency_vs_one_node"],
                           wall_hours=d["cost"].get("wall_hours"), gpu_hours=d["cost"].get("gpu_hours"))
            rows.append(row)
    return rows


def render_grid(rows: list[dict]) -> str:
    settings = max([len("settings")] + [len(" ".join(r["settings"])) for r in rows])
    lines = [f"{'gpu':<11} {'nodes':>5} {'settings':<{settings}} {'micro':>5} {'GiB':>6} {'img/s/GPU':>9} "
             f"{'img/s':>9} {'scaling':>7} {'wall h':>8} {'GPU-h':>8}"]
    for r in rows:
        head = f"{r['gpu']:<11} {r['nodes']:>5} {' '.join(r['settings']):<{settings}}"
        if not r["fitting_micro_batch"]:
            lines.append(f"{head} {'-':>5} does not fit")
            continue
        cost = (f"{r['wall_hours']:8,.1f} {r['gpu_hours']:8,.0f}" if r["gpu_hours"] is not None
                else f"{'-':>8} {'-':>8}")
        lines.append(f"{head} {r['fitting_micro_batch']:>5} {r['memory_gib']:6.1f} {r['images_per_s_per_gpu']:9,.0f} "
                     f"{r['images_per_s']:9,.0f} {r['scaling_efficiency_vs_one_node']:7.1%} {cost}")
    lines.append("micro: the largest micro batch per GPU that fits and divides the global batch; GiB: predicted peak "
                 "with the allowance at that micro batch; scaling: images/s per GPU against one node")
    return "\n".join(lines)


def _short(setting: str) -> str:
    key, _, value = setting.partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}"


def render_markdown(rows: list[dict]) -> str:
    gpus = list(dict.fromkeys(r["gpu"] for r in rows))
    if len(gpus) > 1:  # settings down, GPUs across
        lines = ["| settings | " + " | ".join(f"{g}: micro, GiB, img/s/GPU" for g in gpus) + " |",
                 "|---|" + "---:|" * len(gpus)]
        cells: dict[tuple, dict[str, str]] = {}
        for r in rows:
            key = (r["nodes"], tuple(r["settings"]))
            cell = ("does not fit" if not r["fitting_micro_batch"] else
                    f"{r['fitting_micro_batch']}, {r['memory_gib']:.1f}, {r['images_per_s_per_gpu']:,.0f}")
            cells.setdefault(key, {})[r["gpu"]] = cell
        several = len({nodes for nodes, _ in cells}) > 1
        for (nodes, settings), by_gpu in cells.items():
            name = " ".join(_short(x) for x in settings) or "as configured"
            name = f"{nodes} nodes, {name}" if several else name
            lines.append(f"| {name} | " + " | ".join(by_gpu.get(g, "") for g in gpus) + " |")
        return "\n".join(lines)
    lines = ["| nodes | GPUs | settings | micro | GiB | img/s | img/s/GPU | scaling | wall h | GPU-h |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = " ".join(_short(x) for x in r["settings"]) or "as configured"
        gpus_n = r["nodes"] * (r.get("gpus_per_node") or 0)
        if not r["fitting_micro_batch"]:
            lines.append(f"| {r['nodes']} | {gpus_n} | {name} | does not fit | | | | | | |")
            continue
        cost = (f"{r['wall_hours']:,.1f} | {r['gpu_hours']:,.0f}" if r["gpu_hours"] is not None else " | ")
        lines.append(f"| {r['nodes']} | {gpus_n} | {name} | {r['fitting_micro_batch']} | {r['memory_gib']:.1f} | "
                     f"{r['images_per_s']:,.0f} | {r['images_per_s_per_gpu']:,.0f} | "
                     f"{r['scaling_efficiency_vs_one_node']:.0%} | {cost} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from vit_scale.plan import make_plan
    from vit_scale.plan.text import render

    args = parser().parse_intermixed_args(argv)
    if args.epoch_size is not None and args.epoch_size < 1:
        raise UserError(f"--epoch-size must be positive, got {args.epoch_size}")
    clusters = _clusters(args)
    if args.grid or args.summary:
        rows = grid_rows(args, clusters)
        print(json.dumps(rows, indent=2) if args.json else render_markdown(rows) if args.markdown else render_grid(rows))
        return 0
    cfg = load_config(args.config, args.overrides)
    out, text = [], []
    for cl in clusters:
        if args.fit:
            d, overrides = fit_result(cfg, cl, args.epoch_size)
            d["fit_overrides"] = overrides
            text.append(render(d) + "\n\nFastest configuration that fits: " + " ".join(overrides))
        else:
            d = make_plan(cfg, cl, args.epoch_size).to_dict()
            text.append(render(d))
        out.append(d)
    if args.json:
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print("\n\n".join(text))
    return 0
