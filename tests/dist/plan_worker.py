"""One rank of the planner's validation: for each case (a list of config overrides, given as JSON), build the
real DeepSpeed engine the way the trainer does, train two steps of two micro batches each, and write what
the rank holds and sends as one JSON line of OUT_DIR/rank<R>.jsonl (the test passes the model, batch and
precision as overrides too):

  - bytes of every tensor storage reachable from the engine, each storage once, by dtype, at three moments of
    the second step: after its last backward, inside the optimizer step (the first parameter group's step
    pre-hook) and after the step;
  - ZeRO-3: the most parameter elements gathered whole at once (not persistent) during the second step;
  - bytes passed to each torch.distributed collective during the second step (DeepSpeed calls them through
    `deepspeed.comm`, which looks them up on torch.distributed at call time or at its init, after we wrap).

    python -m torch.distributed.run --standalone --nproc-per-node=N plan_worker.py '[[...overrides], ...]' OUT_DIR
"""

import collections
import functools
import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

# ---------------------------------------------------------------- counting collectives

SENT = collections.Counter()
COUNTING = [False]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _wrap(name, size):
    original = getattr(dist, name)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        if COUNTING[0]:
            SENT[KIND[name]] += size(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(dist, name, counted)


KIND = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "all_to_all_single": "all_to_all",
}


def _arg(args, kwargs, i, name):
    return kwargs[name] if name in kwargs else args[i]


_wrap("all_reduce", lambda *a, **k: _nbytes(_arg(a, k, 0, "tensor")))
_wrap("broadcast", lambda *a, **k: _nbytes(_arg(a, k, 0, "tensor")))
_wrap("reduce", lambda *a, **k: _nbytes(_arg(a, k, 0, "tensor")))
_wrap("all_gather_into_tensor", lambda *a, **k: _nbytes(_arg(a, k, 0, "output_tensor")))
_wrap("_all_gather_base", lambda *a, **k: _nbytes(_arg(a, k, 0, "output_tensor")))
_wrap("all_gather", lambda *a, **k: sum(_nbytes(t) for t in _arg(a, k, 0, "tensor_list")))
_wrap("reduce_scatter_tensor", lambda *a, **k: _nbytes(_arg(a, k, 1, "input")))
_wrap("_reduce_scatter_base", lambda *a, **k: _nbytes(_arg(a, k, 1, "input")))
_wrap("reduce_scatter", lambda *a, **k: sum(_nbytes(t) for t in _arg(a, k, 1, "input_list")))
_wrap("all_to_all_single", lambda *a, **k: _nbytes(_arg(a, k, 1, "input")))

from vit_scale.config import load_config, validate  # noqa: E402
from vit_scale.data.transforms import to_model_input  # noqa: E402
from vit_scale.models import build_model  # noqa: E402
from vit_scale.train.engine import build_engine, init_distributed  # noqa: E402
from vit_scale.train.loop import loss_function  # noqa: E402

# ---------------------------------------------------------------- counting storages

_LEAVES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, str, bytes,
           int, float, bool, complex, type(None))


def storages(root) -> dict[tuple, tuple[int, str]]:
    """(device, data_ptr) -> (bytes, dtype) of every storage reachable from `root` through attributes,
    containers, tensors' own attributes (DeepSpeed hangs partitions on parameters) and gradients."""
    seen, found, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                st = obj.untyped_storage()
                if st.nbytes() and st.data_ptr():
                    found.setdefault((obj.device.type, st.data_ptr()), (st.nbytes(), str(obj.dtype)))
            if obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(getattr(obj, "__dict__", {}).values())
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return found


def summary(found) -> dict:
    by_dtype = collections.Counter()
    for nbytes, dtype in found.values():
        by_dtype[dtype] += nbytes
    return {"total": sum(by_dtype.values()), "by_dtype": dict(by_dtype), "sizes": sorted(n for n, _ in found.values())}


# ---------------------------------------------------------------- one case


def run_case(overrides: list[str]) -> dict:
    world = dist.get_world_size()
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_model(cfg.model), validate(cfg, world), 100)
    loss_fn = loss_function(cfg)
    dtype = {"bf16": torch.bfloat16}.get(cfg.precision.dtype, torch.float32)
    out = {"overrides": overrides, "rank": dist.get_rank(), "world": world}
    state = {"step": 0, "in_step": None, "gathered": 0}

    def pre_step(*_):
        if state["step"] == 1 and state["in_step"] is None:
            state["in_step"] = summary(storages(engine))

    engine.basic_optimizer.register_step_pre_hook(pre_step)

    params = list(engine.module.parameters())

    def count_gathered(*_):
        if state["step"] == 1 and hasattr(params[0], "ds_status"):
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            live = sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist)
            state["gathered"] = max(state["gathered"], live)

    for module in engine.module.modules():
        module.register_forward_pre_hook(count_gathered)
        module.register_forward_hook(count_gathered)
        module.register_full_backward_pre_hook(count_gathered)

    g = torch.Generator().manual_seed(dist.get_rank())
    for step in range(2):  # the first records ZeRO-3's module trace and creates Adam's state
        state["step"] = step
        COUNTING[0] = step == 1
        for micro in range(engine.gradient_accumulation_steps()):
            size = (cfg.train.micro_batch_per_rank, 3, cfg.model.img_size, cfg.model.img_size)
            images = torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
            labels = torch.randint(0, cfg.model.num_classes, size[:1], generator=g)
            loss = loss_fn(engine(to_model_input(images, dtype)).float(), labels)
            engine.backward(loss)
            if step == 1 and engine.is_gradient_accumulation_boundary():
                out["backward"] = summary(storages(engine))
            engine.step()
        if step == 1:
            out["step"] = state["in_step"]
            out["idle"] = summary(storages(engine))
    COUNTING[0] = False
    out["sent"] = dict(SENT)
    out["gathered"] = state["gathered"]
    SENT.clear()
    engine.destroy()
    return out


def main() -> int:
    cases, out_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    from vit_scale.config import Config

    init_distributed(Config())
    with open(out_dir / f"rank{dist.get_rank()}.jsonl", "w") as out:
        for overrides in cases:
            out.write(json.dumps(run_case(overrides)) + "\n")
            dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
