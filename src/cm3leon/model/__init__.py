"""The CM3Leon decoder (transformer.py) and its configuration (config.py)."""

from cm3leon.model.config import PRESETS, ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer, KVCache, flops_per_token

__all__ = ["PRESETS", "ModelConfig", "CM3LeonTransformer", "KVCache", "flops_per_token"]
