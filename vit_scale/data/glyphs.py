"""A pretraining corpus near handwriting, without digits: letters and symbols drawn the way optdigits was.

scikit-learn's digits (the demo's transfer task, `vit_scale.data.digits`) are UCI optdigits: handwriting
scanned to 32x32 bitmaps, then counted in 4x4 blocks into 8x8 images with 17 grey levels. This corpus
goes through the same acquisition on glyphs instead of digits: one class is one character; an instance
is that character in a random font (DejaVu Sans, Sans Mono and Serif and STIX in all their weights and
slants, and for letters Computer Modern, all shipped with matplotlib), with a random stroke width, a
random affine warp (rotation, shear, aspect), scaled to fill the 32x32 box like the scans, a few
flipped bits, then block-counted to 8x8 and upsampled like the digits. Nothing is downloaded.

No class is a digit, nor a character that looks like one once warped and blurred to 8x8 (`LOOKALIKES`,
excluded by name), so what the model learns here can only help on digits by transfer.

Everything is a pure function of (seed, class, instance) and the font files: the same Pillow (its bundled
FreeType) and matplotlib give the same bytes, whatever the number of worker processes.

    vit-scale shards synth glyphs --per-class 300 --size 24 --out data/glyphs
"""

from __future__ import annotations

import functools
import io
import os
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vit_scale.errors import UserError

UPPER = "ACEFHJKLMNPRTUVWXY"
LOWER = "aefhmnrt"
SYMBOLS = "+=<>?@#%*^~±÷≠≈√∇→←↔♠♣♥♦♪∀"
GREEK = "αγλμπψωΓΔΛΞΣΨ"
CHARS = UPPER + LOWER + SYMBOLS + GREEK
# Left out because, warped and blurred to 8x8, they pass for digits (tall thin strokes read as a 1):
# 0 O o D Q θ Φ φ Ω ⊕, 1 I l i j | ! / \ ( ) [ ] { } ↑ ∫, 2 Z z, 3 ∃, 5 S s $, 6 b G δ σ ∂, 8 B β & ∞, 9 g q.
# The tests check that none of them, and no digit, is a class.
LOOKALIKES = "OoDQθΦφΩ⊕Ilij|!/\\()[]{}↑∫Zz∃Ss$bGδσ∂Bβ&∞gq"
# Also left out, as the same shape as a class already here once normalised (label noise, not a class):
# k (K), x and × (X), c (C), u ∪ (U), v (V), w (W), p (P), y (Y), ∩ Π (n), ⊂ (C), ∈ (e).

# Font files in matplotlib's mpl-data/fonts/ttf; the Computer Modern ones map only ASCII letters where
# Unicode puts them, so they draw letters and nothing else.
FONTS = [
    *(f"DejaVuSans{s}.ttf" for s in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSansMono{s}.ttf" for s in ("", "-Bold", "-Oblique", "-BoldOblique")),
    *(f"DejaVuSerif{s}.ttf" for s in ("", "-Bold", "-Italic", "-BoldItalic")),
    *(f"STIXGeneral{s}.ttf" for s in ("", "Bol", "Italic", "BolIta")),
]
LETTER_FONTS = ["cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf"]

RENDER = 40  # font size in px of the first drawing, a little above BOX; warps and strokes happen at this scale
BOX = 32  # the optdigits bitmap side
BLOCK = 4  # BOX / BLOCK = 8: the 8x8 grid of 0..16 counts
MAX_ROTATION = np.deg2rad(15.0)
MAX_SHEAR = 0.3
MAX_LOG_ASPECT = 0.25
MAX_FLIP = 0.02  # fraction of bitmap pixels flipped at most (scanner noise)
JPEG_QUALITY = 95  # as the digits: keep compression artefacts below the stroke width
SHARD_SIZE = 1000


def class_name(label: int) -> str:
    c = CHARS[label]
    return f"glyph_{label:03d}_{unicodedata.name(c).lower().replace(' ', '_')}"


@functools.cache
def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def fonts_for(char: str) -> tuple[str, ...]:
    """The font files that have a glyph for `char` (FreeType's character map, not a guess)."""
    from matplotlib import ft2font

    names = FONTS + (LETTER_FONTS if char.isascii() and char.isalpha() else [])
    have = []
    for name in names:
        path = _font_dir() / name
        if path.is_file() and ft2font.FT2Font(str(path)).get_char_index(ord(char)):
            have.append(name)
    if not have:
        raise UserError(f"glyphs: no font under {_font_dir()} draws {char!r}; is matplotlib installed whole?")
    return tuple(have)


@functools.cache
def _font(name: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / name), RENDER)


