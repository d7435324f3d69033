"""Pretraining options from a YAML / JSON file plus `--set key=value` overrides.

A config file (see configs/pretrain_*.yaml) has top-level `preset`, `data`, `out`, `init`
and one section per dataclass: `train` (TrainConfig), `model` (ModelConfig overrides),
`cm3` (CM3Config) and `sequences` (the document layout: num_retrieved, order, ...). Values
are typed by the dataclass field they set (int / float / bool / str / list, `null` for
None), so `6e-4` is a float even where YAML reads it as a string. Precedence: the preset,
then the file, then command-line flags, then `--set` (`--set train.lr=3e-4` or `--set
lr=3e-4` where the name is unambiguous). A bad key or value is a CM3LeonError naming both
the key and where it came from.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from cm3leon.errors import CM3LeonError

TOP_LEVEL = {"preset": "str", "data": "str", "out": "str", "init": "str | None"}
# The document layout options of `cm3leon.train.cli.pretrain` (not a dataclass).
SEQUENCES = {"num_retrieved": "int | None", "retrieval_dropout": "float", "order": "str", "image_first_prob": "float",
             "val_query_records": "int"}


def _sections() -> dict[str, dict[str, str]]:
    """Section -> {field: type annotation string}."""
    from cm3leon.model.config import ModelConfig
    from cm3leon.objectives.cm3 import CM3Config
    from cm3leon.train.config import TrainConfig

    def types(cls) -> dict[str, str]:
        return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                for f in fields(cls)}

    return {"train": types(TrainConfig), "model": types(ModelConfig), "cm3": types(CM3Config),
            "sequences": dict(SEQUENCES)}


def _split_union(annotation: str) -> list[str]:
    """'str | list[int | str]' -> ['str', 'list[int | str]'] (bars inside brackets kept)."""
    parts, depth, cur = [], 0, ""
    for ch in annotation:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _parse_text(text: str) -> Any:
    """A `--set` value as YAML (numbers, true/false, null, [lists]); plain text otherwise."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _coerce_one(value: Any, t: str) -> Any:
    """`value` as type `t`; raises TypeError/ValueError when it is not one."""
    if t == "None":
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        raise TypeError
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise TypeError
    if t == "int":
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, (str, float)) else None
        if number is None or not number.is_integer():
            raise ValueError
        return int(number)
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        return float(value)
    if t == "str":
        if not isinstance(value, str):
            raise TypeError
        return value
    for kind in ("list", "tuple"):
        if t.startswith(kind + "["):
            inner = [s.strip() for s in _split_top(t[len(kind) + 1:-1])]
            if isinstance(value, str):
                value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if kind == "tuple" and len(inner) != len(value):
                raise ValueError
            items = [_coerce(v, inner[i] if kind == "tuple" else inner[0]) for i, v in enumerate(value)]
            return tuple(items) if kind == "tuple" else items
    raise TypeError(f"unsupported type {t}")


