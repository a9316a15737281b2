"""`vit-scale demo`: the whole system on embedded data, on a laptop-class CPU, with no download.

1. builds the two embedded corpora through the same shard writer as real data: the pretraining corpus
   (`--corpus`: by default glyphs, 65 letters and symbols with no digits drawn from fonts the way optdigits
   scanned its handwriting; or FractalDB-style fractals) and scikit-learn's digits (transfer);
2. pretrains a small ViT on it on `--nproc` local processes, DeepSpeed ZeRO-2, bf16, activation
   checkpointing, committing checkpoints as it goes (configs/demo/pretrain_<corpus>.yaml);
3. fine-tunes it on the digits at a higher resolution (position embeddings interpolated), and the same
   architecture from scratch with the same budget (configs/demo/finetune_digits.yaml);
4. few-shot linear evaluation on the digits of the frozen pretrained representation, and of the same
   architecture at random initialisation (the weights the scratch fine-tune starts from);
5. renders the report of all runs;
6. prints one table: pretrained vs baseline accuracy, few-shot accuracy, images/s and time per stage.

Training stages start their ranks as `vit-scale pretrain|finetune --nproc N` would (the command layer's one
launcher), so a stage sees what a user typing the command would, and one stage's process group never leaks
into the next; the other stages call the library in this process. A stage that fails is reported with
its error, and the stages that need its output are skipped.

The size knobs (see `vit-scale demo --help`) scale every stage. With the defaults, measured 2026-11-30 on
the 2-core AMD EPYC VM shared with other jobs (load average 6-8): glyphs 40 s, pretraining 429 s
(147 images/s), each fine-tune about 155 s, each few-shot 10 s, 13.6 minutes in all, 608 CPU-seconds.
Pretraining and fine-tuning time scale with --pretrain-steps and --finetune-steps; the corpus with
--classes x --per-class.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vit_scale.commands.args import Parser, at_least
from vit_scale.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
FINETUNE_CONFIG = CONFIGS / "finetune_digits.yaml"


@dataclass(frozen=True)
class Corpus:
    """A pretraining corpus the demo can make: its recipe and its default size."""

    config: Path
    classes: int
    per_class: int
    what: str  # for the table's title: "what pretraining on WHAT bought"
    most_classes: int | None = None  # None: any number


CORPORA = {
    "glyphs": Corpus(CONFIGS / "pretrain_glyphs.yaml", 65, 300, "glyphs (no digits)", most_classes=65),
    "fractals": Corpus(CONFIGS / "pretrain_fractals.yaml", 20, 400, "fractals"),
}
FEWSHOT_SHOTS = (1, 5, 10, 25)
MARKER = ".vit-scale-demo"


@dataclass
class Knobs:
    """The demo's size: every stage's cost follows from these."""

    out: Path = Path("runs/demo")
    corpus: str = "glyphs"  # a key of CORPORA
    classes: int | None = None  # pretraining classes (default: the corpus's, CORPORA)
    per_class: int | None = None  # instances per class (default: the corpus's)
    pretrain_size: int = 24  # pretraining resolution (px)
    finetune_size: int = 32  # fine-tuning resolution (px): higher, so position embeddings are resampled
    pretrain_steps: int | None = None  # default: the corpus recipe's train.steps
    finetune_steps: int = 400
    nproc: int = 2  # local processes for pretraining (ZeRO-2 shards optimizer state and gradients over them)
    workers: int | None = None  # processes for corpus generation (default: all cores)


@dataclass
class Stage:
    name: str
    status: str = "pending"  # "done", "cached", "skipped: why", "failed: why"
    seconds: float | None = None
    images_per_s: float | None = None
    result: str = ""
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "cached")


@dataclass
class Demo:
    knobs: Knobs
    stages: list[Stage] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.knobs.out / "data"

    @property
    def runs(self) -> Path:
        return self.knobs.out / "runs"

    def stage(self, name: str) -> Stage:
        s = Stage(name)
        self.stages.append(s)
        return s

    def get(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# ---------------------------------------------------------------- running stages


def _share_cores(nproc: int) -> None:
    """The environment the training ranks inherit: one thread per rank and core instead of each rank
    spinning a thread per core, and never the network in a demo."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    os.environ.setdefault("WANDB_MODE", "offline")


