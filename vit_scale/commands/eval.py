"""`vit-scale eval WEIGHTS --data SHARDS`: top-1/top-5 accuracy (precision@1 for multi-label)."""

from __future__ import annotations

from pathlib import Path

from vit_scale.commands.args import Parser, at_least, memory_for
from vit_scale.config.schema import DataConfig
from vit_scale.dist import device as rank_device
from vit_scale.errors import UserError
from vit_scale.evaluate.classify import evaluate
from vit_scale.io import writable_dir


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="vit-scale eval", description="Top-1/top-5 accuracy (precision@1 for multi-label) of weights."
    )
    parser.add_argument(
        "weights", help="checkpoint or run dir, export folder, .safetensors, timm state dict or .npz"
    )
    parser.add_argument(
        "--data", required=True, help="shard source to score (directory with index.json, ...)"
    )
    parser.add_argument("--img-size", type=at_least(1), default=None, help="resolution (default: the weights')")
    parser.add_argument(
        "--interp",
        choices=("bilinear", "bicubic"),
        default="bilinear",
        help="position-embedding interpolation when --img-size differs (default bilinear)",
    )
    parser.add_argument("--labels", choices=("int", "multi"), default="int", help="multi: multi-hot labels")
    parser.add_argument(
        "--crop",
        choices=("none", "center"),
        default="none",
        help="none: resize the whole image (the paper's evaluation, default); center: shorter side, then the "
        "central square",
    )
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument(
        "--run-dir", default=None, help="where results.json goes (default runs/eval_<weights>)"
    )
    args = parser.parse_args(argv)

    from vit_scale.checkpoint.weights import build_pretrained, load_pretrained
    from vit_scale.config.tasks import rule
    from vit_scale.config.validate import index_task
    from vit_scale.evaluate.common import dataset_name
    from vit_scale.models import set_resolution
    from vit_scale.observe.results import weights_label, write_results

    label = weights_label(args.weights)
    # Proven writable before minutes of work, and created only when the results are written, so a
    # refused option leaves nothing behind.
    run_dir = writable_dir(args.run_dir or Path("runs") / f"eval_{label}", "--run-dir", keep=False)
    task = index_task(args.data)
    why = rule(task, "crop")
    if args.crop == "center" and why:
        raise UserError(
            f"--crop center cuts the borders of the images scored, but {task}: {why}; use --crop none"
        )

    pre = load_pretrained(args.weights)
    if not pre.model.num_classes:
        raise UserError(
            f"{args.weights} has no classification head; fine-tune it first or use `vit-scale fewshot`"
        )
    model = build_pretrained(pre)
    img_size = args.img_size or pre.model.img_size
    with memory_for(f"--img-size {img_size} and --batch-size {args.batch_size}"):
        if img_size != pre.model.img_size:
            try:
                set_resolution(model, img_size, args.interp)
            except ValueError as e:
                raise UserError(f"--img-size: {e}") from None
        device = rank_device()
        model = model.to(device)
        data_cfg = DataConfig(workers=0, labels=args.labels, eval_crop=args.crop)
        metrics = evaluate(
            model,
            args.data,
            data_cfg,
            img_size=img_size,
            batch_size=args.batch_size,
            device=device,
            progress=True,
        )
    name = dataset_name(args.data)
    metric = "prec1" if "prec1" in metrics else "top1"
    path = write_results(
        run_dir,
        {
            "kind": "eval",
            "model": label,
            "metric": metric,
            "datasets": {name: metrics},
            "details": {
                "weights": str(args.weights),
                "source": pre.source,
                "data": args.data,
                "img_size": img_size,
                "crop": args.crop,
            },
        },
    )
    shown = "  ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items() if k in ("top1", "top5", "prec1"))
    print(f"{name}: {shown} over {metrics['n']} images; wrote {path}")
    return 0
