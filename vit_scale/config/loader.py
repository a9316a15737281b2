"""YAML loading with inheritance, `section.key=value` overrides, type checks and validation.

Errors are `ConfigError`s: one line that names the key, where it came from and what to change.
The command line prints them and exits with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import keyword
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vit_scale.config.schema import Config
from vit_scale.errors import UserError


class ConfigError(UserError):
    """A config problem the user must fix; its message is the whole story."""


# ---------------------------------------------------------------- reading YAML with positions


def _read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    """The mapping in `path` and, for every dotted key, 'file:line' where it was set."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    where: dict[str, str] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                where[key] = f"{path}:{k.start_mark.line + 1}"
                walk(v, key + ".")

    walk(node, "")
    return data, where


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))  # an empty section sets nothing
        else:
            out[key] = v
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Flattened values and positions of `path`, after the files it inherits through `base:`."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance loops: {chain}")
    data, where = _read_yaml(path)
    base = data.pop("base", None)
    values: dict[str, Any] = {}
    positions: dict[str, str] = {}
    bases = [] if base is None else base if isinstance(base, list) else [base]
    targets = []
    for b in bases:
        target = path.parent / b if isinstance(b, str) else None
        if target is None or target.suffix not in (".yaml", ".yml") or (target.exists() and not target.is_file()):
            raise ConfigError(
                f"{where.get('base', path)}: base: {b!r} must be the path of a YAML file (relative to "
                f"{path.parent}), or a list of them"
            )
        targets.append(target)
    for target in targets:
        bv, bw = _load_chain(target, (*seen, path))
        values.update(bv)
        positions.update(bw)
    flat = _flatten(data)
    values.update(flat)
    positions.update({k: where.get(k, str(path)) for k in flat})
    return values, positions


# ---------------------------------------------------------------- types


def _key_name(field: str) -> str:
    """The config key of a schema field. A key that is a Python keyword (checkpoint.async) is a field with a
    trailing underscore (`async_`, as PEP 8 spells it), since a dataclass cannot name a field `async`."""
    return field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field


def _field_name(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


def _field_types(cls) -> dict[str, Any]:
    return {_key_name(name): tp for name, tp in typing.get_type_hints(cls).items()}


def _all_keys(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key and its type."""
    out = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_all_keys(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def _choices(tp) -> tuple | None:
    """The allowed values of a `Literal[...]` field (also inside `X | None`), else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if (found := _choices(arg)) is not None:
                return found
    return None


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return _type_name(type(typing.get_args(tp)[0]))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp) -> Any:
    """`value` as type `tp`, or raise TypeError (a Literal's value is checked against its type only: the
    caller reports a value outside the choices with the choices)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return _coerce(value, type(typing.get_args(tp)[0]))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TypeError
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e4 in YAML
        raise TypeError
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _suggest(key: str, keys) -> str:
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # a right name under the wrong section
    close = same_leaf or difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_override(arg: str) -> tuple[str, str]:
    if "=" not in arg:
        raise ConfigError(f"command-line override {arg!r} must look like section.key=value")
    key, raw = arg.split("=", 1)
    return key.strip(), raw


def _parse_cli_value(raw: str, tp) -> Any:
    choices = _choices(tp)
    if tp is str or tp == (str | None) or (choices and isinstance(choices[0], str)):
        return raw  # YAML would read "off" or "no" as false
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------- building


def _set(cfg: Config, key: str, value: Any) -> None:
    obj = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        obj = getattr(obj, _field_name(p))
    setattr(obj, _field_name(leaf), value)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """The config in `path` (with inherited files) and `overrides`, type-checked.

    Combination checks that need the world size are in `validate`.
    """
    cfg = Config()
    keys = _all_keys()
    values: dict[str, Any] = {}
    positions: dict[str, str] = {}
    if path is not None:
        values, positions = _load_chain(Path(path))
    for arg in overrides:
        key, raw = parse_override(arg)
        tp = keys.get(key)
        values[key] = _parse_cli_value(raw, tp) if tp is not None else raw
        positions[key] = f"command line ({arg})"

    for key, value in values.items():
        where = positions.get(key, "?")
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r} at {where}{_suggest(key, keys)}")
        tp = keys[key]
        try:
            coerced = _coerce(value, tp)
        except TypeError:
            raise ConfigError(
                f"config key {key} at {where} expects {_type_name(tp)}, got {value!r}"
            ) from None
        choices = _choices(tp)
        if choices is not None and coerced is not None and coerced not in choices:
            raise ConfigError(
                f"config key {key} at {where} must be one of {', '.join(map(str, choices))}; got {coerced!r}"
            )
        _set(cfg, key, coerced)

    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path is not None else "default"
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    return cfg


def to_dict(cfg) -> dict:
    """The config as nested dicts under its keys (what config.yaml and a checkpoint's manifest hold)."""
    return {
        _key_name(f.name): to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else copy.deepcopy(v)
        for f in dataclasses.fields(cfg)
    }


def from_dict(d: dict) -> Config:
    """Rebuild a Config saved by `save_config` (a run's config.yaml)."""
    cfg = Config()
    keys = _all_keys()
    for key, value in _flatten(d).items():
        if key in keys:
            _set(cfg, key, value)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from vit_scale.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
