"""Issue 16 §5: every value is checked before work starts, in the one validation pass, and a bad one is a
one-line error (exit 2) that names it, never a traceback."""

from __future__ import annotations

import pytest
import yaml

from vit_scale.config import ConfigError, load_config, validate


def _recipe(tmp_path, **sections) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


@pytest.mark.parametrize(
    ("key", "value", "bad"),
    [
        ("run.name", "a\nb", "\n"),
        ("run.dir", "runs/x\r", "\r"),
        ("data.train", "shards\x00/train", "\x00"),
        ("logging.project", "p\x1b[2J", "\x1b"),
        ("eval.vtab_data", "root\x85", "\x85"),
        ("init", "w\x7f.pt", "\x7f"),
    ],
)
def test_a_control_character_in_a_setting_is_refused(tmp_path, key, value, bad):
    """Strings become paths, table cells and job-script lines: a control character would split them."""
    section, _, leaf = key.rpartition(".")
    cfg = load_config(_recipe(tmp_path, **({section: {leaf: value}} if section else {leaf: value})))
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value) == f"{key}={value!r} holds the control character {bad!r}; remove it"


def test_text_that_is_not_utf8_is_refused(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["data.train=/data/\udcffimages"])
    with pytest.raises(ConfigError, match=r"data.train='/data/\\udcffimages' is not valid UTF-8 text"):
        validate(cfg, 1)
