"""Checkpoints: the commit protocol around DeepSpeed's sharded save, resume selection, retention, export,
and weight import from runs, checkpoints and other formats (`weights`)."""


def load_consolidated_state_dict(ckpt_path, averaged: bool = True):
    """fp32 timm-layout weights and Config of a committed checkpoint (its parameter average when it has one);
    see `export.load_consolidated_state_dict`."""
    from vit_scale.checkpoint.export import load_consolidated_state_dict as load

    return load(ckpt_path, averaged)


__all__ = ["load_consolidated_state_dict"]