def _train(stage: Stage, command: str, argv: list[str], nproc: int) -> bool:
    """`vit-scale COMMAND ARGV` on `nproc` local ranks, timed; False (and the stage marked) when it fails."""
    from vit_scale.commands.ranks import start_local

    _announce(stage.name, f"vit-scale {command} {' '.join(argv)} --nproc {nproc}")
    start = time.perf_counter()
    # A demo stops at the first failure and says so rather than retrying a broken stage.
    code = start_local(command, nproc, argv, max_restarts=0)
    stage.seconds = time.perf_counter() - start
    if code != 0:
        stage.status = f"failed: `vit-scale {command}` exited with {code}"
        return False
    stage.status = "done"
    return True


def _in_process(stage: Stage, what: str, work) -> bool:
    """Run `work()` here, timed; a user error marks the stage failed with its message."""
    _announce(stage.name, what)
    start = time.perf_counter()
    try:
        work()
    except UserError as e:
        stage.status = f"failed: {e}"
        return False
    finally:
        stage.seconds = time.perf_counter() - start
    stage.status = "done"
    return True


def _announce(name: str, what: str) -> None:
    """A header before each stage's own output, with the command to type to run it alone."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    console.rule(f"[bold]{name}")
    console.print(what, soft_wrap=True, markup=False)  # paths, not markup


def _needs(stage: Stage, *deps: Stage) -> bool:
    for dep in deps:
        if not dep.ok:
            stage.status = f"skipped: needs {dep.name}"
            return False
    return True


# ---------------------------------------------------------------- stages


def _corpus(stage: Stage, out: Path, recipe: dict, build) -> None:
    """Build a corpus unless `out` already holds one made with the same recipe (a re-run reuses it)."""
    index = out / "index.json"
    if index.exists() and json.loads(index.read_text()).get("generator") == recipe:
        stage.status = "cached"
        stage.seconds = 0.0
    else:
        _announce(stage.name, f"building {out}")
        start = time.perf_counter()
        build()
        stage.seconds = time.perf_counter() - start
        stage.status = "done"
    stage.path = out


def fresh_runs(demo: Demo) -> None:
    """Start every run from nothing, so each stage's time and result are this demo's own.

    The runs would otherwise resume (pretraining) or return earlier results (fine-tuning) made with
    other knobs. Only directories this command made are removed: OUT carries a marker file.
    """
    out = demo.knobs.out
    marker = out / MARKER
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise UserError(f"demo: {out} exists and was not made by `vit-scale demo`; pass a new --out")
    for name in ("runs", "report"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `vit-scale demo`: its runs/ and report/ are replaced on every run\n")


def build_corpora(demo: Demo) -> None:
    from vit_scale.data import digits, glyphs, synth

    k = demo.knobs
    stage = demo.stage(f"{k.corpus} corpus")
    n = k.classes * k.per_class
    # Enough shards that every pretraining rank and loader worker has its own.
    shard_size = max(1, min(synth.SHARD_SIZE, n // (4 * k.nproc)))
    recipe = {"corpus": k.corpus, "seed": 0, "classes": k.classes, "per_class": k.per_class, "size": k.pretrain_size}
    write = synth.write_fractals if k.corpus == "fractals" else glyphs.write_glyphs
    _corpus(
        stage,
        demo.data / k.corpus,
        recipe,
        lambda: write(
            demo.data / k.corpus,
            classes=k.classes,
            per_class=k.per_class,
            size=k.pretrain_size,
            workers=k.workers,
            shard_size=shard_size,
        ),
    )
    stage.images_per_s = n / stage.seconds if stage.status == "done" and stage.seconds else None
    stage.result = f"{n:,} images, {k.classes} classes, {k.pretrain_size} px"

    digit_stage = demo.stage("digits corpus")
    recipe = {
        "corpus": "sklearn.load_digits",
        "size": k.finetune_size,
        "split_seed": digits.SPLIT_SEED,
        "test_per_class": digits.TEST_PER_CLASS,
    }
    _corpus(
        digit_stage,
        demo.data / "digits" / "test",
        recipe,
        lambda: digits.write_digits(demo.data / "digits", size=k.finetune_size),
    )
    digit_stage.path = demo.data / "digits"
    digit_stage.result = f"1,297 train / 500 test, {k.finetune_size} px"


def pretrain_overrides(demo: Demo) -> list[str]:
    k = demo.knobs
    return [
        f"data.train={demo.data / k.corpus}",
        f"model.num_classes={k.classes}",
        f"model.img_size={k.pretrain_size}",
        f"train.steps={k.pretrain_steps}",
        f"checkpoint.every_steps={max(1, k.pretrain_steps // 3)}",
    ]


def finetune_overrides(demo: Demo, init: Path) -> list[str]:
    k = demo.knobs
    return [
        f"data.train={demo.data / 'digits' / 'train'}",
        f"data.test={demo.data / 'digits' / 'test'}",
        f"model.img_size={k.finetune_size}",
        f"train.steps={k.finetune_steps}",
        f"init={init}",
    ]


def check_recipes(demo: Demo) -> None:
    """The training stages' settings through the validation pass before any stage runs, so knobs the recipes
    cannot take (a size that is not a multiple of the patch, a batch the processes cannot split) are refused
    now, not after the corpora are built. The fine-tune checks that need files (its starting weights) wait for
    the stages that write them."""
    from vit_scale.config import ConfigError, load_config, validate

    for what, recipe, overrides in (
        ("pretraining", CORPORA[demo.knobs.corpus].config, pretrain_overrides(demo)),
        ("fine-tuning", FINETUNE_CONFIG, finetune_overrides(demo, demo.runs / "pretrain")),
    ):
        try:
            validate(load_config(recipe, overrides), demo.knobs.nproc)
        except ConfigError as e:
            raise UserError(f"demo: {what} cannot run with these knobs: {e}") from None


def pretrain(demo: Demo) -> None:
    k = demo.knobs
    stage = demo.stage("pretrain")
    if not _needs(stage, demo.get(f"{k.corpus} corpus")):
        return
    stage.path = demo.runs / "pretrain"
    argv = [str(CORPORA[k.corpus].config), *pretrain_overrides(demo), "--run-dir", str(stage.path)]
    if _train(stage, "pretrain", argv, k.nproc):
        stage.images_per_s = _throughput(stage.path)
        stage.result = _final_loss(stage.path)


def finetune(demo: Demo, name: str, weights: str) -> None:
    """Fine-tune on the digits from the weights of stage `weights`; every other setting is the same."""
    k = demo.knobs
    stage = demo.stage(name)
    init = demo.get(weights)
    if not _needs(stage, demo.get("digits corpus"), init):
        return
    stage.path = demo.runs / name.replace(" ", "_")
    # On as many single-threaded ranks as pretraining: a second thread per process stalls whenever anything
    # else wants a core, while separate ranks keep going.
    argv = [str(FINETUNE_CONFIG), *finetune_overrides(demo, init.path), "--run-dir", str(stage.path)]
    if _train(stage, "finetune", argv, k.nproc):
        stage.images_per_s = _throughput(stage.path)
        stage.result = _accuracy_text(stage.path)


def random_init(demo: Demo) -> None:
    """The demo architecture with random weights, saved so few-shot can show what features pretraining bought."""
    import torch
    from safetensors.torch import save

    from vit_scale.config.loader import load_config
    from vit_scale.io import atomic_write_bytes
    from vit_scale.models import build_model, model_dims

    k = demo.knobs
    stage = demo.stage("random init")
    start = time.perf_counter()
    cfg = load_config(
        CORPORA[k.corpus].config, [f"model.img_size={k.pretrain_size}", f"model.num_classes={k.classes}"]
    )
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    stage.path = demo.runs / "random_init"
    # The head count is not in the shapes: record it where the weight reader looks for it.
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    heads = str(model_dims(cfg.model)["heads"])
    atomic_write_bytes(stage.path / "model.safetensors", save(tensors, metadata={"heads": heads}))
    stage.seconds = time.perf_counter() - start
    stage.status = "done"


def fewshot(demo: Demo, name: str, weights: str) -> None:
    """Few-shot linear probes on the digits of the frozen representation of `weights` (a stage name)."""
    stage = demo.stage(name)
    source = demo.get(weights)
    if not _needs(stage, demo.get("digits corpus"), source):
        return
    stage.path = demo.runs / name.replace(" ", "_").replace("-", "")
    digits_dir = demo.data / "digits"

    def work():
        from vit_scale.evaluate.fewshot import fewshot_run

        fewshot_run(
            str(source.path),
            str(digits_dir / "train"),
            str(digits_dir / "test"),
            stage.path,
            shots=list(FEWSHOT_SHOTS),
            seeds=3,
            img_size=demo.knobs.finetune_size,
        )

    if _in_process(stage, f"few-shot linear probes of {source.path} on {digits_dir}", work):
        stage.result = _accuracy_text(stage.path)


def report(demo: Demo) -> None:
    stage = demo.stage("report")
    runs = [
        s.path
        for s in demo.stages
        if s.ok
        and s.path is not None
        and any((s.path / f).exists() for f in ("metrics.jsonl", "results.json"))
    ]
    if not runs:
        stage.status = "skipped: no finished runs"
        return
    stage.path = demo.knobs.out / "report"

    def work():
        from vit_scale.observe.report import report as write_report

        write_report(runs, stage.path)

    _in_process(stage, f"report of {len(runs)} runs into {stage.path}", work)


# ---------------------------------------------------------------- reading what the runs wrote


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _throughput(run_dir: Path) -> float | None:
    """The trainer's own images/s, the mean of its logged values after the first (warm-up) one."""
    values = [m["images_per_s"] for m in _metrics(run_dir) if m.get("images_per_s") is not None]
    values = values[1:] or values
    return sum(values) / len(values) if values else None


