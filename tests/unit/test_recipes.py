"""Every recipe against the paper's tables, field by field, and every recipe's header.

The paper's values are typed in here from its Table 3 (pretraining), Table 4 and Appendix B.1.1
(fine-tuning), as tests/unit/test_models.py does for Table 1; a recipe file not listed here fails, so a
new recipe comes with its row.
"""

from pathlib import Path

import pytest

from vit_scale.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Table 3: (epochs allowed, base learning rate, weight decay, dropout) per (model, pretraining data).
PAPER_TABLE_3 = {
    ("vit_b16", "jft"): ({7}, 8e-4, 0.1, 0.0),
    ("vit_b32", "jft"): ({7}, 8e-4, 0.1, 0.0),
    ("vit_l32", "jft"): ({7}, 6e-4, 0.1, 0.0),
    ("vit_l16", "jft"): ({7, 14}, 4e-4, 0.1, 0.0),
    ("vit_h14", "jft"): ({14}, 3e-4, 0.1, 0.0),
    ("vit_b16", "in21k"): ({90}, 1e-3, 0.03, 0.1),
    ("vit_b32", "in21k"): ({90}, 1e-3, 0.03, 0.1),
    ("vit_l16", "in21k"): ({30, 90}, 1e-3, 0.03, 0.1),
    ("vit_l32", "in21k"): ({30, 90}, 1e-3, 0.03, 0.1),
    ("*", "in1k"): ({300}, 3e-3, 0.3, 0.1),
}
# Section 4.1 / Table 3, for every row: Adam (0.9, 0.999), batch 4096, 224 px, 10k warmup steps, linear
# decay except ImageNet-1k (cosine), clipping at global norm 1 (added for ImageNet-1k; our base keeps it).
PRETRAIN_COMMON = {"betas": [0.9, 0.999], "global_batch": 4096, "img_size": 224, "warmup_steps": 10000}
CLASSES = {"jft": 18291, "in21k": 21843, "in1k": 1000}

# Table 4: (steps, learning-rate grid) per fine-tuning dataset; VTAB-1k trains one rate.
PAPER_TABLE_4 = {
    "imagenet": (20000, [0.003, 0.01, 0.03, 0.06]),
    "cifar10": (10000, [0.001, 0.003, 0.01, 0.03]),
    "cifar100": (10000, [0.001, 0.003, 0.01, 0.03]),
    "pets": (500, [0.001, 0.003, 0.01, 0.03]),
    "flowers102": (500, [0.001, 0.003, 0.01, 0.03]),
    "vtab": (2500, [0.01]),
}
# Appendix B.1.1: SGD momentum 0.9, batch 512, no weight decay, clipping at 1, cosine decay, 384 px;
# ImageNet with Polyak averaging 0.9999 and ViT-L/16 at 512 px for Table 2.
FINETUNE_COMMON = {"name": "sgd", "momentum": 0.9, "global_batch": 512, "weight_decay": 0.0, "grad_clip": 1.0}
POLYAK = {"imagenet": 0.9999}

PRETRAIN_RECIPES = {  # file -> (model, data)
    "vit_b16_jft.yaml": ("vit_b16", "jft"),
    "vit_b32_jft.yaml": ("vit_b32", "jft"),
    "vit_l16_jft.yaml": ("vit_l16", "jft"),
    "vit_l32_jft.yaml": ("vit_l32", "jft"),
    "vit_h14_jft.yaml": ("vit_h14", "jft"),
    "vit_b16_in21k.yaml": ("vit_b16", "in21k"),
    "vit_b32_in21k.yaml": ("vit_b32", "in21k"),
    "vit_l16_in21k.yaml": ("vit_l16", "in21k"),
    "vit_l32_in21k.yaml": ("vit_l32", "in21k"),
    "vit_b16_in1k.yaml": ("vit_b16", "in1k"),
}
FINETUNE_RECIPES = {  # file -> (dataset, model, resolution)
    "finetune/imagenet_vit_b16.yaml": ("imagenet", "vit_b16", 384),
    "finetune/imagenet_vit_l16.yaml": ("imagenet", "vit_l16", 512),
    "finetune/cifar10_vit_b16.yaml": ("cifar10", "vit_b16", 384),
    "finetune/cifar100_vit_b16.yaml": ("cifar100", "vit_b16", 384),
    "finetune/pets_vit_b16.yaml": ("pets", "vit_b16", 384),
    "finetune/flowers102_vit_b16.yaml": ("flowers102", "vit_b16", 384),
    "vtab/vtab1k.yaml": ("vtab", "vit_b16", 384),
}
BASES = {
    "pretrain/paper_base.yaml",
    "pretrain/tiny_cpu.yaml",
    "finetune/base.yaml",
}  # no paper row of their own


