"""Run one `vit-scale` command in this process and save every input the ViT saw while training.

A global forward pre-hook catches the top-level VisionTransformer in train mode, however the command
builds and wraps it (the DeepSpeed engine calls the module itself), and leaves evaluation copies alone.
Usage: python capture_inputs.py OUT.pt COMMAND ARG...
"""

import sys

import torch
from timm.models.vision_transformer import VisionTransformer

from vit_scale.cli import main as cli


def main() -> int:
    out, *argv = sys.argv[1:]
    seen: list[torch.Tensor] = []

    def capture(module, args):
        if isinstance(module, VisionTransformer) and module.training:
            seen.append(args[0].detach().float().cpu().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(capture)
    try:
        code = cli(argv)
    finally:
        handle.remove()
    torch.save(seen, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
