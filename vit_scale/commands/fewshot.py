"""`vit-scale fewshot WEIGHTS --train A --test B`: few-shot linear evaluation of frozen representations."""

from __future__ import annotations

from pathlib import Path

from vit_scale.commands.args import Parser, at_least, int_list, memory_for, positive_float
from vit_scale.evaluate.fewshot import fewshot_run
from vit_scale.io import writable_dir
from vit_scale.observe.results import RESULTS, weights_label


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="vit-scale fewshot",
        description="Few-shot linear evaluation of frozen representations (regularised least squares).",
    )
    parser.add_argument(
        "weights", help="checkpoint or run dir, export folder, .safetensors, timm state dict or .npz"
    )
    parser.add_argument(
        "--train", required=True, help="shard source the shots are drawn from (';' for several)"
    )
    parser.add_argument(
        "--test", required=True, help="shard source scored (';' for several, paired with --train)"
    )
    parser.add_argument("--shots", type=int_list, default=[1, 5, 10, 25], help="default 1,5,10,25")
    parser.add_argument("--seeds", type=at_least(1), default=3, help="draws of the shots per setting (default 3)")
    parser.add_argument(
        "--l2",
        type=positive_float,
        default=None,
        help="ridge penalty (default: chosen per fit by leave-one-out cross-validation within the shots)",
    )
    parser.add_argument("--img-size", type=at_least(1), default=None, help="resolution (default: the weights')")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument(
        "--run-dir", default=None, help="where results.json goes (default runs/fewshot_<weights>)"
    )
    args = parser.parse_args(argv)

    run_dir = writable_dir(args.run_dir or Path("runs") / f"fewshot_{weights_label(args.weights)}", "--run-dir")
    with memory_for(f"--img-size {args.img_size or 'of the weights'} and --batch-size {args.batch_size}"):
        results = fewshot_run(
            args.weights, args.train, args.test, run_dir,
            shots=args.shots, seeds=args.seeds, l2=args.l2, img_size=args.img_size, batch_size=args.batch_size,
        )
    for row, scores in results["datasets"].items():
        print(f"{row:<28} {100 * scores['top1']:6.2f} ± {100 * scores['top1_std']:.2f} %")
    print(f"wrote {run_dir / RESULTS}")
    return 0
