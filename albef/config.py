"""Typed configuration: YAML files parsed into nested dataclasses, with ``key.sub=value`` overrides.

Defaults live only in the dataclass schemas. An unknown key or a value of the wrong type is an error that
names the key (and the file), never silently ignored. A YAML file may name one parent with ``base: other.yaml``
(resolved relative to the file, or a preset name such as ``tiny``); the child lists only what differs.

    cfg = load_config(ModelConfig, "albef/configs/tiny.yaml", ["text.num_hidden_layers=6"])
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Type, TypeVar

import yaml

T = TypeVar("T")
PRESET_DIR = Path(__file__).parent / "configs"
_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration error. ``path`` is the key path it concerns (``("train", "betas")``), ``detail`` the message
    without its location, so that ``load_config`` can name the command-line override that set the value."""

    def __init__(self, message: str, path: tuple = (), detail: Optional[str] = None):
        super().__init__(message)
        self.path, self.detail = tuple(path), detail or message


def _fail(where: str, path: tuple, detail: str) -> ConfigError:
    return ConfigError(f"{where}: {detail}", path, detail)


def _coerce(value: Any, tp: Any, where: str, path: tuple = ()) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(where, path, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where, path)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else _fail(where, path, f"cannot parse {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(where, path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, path, f"expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `1e-4` as a string
        raise _fail(where, path, f"expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, path, f"expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, path, f"expected a string, got {value!r}")
    return value


def from_dict(cls: Type[T], data: Dict[str, Any], where: str = "config", path: tuple = ()) -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and type mismatches raise ``ConfigError``.

    A schema's ``__post_init__`` checks values; its ValueError should start with the dotted key it concerns
    (``train.log_every=0: ...``), which is how the error finds the override that set it."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _fail(where, path + (unknown[0],), f"unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}", path + (k,)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        m = re.match(r"([\w.]+)=", str(e))
        key = tuple(m.group(1).split(".")) if m else ()
        if key and path and key[0] == path[-1]:  # "train.log_every=0: ..." raised by the section at path (.., "train")
            key = path[:-1] + key
        raise _fail(where, key or path, str(e)) from None


def to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """Merge ``top`` into ``base``; a mapping that names its own ``base:`` preset replaces the section whole."""
    out = dict(base)
    for k, v in top.items():
        merge = isinstance(v, dict) and "base" not in v and isinstance(out.get(k), dict)
        out[k] = _deep_merge(out[k], v) if merge else v
    return out


def resolve_path(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    """A YAML path, or a preset name (``tiny``, ``small``, ``base``) from ``albef/configs``."""
    p = Path(name_or_path)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if p.suffix == "" and not p.exists():
        candidates.append(PRESET_DIR / f"{name_or_path}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    presets = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} not found (tried {[str(c) for c in candidates]}); presets: {presets}")


def read_yaml(path: Path, _seen: Optional[set] = None) -> Dict[str, Any]:
    """Read a YAML mapping and resolve one or more levels of ``base:``."""
    seen = set() if _seen is None else _seen
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    seen.add(path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(read_yaml(resolve_path(base, path.parent), seen), data)
    return data


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> ``{'a': {'b': {'c': value}}}``; the value is parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: not valid YAML ({problem})") from None
    out: Dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def expand_presets(cls: Type, data: Dict[str, Any]) -> Dict[str, Any]:
    """A dataclass-typed section given as a string (``model: tiny``) is replaced by that preset's YAML mapping."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for k, v in data.items():
        tp = hints.get(k)
        if tp is None or not dataclasses.is_dataclass(tp):
            continue
        if isinstance(v, str):  # `model: tiny`
            v = read_yaml(resolve_path(v))
        elif isinstance(v, dict) and "base" in v:  # `model: {base: tiny, queue_size: 8}`
            rest = {kk: vv for kk, vv in v.items() if kk != "base"}
            v = _deep_merge(read_yaml(resolve_path(v["base"])), rest)
        out[k] = expand_presets(tp, v)
    return out


def load_config(cls: Type[T], path: Optional[str] = None, overrides: Iterable[str] = ()) -> T:
    data: Dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = resolve_path(path)
        data = read_yaml(p)
        where = str(p)
    data = expand_presets(cls, data)
    overrides = list(overrides)
    for o in overrides:
        data = expand_presets(cls, _deep_merge(data, parse_override(o)))
    try:
        return from_dict(cls, data, where)
    except ConfigError as e:
        # the last override that set this key (or a section above it) owns the error, else the file does
        for o in reversed(overrides):
            key = tuple(o.split("=", 1)[0].strip().split("."))
            if e.path and (e.path[: len(key)] == key or key[: len(e.path)] == e.path):
                raise ConfigError(f"override {o!r}: {'.'.join(e.path)}: {e.detail}", e.path, e.detail) from None
        raise
