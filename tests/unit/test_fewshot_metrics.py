"""The hook the training loop calls: names, several datasets, multi-label pretraining, model untouched."""

from pathlib import Path

import torch
from transfer_helpers import write_class_shards

from vit_scale.config import load_config
from vit_scale.evaluate.fewshot import fewshot_metrics
from vit_scale.models import build_model

REPO = Path(__file__).resolve().parents[2]


def test_fewshot_hook_during_a_multilabel_pretraining(tmp_path):
    for name, classes in (("pets", 3), ("dtd", 2)):
        write_class_shards(tmp_path / name / "train", classes, per_class=3, seed=1)
        write_class_shards(tmp_path / name / "test", classes, per_class=2, seed=2)
    cfg = load_config(REPO / "configs/pretrain/tiny_cpu.yaml", [
        "data.labels=multi", "data.workers=0", "eval.fewshot_shots=[1,2]", "eval.fewshot_seeds=2",
        f"eval.fewshot_train={tmp_path / 'pets/train'};{tmp_path / 'dtd/train'}",
        f"eval.fewshot_test={tmp_path / 'pets/test'};{tmp_path / 'dtd/test'}",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    out = fewshot_metrics(model, cfg, 0, 1)
    assert sorted(out) == [
        "fewshot/dtd_1shot",
        "fewshot/dtd_2shot",
        "fewshot/pets_1shot",
        "fewshot/pets_2shot",
    ]
    # 6 and 4 test images, 2 seeds: every score is a mean of two whole counts, k/12 or k/8.
    assert all(0 <= v <= 1 and abs(v * 24 - round(v * 24)) < 1e-9 for v in out.values())
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