@functools.lru_cache(maxsize=4096)
def _draw(char: str, font: str) -> Image.Image:
    """White `char` on black, with room around it for the warp."""
    side = 2 * RENDER
    img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(img).text((side / 2, side / 2), char, fill=255, font=_font(font), anchor="mm")
    return img


def _warp(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random rotation, shear and aspect change about the centre."""
    theta = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    aspect = np.exp(rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT))
    c, s = np.cos(theta), np.sin(theta)
    forward = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1 / aspect])
    inv = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
    centre = np.array(img.size) / 2
    offset = centre - inv @ centre
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def _ink(img: Image.Image) -> int:
    return int(np.count_nonzero(np.asarray(img) >= 128))


def _stroke(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Thinner or thicker strokes: a pen, not a typeface, sets the width of handwriting."""
    k = int(rng.choice([-3, 0, 0, 3, 5]))
    if k == 0:
        return img
    if k > 0:
        return img.filter(ImageFilter.MaxFilter(k))
    thin = img.filter(ImageFilter.MinFilter(-k))
    # Thinning a light face can erase whole strokes: keep the drawing when most of its ink would go.
    return thin if _ink(thin) >= _ink(img) // 2 else img


def _bitmap(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """The glyph scaled (aspect kept) so its longer side fills the box, placed with a little jitter,
    thresholded to a 0/1 BOX x BOX bitmap, with a few bits flipped."""
    box = img.point(lambda v: 255 if v >= 128 else 0).getbbox()
    out = np.zeros((BOX, BOX), dtype=np.uint8)
    if box is None:
        return out
    glyph = img.crop(box)
    w, h = glyph.size
    scale = BOX / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(glyph.resize((nw, nh), Image.Resampling.BOX)) >= 128
    top = (BOX - nh) // 2 + int(rng.integers(-1, 2)) if nh < BOX - 2 else (BOX - nh) // 2
    left = (BOX - nw) // 2 + int(rng.integers(-2, 3)) if nw < BOX - 4 else (BOX - nw) // 2
    out[top : top + nh, left : left + nw] = small
    flips = rng.random((BOX, BOX)) < rng.uniform(0.0, MAX_FLIP)
    return out ^ flips


def counts(label: int, seed: int, instance: int) -> np.ndarray:
    """Instance `instance` of class `label` as optdigits stores a scan: 8x8 counts in 0..16."""
    rng = np.random.default_rng([seed, label, 2, instance])
    char = CHARS[label]
    fonts = fonts_for(char)
    img = _draw(char, fonts[int(rng.integers(len(fonts)))])
    bits = _bitmap(_warp(_stroke(img, rng), rng), rng)
    g = BOX // BLOCK
    return bits.reshape(g, BLOCK, g, BLOCK).sum(axis=(1, 3))


def sample(seed: int, label: int, instance: int, size: int) -> np.ndarray:
    """[size, size, 3] uint8: the 8x8 counts upsampled exactly as the digits are (`digits.to_image`)."""
    from vit_scale.data.digits import to_image

    return to_image(counts(label, seed, instance), size)


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_batch(job: tuple[int, int, list[tuple[int, int]]]) -> list[tuple[str, bytes, int, dict]]:
    seed, size, items = job
    out = []
    for label, instance in items:
        key = f"{class_name(label)}_{instance:06d}"
        meta = {"source": "glyphs", "seed": seed, "instance": instance, "char": CHARS[label]}
        out.append((key, encode_jpeg(sample(seed, label, instance, size)), label, meta))
    return out


def write_glyphs(
    out: str | os.PathLike,
    per_class: int,
    size: int,
    classes: int = len(CHARS),
    seed: int = 0,
    workers: int | None = None,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Generate `classes * per_class` glyph images of `size` px into shards under `out` (the first
    `classes` characters of CHARS)."""
    from vit_scale.data.synth import write_generated

    if not 2 <= classes <= len(CHARS) or per_class < 1 or size < 8:
        raise UserError(
            f"glyphs: need 2 <= --classes <= {len(CHARS)}, --per-class >= 1 and --size >= 8 "
            f"(got {classes}, {per_class}, {size})"
        )
    recipe = {"corpus": "glyphs", "seed": seed, "classes": classes, "per_class": per_class, "size": size}
    names = [class_name(c) for c in range(classes)]
    return write_generated(out, _encode_batch, recipe, names, workers, shard_size, progress)
