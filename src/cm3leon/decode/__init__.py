"""Decoding: KV-cached sampling (`generate`), modality constraints and samplers
(`processors`), CFG / CD-K / two-scale guidance (`guidance`), task prompts (`tasks`) and
best-of-N re-ranking (`rerank`)."""