def test_every_recipe_has_its_row_in_the_paper_tables():
    recipes = {
        str(p.relative_to(CONFIGS))
        for section in ("pretrain", "finetune", "vtab")
        for p in (CONFIGS / section).glob("*.yaml")
    }
    listed = {f"pretrain/{f}" for f in PRETRAIN_RECIPES} | set(FINETUNE_RECIPES) | BASES
    assert recipes == listed


@pytest.mark.parametrize("name", sorted(PRETRAIN_RECIPES))
def test_pretraining_recipe_matches_table_3(name):
    model, data = PRETRAIN_RECIPES[name]
    epochs, lr, wd, dropout = PAPER_TABLE_3.get((model, data)) or PAPER_TABLE_3[("*", data)]
    cfg = load_config(CONFIGS / "pretrain" / name)
    got = {
        "variant": cfg.model.variant,
        "epochs": cfg.train.epochs,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "dropout": cfg.model.dropout,
        "optimizer": cfg.optim.name,
        "betas": cfg.optim.betas,
        "global_batch": cfg.train.global_batch,
        "img_size": cfg.model.img_size,
        "warmup_steps": cfg.schedule.warmup_steps,
        "decay": cfg.schedule.decay,
        "num_classes": cfg.model.num_classes,
        "labels": cfg.data.labels,
    }
    want = {
        "variant": model,
        "epochs": got["epochs"] if got["epochs"] in epochs else sorted(epochs),
        "lr": lr,
        "weight_decay": wd,
        "dropout": dropout,
        "optimizer": "adamw",
        **PRETRAIN_COMMON,
        "decay": "cosine" if data == "in1k" else "linear",
        "num_classes": CLASSES[data],
        "labels": "multi" if data == "jft" else "int",  # JFT is multi-label: sigmoid cross-entropy
    }
    assert got == want
    if data == "in1k":
        assert cfg.optim.grad_clip == 1.0  # "gradient clipping at global norm 1" for ImageNet-1k


@pytest.mark.parametrize("name", sorted(FINETUNE_RECIPES))
def test_finetuning_recipe_matches_table_4(name):
    dataset, model, img_size = FINETUNE_RECIPES[name]
    steps, grid = PAPER_TABLE_4[dataset]
    cfg = load_config(CONFIGS / name)
    o = cfg.optim
    got = {
        "variant": cfg.model.variant,
        "img_size": cfg.model.img_size,
        "steps": cfg.train.steps,
        "grid": cfg.sweep.lr or [o.lr],
        "name": o.name,
        "momentum": o.momentum,
        "global_batch": cfg.train.global_batch,
        "weight_decay": o.weight_decay,
        "grad_clip": o.grad_clip,
        "decay": cfg.schedule.decay,
        "ema_decay": o.ema_decay,
        "head_dropout": (cfg.model.dropout, cfg.model.drop_path),
    }
    want = {
        "variant": model,
        "img_size": img_size,
        "steps": steps,
        "grid": grid,
        **FINETUNE_COMMON,
        "decay": "cosine",
        "ema_decay": POLYAK.get(dataset, 0.0),
        "head_dropout": (0.0, 0.0),
    }
    assert got == want
    if dataset == "vtab":  # one setting for every task, resized only (the VTAB protocol)
        assert (o.lr, cfg.data.augment, cfg.data.hflip, cfg.data.eval_crop) == (0.01, "resize", False, "none")
    else:  # the paper's fine-tuning input: inception crop of area 0.05..1, flip; evaluation resizes whole
        d = cfg.data
        assert (d.augment, d.crop_area_min, d.hflip, d.eval_crop) == ("inception", 0.05, True, "none")


@pytest.mark.parametrize(
    "name",
    sorted({f"pretrain/{f}" for f in PRETRAIN_RECIPES} | set(FINETUNE_RECIPES) | {"pretrain/tiny_cpu.yaml"}),
)
def test_recipe_header_says_how_to_run_it_on_what_and_what_to_expect(name):
    text = (CONFIGS / name).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header = "\n".join(header)
    assert "vit-scale " in header, "the command that runs it"
    assert "Hardware" in header, "the hardware it assumes"
    assert "Expect" in header, "the metric it should reach"
    assert "hour" in header or "minute" in header, "how long it takes"
