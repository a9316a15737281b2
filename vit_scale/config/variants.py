"""What a `model.variant` name means: the paper's Table 1 rows (B, L, H) plus timm's Ti and S.

Variants are rows of one table, not copied configs. Here in config/ because the validation pass checks
a config against them; `vit_scale.models` builds the networks they describe.
"""

from __future__ import annotations

from vit_scale.config.schema import ModelConfig

# layers, width, MLP, heads
SIZES = {
    "ti": (12, 192, 768, 3),
    "s": (12, 384, 1536, 6),
    "b": (12, 768, 3072, 12),
    "l": (24, 1024, 4096, 16),
    "h": (32, 1280, 5120, 16),
}
VARIANT_PATCHES = {"ti": (16,), "s": (16, 32), "b": (16, 32), "l": (16, 32), "h": (14,)}

VARIANTS: dict[str, dict[str, int]] = {
    f"vit_{size}{patch}": dict(zip(("layers", "width", "mlp", "heads"), SIZES[size]), patch=patch)
    for size, patches in VARIANT_PATCHES.items()
    for patch in patches
}


def model_dims(m: ModelConfig) -> dict[str, int]:
    """The variant's row with the config's reduced-size overrides applied."""
    row = dict(VARIANTS[m.variant])
    for key, override in (("layers", m.depth), ("width", m.width), ("mlp", m.mlp), ("heads", m.heads),
                          ("patch", m.patch)):
        if override is not None:
            row[key] = override
    return row