def _split_top(s: str) -> list[str]:
    """'float, float' -> ['float', 'float'] (commas inside brackets kept)."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _coerce(value: Any, annotation: str) -> Any:
    for t in _split_union(annotation):
        try:
            return _coerce_one(value, t)
        except (TypeError, ValueError):
            continue
    raise ValueError(annotation)


class PretrainOptions:
    """Options of one `cm3leon pretrain` run, merged from a file, flags and `--set`.

    `values` maps each section ("top", "train", "model", "cm3", "sequences") to the typed
    values set so far; `source` of a key says where its value came from (for messages)."""

    def __init__(self) -> None:
        self.schema = {"top": dict(TOP_LEVEL), **_sections()}
        self.values: dict[str, dict[str, Any]] = {name: {} for name in self.schema}
        self.sources: dict[tuple[str, str], str] = {}

    def _locate(self, key: str, source: str) -> tuple[str, str]:
        """'train.lr' or an unambiguous 'lr' -> ("train", "lr")."""
        if "." in key:
            section, name = key.split(".", 1)
            if section not in self.schema:
                raise CM3LeonError(f"{source}: unknown section {section!r} in key {key!r}; sections: "
                                   f"{sorted(s for s in self.schema if s != 'top')}")
            if name not in self.schema[section]:
                raise CM3LeonError(f"{source}: unknown key {key!r}; {section} keys: {sorted(self.schema[section])}")
            return section, name
        hits = [s for s in self.schema if key in self.schema[s]]
        if not hits:
            raise CM3LeonError(f"{source}: unknown key {key!r}; top-level keys: {sorted(TOP_LEVEL)}, sections: "
                               f"{sorted(s for s in self.schema if s != 'top')} (write section.key)")
        if len(hits) > 1:
            raise CM3LeonError(f"{source}: key {key!r} is ambiguous; write one of "
                               f"{[f'{s}.{key}' for s in hits]}")
        return hits[0], key

    def set(self, key: str, value: Any, source: str) -> None:
        """Set `key` (section.name or an unambiguous name) to `value`, typed by its field."""
        section, name = self._locate(key, source)
        annotation = self.schema[section][name]
        try:
            typed = _coerce(value, annotation)
        except ValueError:
            raise CM3LeonError(f"{source}: {section}.{name} must be {annotation}, got {value!r}") from None
        self.values[section][name] = typed
        self.sources[(section, name)] = source

    def update_file(self, path: str | Path) -> None:
        """Merge a YAML (or .json) config file."""
        path = Path(path)
        if not path.is_file():
            raise CM3LeonError(f"--config {path}: file not found")
        import yaml

        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:  # both name the line
            raise CM3LeonError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({e})") from None
        if doc is None:
            return
        if not isinstance(doc, dict):
            raise CM3LeonError(f"{path}: expected a mapping of keys to values, got {type(doc).__name__}")
        for key, value in doc.items():
            key = str(key)
            if key in self.schema and key != "top":
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise CM3LeonError(f"{path}: section {key!r} must be a mapping, got {value!r}")
                for name, v in value.items():
                    self.set(f"{key}.{name}", v, str(path))
            else:
                self.set(key, value, str(path))

    def update_sets(self, assignments: list[str] | tuple[str, ...]) -> None:
        """Apply `--set key=value` assignments (the value parsed as YAML, then typed)."""
        for a in assignments:
            key, sep, text = a.partition("=")
            if not sep or not key.strip():
                raise CM3LeonError(f"--set {a!r}: expected key=value (e.g. --set train.lr=3e-4)")
            self.set(key.strip(), _parse_text(text), f"--set {a}")

    def source_of(self, message: str) -> str:
        """Where the value a dataclass complains about came from: the source of the field
        the message names, else every source that set anything."""
        import re

        named = set(re.findall(r"\w+", message))
        hits = [src for (_, name), src in self.sources.items() if name in named]
        return ", ".join(dict.fromkeys(hits or self.sources.values())) or "preset defaults"

    def resolve(self, default_preset: str = "demo") -> tuple[str | None, str | None, str, dict[str, Any]]:
        """(data, out, preset, overrides for `pretrain`), after checking the merged values
        against the dataclasses so a bad value names its source."""
        from cm3leon.model.config import ModelConfig
        from cm3leon.objectives.cm3 import CM3Config
        from cm3leon.train.config import TrainConfig

        top = self.values["top"]
        preset = top.get("preset") or default_preset
        overrides: dict[str, Any] = {**self.values["train"], **self.values["cm3"], **self.values["sequences"]}
        if top.get("init") is not None:
            overrides["init"] = top["init"]
        if self.values["model"]:
            overrides["model"] = dict(self.values["model"])
        try:
            TrainConfig.from_preset(preset, **self.values["train"])
            CM3Config(**self.values["cm3"])
            model = self.values["model"]
            from cm3leon.model.config import PRESETS

            if preset in PRESETS:
                ModelConfig.from_preset(preset, **{"vocab_size": 1, **model})
            check_sequence_options(self.values["sequences"])
        except CM3LeonError as e:
            raise CM3LeonError(f"{self.source_of(str(e))}: {e}") from None
        return top.get("data"), top.get("out"), preset, overrides


def check_sequence_options(values: dict[str, Any]) -> None:
    """Range checks of the `sequences` options."""
    from cm3leon.layout.documents import ORDERS

    if values.get("order") is not None and values["order"] not in ORDERS:
        raise CM3LeonError(f"sequences.order must be one of {ORDERS}, got {values['order']!r}")
    p = values.get("image_first_prob")
    if p is not None and not 0.0 <= p <= 1.0:
        raise CM3LeonError(f"sequences.image_first_prob must be in [0, 1], got {p!r}")
    d = values.get("retrieval_dropout")
    if d is not None and not 0.0 <= d <= 1.0:
        raise CM3LeonError(f"sequences.retrieval_dropout must be in [0, 1], got {d!r}")
    k = values.get("num_retrieved")
    if k is not None and k < 0:
        raise CM3LeonError(f"sequences.num_retrieved must be >= 0, got {k!r}")
    n = values.get("val_query_records")
    if n is not None and n < 1:
        raise CM3LeonError(f"sequences.val_query_records must be >= 1, got {n!r}")


def load_pretrain_options(config: str | Path | None = None, sets: list[str] | tuple[str, ...] = (),
                          flags: dict[str, Any] | None = None,
                          default_preset: str = "demo") -> tuple[str | None, str | None, str, dict[str, Any]]:
    """Merge a config file, command-line `flags` (name -> value, None = not given) and
    `--set` assignments; returns (data, out, preset, overrides for `pretrain`)."""
    opts = PretrainOptions()
    if config is not None:
        opts.update_file(config)
    for key, value in (flags or {}).items():
        if value is not None:
            opts.set(key, value, f"--{key.replace('_', '-')}")
    opts.update_sets(sets)
    return opts.resolve(default_preset)