def _final_loss(run_dir: Path) -> str:
    losses = [m["loss"] for m in _metrics(run_dir) if "loss" in m]
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""


def _results(run_dir: Path) -> dict[str, dict]:
    path = run_dir / "results.json"
    return json.loads(path.read_text())["datasets"] if path.exists() else {}


def _accuracy_text(run_dir: Path) -> str:
    """'digits 97.2%', or for few-shot rows ('digits 5-shot', ...) 'digits 1/5-shot 20.1/55.0%'."""
    rows = {name: row["top1"] for name, row in _results(run_dir).items() if "top1" in row}
    shots = [name.rsplit(" ", 1) for name in rows if name.endswith("-shot")]
    if shots and len(shots) == len(rows):
        counts = "/".join(n.removesuffix("-shot") for _, n in shots)
        accs = "/".join(f"{100 * v:.1f}" for v in rows.values())
        return f"{shots[0][0]} {counts}-shot {accs}%"
    return ", ".join(f"{name} {100 * v:.1f}%" for name, v in rows.items())


def _top1_rows(stage: Stage) -> dict[str, float]:
    """{dataset row: top-1} of a finished transfer stage; empty when it did not finish."""
    if not stage.ok or stage.path is None:
        return {}
    return {name: row["top1"] for name, row in _results(stage.path).items() if "top1" in row}


