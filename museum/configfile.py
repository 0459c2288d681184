"""`--config FILE` for train-text, train-image and tune: a YAML, TOML or JSON file of config fields.

The file holds fields of the command's config dataclass (`TextConfig`, `ImageConfig`,
`FusionConfig`) by name, e.g. a run's own `config.json`, which therefore reproduces the run.
Options given on the command line then replace the file's values one by one. A key the config
does not have, a value of the wrong type and a value out of range are one-line errors naming
the file; the range checks are the config's own (`__post_init__`), so they read as the
command line's would.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

from museum.config import field_types
from museum.errors import MuseumError

T = TypeVar("T")

FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a YAML, TOML or JSON file, by its suffix."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise MuseumError(f"--config {path}: expected a .yaml, .yml, .toml or .json file")
    if not path.is_file():
        raise MuseumError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MuseumError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        data = _parse(text, kind)
    except ValueError as exc:  # each parser's own error, reduced to its first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MuseumError(f"--config {path}: not valid {kind} ({first})") from None
    if data is None:
        return {}  # an empty YAML file: nothing to change
    if not isinstance(data, dict):
        raise MuseumError(f"--config {path}: expected `name: value` pairs at the top level, found a {type(data).__name__}")
    return data


def _parse(text: str, kind: str) -> Any:
    if kind == "JSON":
        return json.loads(text)
    if kind == "TOML":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise MuseumError("TOML config files need tomli on Python 3.10: pip install tomli") from None
        return tomllib.loads(text)
    try:
        import yaml
    except ImportError:  # pragma: no cover - timm requires PyYAML, so it is there wherever museum is
        raise MuseumError("YAML config files need PyYAML: pip install pyyaml (or give the config as .toml or .json)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from None


def config_from_file(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """`cls` built from the file's fields (None: from the defaults), then `overrides` (the options given on
    the command line) applied; every value checked by `cls` itself."""
    config = cls()
    if path is not None:
        data = read_config_file(path)
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(str(k), known, 1)) else str(k)
                     for k in unknown]
            raise MuseumError(f"--config {path}: unknown key(s) {', '.join(hints)}; a {cls.__name__} has "
                              f"{', '.join(known)}")
        types = field_types(cls)
        try:
            config = cls(**{k: _from_file(v, *types[k]) for k, v in data.items()})
        except MuseumError as exc:
            raise MuseumError(f"--config {path}: {exc}") from None
    return replace(config, **overrides) if overrides else config  # type: ignore[type-var]


def _from_file(value: Any, base: type, optional: bool) -> Any:
    """A file's value as the field takes it: `auto` is None (the automatic choice) where a field allows None,
    and a float written as YAML 1.1 reads `1e-3` (a string to it) is a number."""
    if isinstance(value, str) and optional and base is float and value.strip().lower() in ("auto", "none", "null"):
        return None
    if isinstance(value, str) and base is float:
        try:
            return float(value)
        except ValueError:
            return value  # the config names the option and the expected type
    return value
