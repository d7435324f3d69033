"""Pipeline presets: one name picks the size of every stage (`cm3leon pipeline --preset`).

`quick` is a smoke run of a few minutes; `demo` is the default built-in demo (about 15 minutes
on a 2-core CPU); `350m` / `760m` / `7b` are the paper's sizes (Sec. 3), meant for GPUs under
torchrun, with the paper's image tokenizer (256 px -> 32x32 codes from 8192) and BPE (56,320)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from cm3leon.errors import CM3LeonError


@dataclass(frozen=True)
class PipelinePreset:
    text_vocab: str | int = "small"  # BPE size or a preset name of cm3leon.tokenizers.text
    image_tokenizer: str = "demo32"  # cm3leon.tokenizers.image preset
    image_tokenizer_steps: int | None = None  # None: the preset's own
    retriever_steps: int | None = None
    retriever_batch_size: int | None = None
    num_retrieved: int = 2  # k retrieved documents per training sequence (paper default 2)
    model: str = "demo"  # model + train preset (cm3leon.model.config / cm3leon.train.config)
    pretrain: dict = field(default_factory=dict)  # overrides of the train preset
    sft: dict = field(default_factory=dict)  # overrides of the SFT preset
    sft_preset: str | None = None  # default: same name as `model`
    generate_methods: tuple[str, ...] = ("topp", "cfg", "cdk", "best_of_n")
    generate_prompts: int = 16
    cfg_scale: float = 3.0
    eval_num: int = 100  # items per task in the final evaluation
    eval_before_sft: bool = True  # also evaluate the pretrained model (captions, VQA) to show SFT's effect
    sweep: bool = True  # the decoding sweep (CFG scale, best-of-N)
    sweep_num: int = 48

    def to_dict(self) -> dict:
        return asdict(self)


# The CPU presets' recipe (measured on the shapes demo, 4,000 single-object 48-px scenes; each
# figure is text->image colour+shape with CFG 3 / captions CIDEr-D / VQA on 100 test items):
# - the patch48 tokenizer: 48-px images as 6x6 codes of 8x8-pixel patches, k-means in seconds,
#   lossless on the shapes (the 32-px demo32 VQGAN took minutes and lost ~30% of shapes);
# - document masking: packed documents start at position 0 and never see each other. With
#   the same 360 + 120 steps, segment positions (model.segment_positions=64) gave a lower
#   image loss (0.52 vs 0.58 nats per code) but worse samples (6% / 0.61 / 26% vs 16% / 0.96
#   / 35%): every part of the layout gets its own positions, which a short run does not
#   learn to share across them;
# - text-first pairs, no random CM3 spans (poisson_lambda 0: 300-step runs drew the right colour
#   56-66% of the time without them, ~30% with), and the query caption masked whole in half
#   the documents (whole_segment_prob): that one span trains the unconditional stream CFG
#   needs and captioning by infilling, the prompts decoding uses (paper Sec. 2 and 3).
#   Masking every caption instead (whole_segments [1, 3, 5] at 0.35) gave 4% / 0.97 / 28%;
# - small steps (2,048 tokens) at a high learning rate: 300 x 2,048 beat 150 x 4,096 (image
#   loss 0.50 vs 0.59 nats) on the same tokens;
# - SFT at 2e-3 rather than the preset's 6e-4 (120 steps: VQA 26% vs 14%).
_CPU_PRETRAIN = dict(batch_tokens=2048, micro_batch_size=4, lr=3e-3, warmup_steps=30, order="text_first",
                     poisson_lambda=0.0, whole_segment_prob=0.5, document_masking=True)

# SFT: always putting the response in the infilling form (response_mask_prob=1), loss on the
# response and VQA / captions up-weighted make a short budget count (measured with the earlier
# 32-px recipe: ~150 SFT steps otherwise answered VQA with captions). The pipeline keeps only
# the weights of tasks the dataset has (a captions-only folder tunes captions and t2i).
_CPU_SFT = dict(lr=2e-3, document_masking=True, response_mask_prob=1.0, response_only=True,
                weights={"vqa": 3.0, "caption": 3.0, "t2i": 1.0, "edit": 1.0, "layout": 1.0})

PIPELINE_PRESETS: dict[str, PipelinePreset] = {
    "quick": PipelinePreset(
        text_vocab="tiny", image_tokenizer="patch48",
        retriever_steps=60, retriever_batch_size=64, num_retrieved=1,
        model="demo-small", pretrain=dict(_CPU_PRETRAIN, steps=60, eval_every=30, ckpt_every=30),
        sft=dict(_CPU_SFT, steps=30), generate_prompts=8, eval_num=24, eval_before_sft=False,
        sweep=False,
    ),
    "demo": PipelinePreset(
        image_tokenizer="patch48", model="demo-small",
        pretrain=dict(_CPU_PRETRAIN, steps=360, eval_every=120, ckpt_every=120),
        sft=dict(_CPU_SFT, steps=120),
        sweep_num=32,
    ),
    "350m": PipelinePreset(text_vocab="paper", image_tokenizer="cm3leon", model="350m", eval_num=1000, sweep_num=500),
    "760m": PipelinePreset(text_vocab="paper", image_tokenizer="cm3leon", model="760m", eval_num=1000, sweep_num=500),
    "7b": PipelinePreset(text_vocab="paper", image_tokenizer="cm3leon", model="7b", eval_num=1000, sweep_num=500),
}


def get_pipeline_preset(name: str, **overrides) -> PipelinePreset:
    if name not in PIPELINE_PRESETS:
        raise CM3LeonError(f"unknown pipeline preset {name!r}; choose one of {sorted(PIPELINE_PRESETS)}")
    return replace(PIPELINE_PRESETS[name], **overrides)