# ---------------------------------------------------------------- the final table


def summary(demo: Demo) -> dict:
    """Everything the final table shows, also written to OUT/summary.json.

    `comparison` maps each evaluation to {"pretrained": top-1, "baseline": top-1}: fine-tuning is compared
    with the same architecture trained from scratch for the same steps, the frozen few-shot probes with
    the same architecture at random initialisation.
    """
    k = demo.knobs
    ft_pre = _top1_rows(demo.get("finetune pretrained"))
    ft_scratch = _top1_rows(demo.get("finetune scratch"))
    few_pre = _top1_rows(demo.get("few-shot pretrained"))
    few_rand = _top1_rows(demo.get("few-shot random init"))
    comparison = {
        f"fine-tuned {k.finetune_steps} steps": {
            "pretrained": next(iter(ft_pre.values()), None),
            "baseline": next(iter(ft_scratch.values()), None),
        }
    }
    for row in dict.fromkeys([*few_pre, *few_rand]):
        comparison[f"frozen, {row.split(' ', 1)[-1]} linear"] = {
            "pretrained": few_pre.get(row),
            "baseline": few_rand.get(row),
        }
    return {
        "knobs": {name: (str(v) if isinstance(v, Path) else v) for name, v in vars(k).items()},
        "digits_top1": comparison,
        "stages": [
            {
                "name": s.name,
                "status": s.status,
                "seconds": s.seconds,
                "images_per_s": s.images_per_s,
                "result": s.result,
                "path": str(s.path) if s.path else None,
            }
            for s in demo.stages
        ],
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def print_tables(demo: Demo, data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)  # paths and error messages, not markup
    headline = Table(title=f"Digits test top-1: what pretraining on {CORPORA[demo.knobs.corpus].what} bought")
    headline.add_column("evaluation")
    headline.add_column("pretrained", justify="right")
    headline.add_column("baseline", justify="right")
    headline.add_column("baseline is")
    for name, pair in data["digits_top1"].items():
        kind = "from scratch, same steps" if name.startswith("fine-tuned") else "random init, frozen"
        headline.add_row(name, _pct(pair["pretrained"]), _pct(pair["baseline"]), kind)
    console.print(headline)

    stages = Table(title="Stages")
    for col, justify in (("stage", "left"), ("time", "right"), ("images/s", "right"), ("result", "left")):
        stages.add_column(col, justify=justify)
    for st in demo.stages:
        stages.add_row(
            st.name,
            "cached" if st.status == "cached" else "–" if st.seconds is None else f"{st.seconds:.0f} s",
            "–" if st.images_per_s is None else f"{st.images_per_s:,.0f}",
            st.result if st.ok and st.result else st.status,
        )
    console.print(stages)
    for st in demo.stages:
        if st.path is not None:
            console.print(f"{st.name:<20} {st.path}", highlight=False, soft_wrap=True)
    console.print(f"{'summary':<20} {demo.knobs.out / 'summary.json'}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- command line


def _parser() -> Parser:
    d = Knobs()
    p = Parser(
        prog="vit-scale demo",
        description="The whole system on embedded data: glyph or fractal corpus, ZeRO-2 pretraining on local "
        "processes, fine-tuning on digits (pretrained and from scratch), few-shot, report, one table.",
    )
    p.add_argument(
        "--out", type=Path, default=d.out, help=f"where data, runs and report go (default {d.out})"
    )
    p.add_argument(
        "--corpus",
        choices=sorted(CORPORA),
        default=d.corpus,
        help=f"pretraining corpus (default {d.corpus}): letters and symbols drawn like the digits, or fractals",
    )
    defaults = ", ".join(f"{name} {c.classes}" for name, c in CORPORA.items())
    p.add_argument("--classes", type=at_least(2), default=None, help=f"pretraining classes (default: {defaults})")
    defaults = ", ".join(f"{name} {c.per_class}" for name, c in CORPORA.items())
    p.add_argument("--per-class", type=at_least(1), default=None, help=f"images per class (default: {defaults})")
    p.add_argument(
        "--pretrain-size",
        type=at_least(1),
        default=d.pretrain_size,
        help=f"pretraining px (default {d.pretrain_size})",
    )
    p.add_argument(
        "--finetune-size",
        type=at_least(1),
        default=d.finetune_size,
        help=f"fine-tuning px (default {d.finetune_size})",
    )
    p.add_argument(
        "--pretrain-steps", type=at_least(1), default=None, help="default: the corpus recipe's train.steps"
    )
    p.add_argument(
        "--finetune-steps",
        type=at_least(1),
        default=d.finetune_steps,
        help=f"each fine-tune (default {d.finetune_steps})",
    )
    p.add_argument("--nproc", type=at_least(1), default=d.nproc, help=f"pretraining processes (default {d.nproc})")
    p.add_argument(
        "--workers", type=at_least(1), default=None, help="corpus generation processes (default: all cores)"
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    knobs = Knobs(**{k: getattr(args, k) for k in vars(Knobs())})
    corpus = CORPORA[knobs.corpus]
    knobs.classes = corpus.classes if knobs.classes is None else knobs.classes
    knobs.per_class = corpus.per_class if knobs.per_class is None else knobs.per_class
    if corpus.most_classes is not None and knobs.classes > corpus.most_classes:
        raise UserError(f"demo: the {knobs.corpus} have {corpus.most_classes} classes; --classes {knobs.classes}")
    if not corpus.config.is_file() or not FINETUNE_CONFIG.is_file():
        raise UserError(
            f"demo: its recipes {CONFIGS} are missing; run it from a source checkout (`pip install -e .`)"
        )
    if knobs.pretrain_steps is None:
        from vit_scale.config.loader import load_config

        knobs.pretrain_steps = load_config(corpus.config, []).train.steps
    from vit_scale.io import atomic_write_json

    demo = Demo(knobs)
    check_recipes(demo)
    _share_cores(knobs.nproc)
    fresh_runs(demo)
    start = time.perf_counter()
    build_corpora(demo)
    pretrain(demo)
    random_init(demo)
    finetune(demo, "finetune pretrained", "pretrain")
    finetune(demo, "finetune scratch", "random init")
    fewshot(demo, "few-shot pretrained", "pretrain")
    fewshot(demo, "few-shot random init", "random init")
    report(demo)
    total = demo.stage("total")
    total.seconds = time.perf_counter() - start
    total.status = "done"
    data = summary(demo)
    atomic_write_json(knobs.out / "summary.json", data)
    print_tables(demo, data)
    return 1 if any(s.status.startswith("failed") for s in demo.stages) else 0
