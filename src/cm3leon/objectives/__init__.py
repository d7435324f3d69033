"""Training objectives as data transforms (the model knows nothing of them)."""

from cm3leon.objectives.cm3 import IGNORE_INDEX, CM3Config, CM3Example, cm3_transform, invert_cm3, segment_ids

__all__ = ["IGNORE_INDEX", "CM3Config", "CM3Example", "cm3_transform", "invert_cm3", "segment_ids"]
