"""The parameter average's checkpoint format: slices put back together from the files of any layout."""

import pytest
import torch

from vit_scale.checkpoint.average import assemble
from vit_scale.checkpoint.commit import CheckpointError


def part(**slices):
    return {"decay": 0.9, "params": {n: {"shape": shape, "start": start, "value": v} for n, (shape, start, v) in
                                     slices.items()}}  # fmt: skip


def test_partitions_of_any_layout_assemble_to_the_whole_parameters():
    w = torch.arange(12, dtype=torch.float32).view(3, 4)
    b = torch.tensor([5.0, 6.0])
    flat = w.reshape(-1)
    # ZeRO-3 style: every rank a slice of every parameter; ZeRO-1/2 style: whole and partial ones.
    z3 = [part(w=([3, 4], 0, flat[:6]), b=([2], 0, b[:1])), part(w=([3, 4], 6, flat[6:]), b=([2], 1, b[1:]))]
    z1 = [part(w=([3, 4], 0, flat[:10])), part(w=([3, 4], 10, flat[10:]), b=([2], 0, b))]
    replicated = [part(w=([3, 4], 0, flat), b=([2], 0, b))] * 2  # no ZeRO: every rank holds it all
    for parts in (z3, z1, replicated):
        got = assemble(parts)
        assert got.keys() == {"w", "b"} and torch.equal(got["w"], w) and torch.equal(got["b"], b)


def test_a_missing_slice_is_refused():
    flat = torch.arange(12, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="lacks slices of w"):
        assemble([part(w=([3, 4], 0, flat[:6]))])
