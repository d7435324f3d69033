"""The one way a preset is looked up. Every preset table lives next to its config class
(`cm3leon.model.config.PRESETS`, `cm3leon.train.config.TRAIN_PRESETS`,
`cm3leon.sft.cli.SFT_PRESETS`, `cm3leon.tokenizers.image.PRESETS`,
`cm3leon.tokenizers.image_train.TRAIN_PRESETS`, `cm3leon.tokenizers.text.VOCAB_PRESETS`,
`cm3leon.run.config.PIPELINE_PRESETS`) and is read with
`lookup`: names match exactly, and an unknown name is an error that lists the known ones."""

from __future__ import annotations

from typing import Mapping, TypeVar

from cm3leon.errors import CM3LeonError

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, kind: str) -> T:
    """The entry of `table` called exactly `name`; `kind` names the table in the error
    ("model", "train", "image tokenizer", ...)."""
    if not isinstance(name, str) or name not in table:
        raise CM3LeonError(f"unknown {kind} preset {name!r}; choose one of {sorted(table)}")
    return table[name]
