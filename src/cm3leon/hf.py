"""Image generation with an exported model in plain `transformers` (`cm3leon export hf`).

`generate` writes the same image codes as `CM3Leon.sample_images` (same seed) with:
- `CM3LeonOPTForCausalLM`: `OPTForCausalLM` whose `generate` passes the position ids the model
  was trained with (segment positions, `model.segment_positions`, restart at each `<break>` /
  `<eos>`; the CPU presets use them); for plain positions it is OPT itself;
- `build_image_prompt`: the conditional and unconditional prompts of each text, in the layout
  the model is trained on (paper Sec. 2; `cm3leon.layout.prompts`), left-padded into one batch
  (rows [0, B) conditional, [B, 2B) unconditional);
- `ImageTokenConstraint`: each step may emit only image codes, then `<break>`;
- `BatchedCFGLogitsProcessor`: classifier-free guidance over the two halves of the batch
  (paper Sec. 3), the constraint applied to the guided scores, and ONE token drawn per pair
  (argmax at temperature 0, else the project's seeded sampler), returned as the only allowed
  id of both rows, so both streams continue with the same token whatever `generate` does
  (`guided_tokens`, `force_tokens`: the same steps serve vLLM, `cm3leon.vllm`);
- `codes_to_image`: the generated codes back to a picture with the exported image tokenizer.

    from transformers import LogitsProcessorList
    from cm3leon.hf import BatchedCFGLogitsProcessor, CM3LeonOPTForCausalLM, build_image_prompt, codes_to_image

    model = CM3LeonOPTForCausalLM.from_pretrained("runs/hf")
    batch = build_image_prompt("runs/hf", ["a large red circle"])
    out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=batch.length, logits_processor=LogitsProcessorList(
                             [BatchedCFGLogitsProcessor(3.0, batch.constraint)]))
    image = codes_to_image("runs/hf", out[0, batch.prompt_length:])[0]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import ImageConstraint, SamplerSettings, sample
from cm3leon.errors import CM3LeonError


def _export_parts(model_dir: str | os.PathLike):
    """(config.json as a dict, Vocab, tokens per image) of an exported model directory."""
    from cm3leon.tokenizers.image import VQConfig
    from cm3leon.tokenizers.vocab import Vocab
    from cm3leon.utils.io import read_json

    d = Path(model_dir)
    config = read_json(d / "config.json", "model config")
    vq = d / "image_tokenizer" / "config.json"
    tokens_per_image = VQConfig.from_dict(read_json(vq, "image tokenizer config"), where=str(vq)).tokens_per_image
    return config, Vocab.load(d), tokens_per_image


class ImageTokenConstraint(ImageConstraint):
    """The decoder's image constraint (`tokens_per_image` image codes, then `<break>`) as a
    `transformers` logits processor; `prompt_length`: the padded prompt's length, from which
    the step is counted."""

    def __init__(self, vocab, model_vocab_size: int, tokens_per_image: int, prompt_length: int):
        super().__init__(vocab, model_vocab_size, tokens_per_image)
        self.prompt_length = int(prompt_length)

    @classmethod
    def from_export(cls, model_dir: str | os.PathLike, prompt_length: int = 0) -> "ImageTokenConstraint":
        """The constraint of an exported model directory (its config.json, vocab.json and
        image_tokenizer/config.json)."""
        config, vocab, tokens_per_image = _export_parts(model_dir)
        return cls(vocab, int(config.get("vocab_size", vocab.size)), tokens_per_image, prompt_length)

    def step_mask(self, input_ids: torch.LongTensor, device) -> torch.Tensor:
        return self.mask(input_ids.shape[1] - self.prompt_length, device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.float() + self.step_mask(input_ids, scores.device)


def guided_tokens(cond: torch.Tensor, uncond: torch.Tensor, mask: torch.Tensor, guidance: Guidance,
                  sampler: SamplerSettings, generator=None) -> torch.Tensor:
    """One token per pair: CFG of the conditional and unconditional logits (P, V) (paper
    Sec. 3), the constraint's additive mask (V,) or (P, V) added, drawn by the project's sampler
    (`generator`: one for all rows, or one per row) -> (P,) long."""
    return sample(guidance.combine(torch.stack([cond, uncond]), mask), sampler, generator)


def force_tokens(scores: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """In place: each of `rows` allows only its token (0 there, -inf elsewhere), so any sampler,
    greedy or random, emits it. Returns `scores`."""
    scores[rows] = -torch.inf
    scores[rows, tokens] = 0.0
    return scores


class BatchedCFGLogitsProcessor:
    """CFG over a batch whose first half holds the conditional prompts and whose second half
    the unconditional ones (the decoder's `Guidance("cfg")`), the constraint's mask added,
    one token drawn per pair (temperature 0: argmax; otherwise the project's sampler with a
    generator seeded by `seed`, so the draws equal `CM3Leon.sample_images` for the same seed),
    and both rows of the pair told to emit it."""

    def __init__(self, scale: float, constraint: ImageTokenConstraint | None = None, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None):
        self.guidance = Guidance("cfg", cfg_scale=scale)
        self.constraint = constraint
        self.sampler = SamplerSettings(temperature, top_k, top_p)
        self.seed = seed
        self._gen: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, vocab_size = scores.shape
        if rows % 2:
            raise CM3LeonError(f"BatchedCFGLogitsProcessor: the batch must be conditional + unconditional "
                               f"halves, got {rows} rows")
        mask = (self.constraint.step_mask(input_ids, scores.device) if self.constraint is not None
                else torch.zeros(vocab_size, device=scores.device))
        if self._gen is None and self.seed is not None and self.sampler.temperature > 0:
            self._gen = torch.Generator(device=scores.device)
            self._gen.manual_seed(int(self.seed))
        token = guided_tokens(scores[: rows // 2], scores[rows // 2:], mask, self.guidance, self.sampler, self._gen)
        return force_tokens(torch.empty_like(scores), torch.arange(rows, device=scores.device),
                            token.repeat(2))  # (2B,): the pair's one token in both rows


def _opt_class():
    from transformers import OPTForCausalLM

    class CM3LeonOPTForCausalLM(OPTForCausalLM):
        """`OPTForCausalLM` whose `generate` gives every token the position id the CM3Leon
        model was trained with (segment positions restart at each `<break>` / `<eos>`,
        `cm3leon.model.positions`); plain positions are OPT's own, so it matches
        `OPTForCausalLM` there."""

        def prepare_inputs_for_generation(self, input_ids, *args, attention_mask=None, **kwargs):
            from cm3leon.convert.hf_opt import model_config_from_opt
            from cm3leon.decode.generate import position_ids

            inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask, **kwargs)
            if getattr(self, "_cm3leon_config", None) is None:
                self._cm3leon_config = model_config_from_opt(self.config.to_dict())
            cfg = self._cm3leon_config
            step_ids = inputs.get("input_ids")
            if cfg.segment_positions and step_ids is not None:
                pad = (attention_mask == 0).sum(dim=1) if attention_mask is not None \
                    else torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
                inputs["position_ids"] = position_ids(input_ids, pad, cfg)[:, -step_ids.shape[1]:]
            return inputs

    return CM3LeonOPTForCausalLM


def __getattr__(name: str):  # the transformers class is built on first use (transformers is optional)
    if name == "CM3LeonOPTForCausalLM":
        cls = _opt_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


@dataclass
class ImagePromptBatch:
    input_ids: torch.LongTensor  # (2B, T): conditional prompts, then unconditional ones, left-padded
    attention_mask: torch.LongTensor  # (2B, T)
    prompt_length: int  # T
    constraint: ImageTokenConstraint
    length: int  # new tokens per image (codes + <break>): generate's max_new_tokens


def build_image_prompt(model_dir: str | os.PathLike, prompts: Sequence[str] | str) -> ImagePromptBatch:
    """The batch `generate` needs for `prompts` with an exported model directory (its
    config.json, vocab.json, text_tokenizer/ and image_tokenizer/config.json): conditional
    and unconditional (`<mask:0>` for the caption) prompts of the training layout, left-padded."""
    from cm3leon.layout.prompts import PromptBuilder
    from cm3leon.tokenizers.text import TextTokenizer

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise CM3LeonError("build_image_prompt: no prompts")
    config, vocab, tokens_per_image = _export_parts(model_dir)
    tok = TextTokenizer.load(Path(model_dir) / "text_tokenizer")
    builder = PromptBuilder(vocab, tok, int(config.get("max_position_embeddings", 2048)), tokens_per_image)
    tps = [builder.text_to_image(p) for p in prompts]
    rows = [tp.cond for tp in tps] + [tp.uncond for tp in tps]
    T = max(len(r) for r in rows)
    pad = int(config.get("pad_token_id") or vocab.pad_id)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    constraint = ImageTokenConstraint(vocab, int(config.get("vocab_size", vocab.size)), tokens_per_image, T)
    return ImagePromptBatch(ids, mask, T, constraint, constraint.length)


def codes_to_image(model_dir: str | os.PathLike, generated) -> list:
    """Generated ids (one row, or rows: image codes in the unified vocabulary, a trailing
    `<break>` allowed) -> PIL images, decoded by the model directory's image tokenizer."""
    from cm3leon.tokenizers.image import VQModel, tensor_to_images
    from cm3leon.tokenizers.vocab import Vocab

    d = Path(model_dir)
    vocab, vq = Vocab.load(d), VQModel.from_pretrained(d / "image_tokenizer")
    h, w = vq.config.grid
    rows = torch.as_tensor(generated, dtype=torch.long)
    rows = rows[None] if rows.ndim == 1 else rows
    rows = rows[:, : h * w]
    if rows.shape[1] != h * w or not bool(((rows >= vocab.image_offset) & (rows < vocab.size)).all()):
        raise CM3LeonError(f"codes_to_image: expected {h * w} image codes per row (ids {vocab.image_offset}.."
                           f"{vocab.size - 1}), got {tuple(rows.shape)}")
    with torch.no_grad():
        return tensor_to_images(vq.decode((rows - vocab.image_offset).view(-1, h, w)))


# and CM3LeonOPTForCausalLM, an attribute built on first use (it needs transformers)
__all__ = ["ImageTokenConstraint", "BatchedCFGLogitsProcessor", "guided_tokens", "force_tokens", "ImagePromptBatch",
           "build_image_prompt", "codes_to_image"]
