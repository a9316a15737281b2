"""One process, the real engine of the tiny recipe after a training step: the same state saved in the
foreground (run A) and in the background (run B), B's writer held back until three more training steps
have changed every weight and the optimizer state. Prints, as JSON, both manifests' files, whether the
training moved the weights, and whether B loads back as the weights of its step; then, with the host's
available memory reported as none, whether a background save is written in the foreground instead."""

import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

from vit_scale.checkpoint import commit, snapshot
from vit_scale.config import load_config, validate
from vit_scale.models import build_model
from vit_scale.train.engine import build_engine, init_distributed
from vit_scale.train.loop import loss_function, train_step


def main() -> int:
    config, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(config, ["train.global_batch=2"])
    init_distributed(cfg)
    engine, _, _ = build_engine(cfg, build_model(cfg.model), validate(cfg, 1), 10)
    size = cfg.model.img_size
    batch = [(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8), torch.tensor([0, 1]))]
    train_step(engine, batch, loss_function(cfg), torch.float32)
    at_save = {k: v.clone() for k, v in engine.module.state_dict().items()}
    trainer, own = {"step": 1}, {"rng": commit.rng_state(), "data": {"position": 7}}

    commit.save(engine, out / "a", 1, trainer, own, config={})
    gate, write_file = threading.Event(), snapshot.write_file

    def held(path, state):
        gate.wait()
        return write_file(path, state)

    snapshot.write_file = held
    saver = commit.Saver(engine, out / "b", config={}, background=True)
    saver.save(1, trainer, own)
    for _ in range(3):
        train_step(engine, batch, loss_function(cfg), torch.float32)
    moved = any(not torch.equal(v, at_save[k]) for k, v in engine.module.state_dict().items())
    committed_early = (out / "b" / "checkpoints" / "step_000000001" / commit.COMMITTED).exists()
    gate.set()
    saver.wait()
    ckpt = out / "b" / "checkpoints" / "step_000000001"
    _, rank_state = commit.load(engine, ckpt)
    loaded = all(torch.equal(v, at_save[k]) for k, v in engine.module.state_dict().items())
    files = {run: commit.read_manifest(out / run / "checkpoints" / "step_000000001")["files"] for run in "ab"}

    # A host with no memory to spare for the copy: the next save is written in the foreground instead.
    psutil.virtual_memory = lambda: SimpleNamespace(available=0)
    saver = commit.Saver(engine, out / "c", config={}, background=True)
    saver.save(2, {"step": 2}, own)
    foreground = (
        not saver.in_flight and (out / "c" / "checkpoints" / "step_000000002" / commit.COMMITTED).exists()
    )
    print(
        json.dumps(
            {
                "files": files,
                "moved": moved,
                "committed_early": committed_early,
                "loaded_is_step_1": loaded,
                "rank_data": rank_state["data"],
                "foreground_without_memory": foreground,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
