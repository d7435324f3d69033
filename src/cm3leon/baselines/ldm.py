"""A Stable-Diffusion-style latent-diffusion baseline in the latent space of this project's image
tokenizer, for the same-budget comparison of `cm3leon ablate --baselines`.

"High-Resolution Image Synthesis with Latent Diffusion Models" (Rombach et al. 2022,
https://arxiv.org/abs/2112.10752), the LDM-VQ variant (Sec. 3 and 4.1): the denoiser works on
the VQ autoencoder's continuous latents before quantization and the decoder quantizes them
first ("absorbing the quantization layer into the decoder"), so the baseline sees the same
image representation as CM3Leon's image tokens. Parts, all from `diffusers` where it has them:
- denoiser: `UNet2DConditionModel`, the text read by cross-attention (Sec. 3.3) from the per-token
  states of the run's frozen retriever text encoder, as Stable Diffusion reads CLIP's;
- the DDPM objective, predicting the noise (Ho et al. 2020, https://arxiv.org/abs/2006.11239, Eq. 14);
- 10% of captions dropped to the empty caption in training, and classifier-free guidance at
  sampling (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598), the two streams as the two
  halves of one batch;
- DDIM sampling (Song et al. 2021, https://arxiv.org/abs/2010.02502) with `DDIMScheduler`, which
  also adds the training noise (one noise schedule for both).

    summary = train_ldm("runs/demo/data", "runs/ldm", LDMConfig(steps=500),
                        image_tokenizer="runs/demo/image_tokenizer", text_encoder="runs/demo/retrieval/retriever")
    images = load_ldm("runs/ldm").text_to_image(["a red circle"], seed=0)

An LDM directory holds config.json, unet.safetensors, image_tokenizer/, text_encoder/ (copies:
it stands alone), train_summary.json, metrics.jsonl, checkpoints/ (resumed from) and
snapshots/step-N/ (weights kept along the run, `LDMConfig.keep_steps`). `diffusers` is the
optional extra `[baselines]`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from cm3leon.errors import CM3LeonError, require
from cm3leon.utils.io import remove_tree

FORMAT = "cm3leon-ldm/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "unet.safetensors"
IMAGE_TOKENIZER = "image_tokenizer"
TEXT_ENCODER = "text_encoder"
SNAPSHOTS = "snapshots"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
EXTRA = "baselines"
DTYPES = ("fp32", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Fields a resume may change: the budget, logging and sampling defaults (the rest shapes the trajectory).
RESUME_MAY_CHANGE = ("steps", "min_seconds", "keep_steps", "log_every", "ckpt_every", "keep_checkpoints",
                     "cfg_scale", "num_inference_steps")


def _diffusers():
    return require("diffusers", EXTRA, "the latent-diffusion baseline")


@dataclass
class LDMConfig:
    """Every choice of the baseline: denoiser, noise schedule, conditioning, training, sampling."""

    # denoiser (diffusers UNet2DConditionModel): one level per entry, each but the last halves
    # the latent side; the middle block always cross-attends to the text
    block_out_channels: tuple[int, ...] = (64, 128)
    cross_attention: tuple[bool, ...] = (True, False)  # levels with cross-attention blocks
    layers_per_block: int = 1  # ResNet (+ attention) layers per level (Stable Diffusion: 2)
    attention_heads: int = 4  # heads of every attention block
    norm_groups: int = 32  # GroupNorm groups; must divide every level's channels
    # noise schedule: LDM-VQ's (1,000 steps, betas 0.0015 -> 0.0195 spaced on a square-root scale)
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: str = "scaled_linear"  # diffusers' name of that spacing ("linear": DDPM's)
    # What the U-Net predicts: "epsilon" (DDPM, LDM, Stable Diffusion 1), "v_prediction"
    # (sqrt(a) eps - sqrt(1 - a) z0: Salimans & Ho 2022, arXiv:2202.00512; Stable Diffusion 2)
    # or "sample" (z0). The patch48 tokenizer's latents are 8x8x3-pixel patches, 192 numbers per
    # position, wider than the U-Net's first level: the noise target needs the input passed
    # through (eps ~ z_t at high noise) and the first convolution cannot, so "epsilon" drew
    # noise (colour+shape 16% of 100 validation prompts, 450 steps, CFG 3); "v_prediction" 77%,
    # "sample" 84%.
    prediction_type: str = "sample"
    # conditioning
    max_text_tokens: int = 32  # text-encoder states per caption (the bi-encoder's 128 bytes in 4-byte tokens)
    caption_dropout: float = 0.1  # captions replaced by the empty one in training, for CFG
    quantize_latents: bool = True  # LDM-VQ: sampled latents take their nearest code before decoding
    # training: AdamW, linear warmup then a constant LR (LDM and Stable Diffusion)
    steps: int = 1000  # optimizer steps, at least
    min_seconds: float = 0.0  # ... and on until the training steps have taken this long (a wall-time budget)
    keep_steps: tuple[int, ...] = ()  # steps whose weights stay in snapshots/ (evaluated along the run)
    batch_size: int = 64  # latents per step
    lr: float = 5e-4
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # AdamW's default, on matrices and kernels only
    grad_clip: float = 1.0
    # autocast dtype, "fp32" or "bf16": on the 2-core CPU of the measurements bf16 was no faster
    # for this small U-Net (0.34-0.40 s a step against 0.32 s in fp32)
    dtype: str = "fp32"
    seed: int = 0  # init, batch order, noise and caption dropout
    log_every: int = 10  # steps between metrics.jsonl rows
    ckpt_every: int = 100  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    # sampling defaults
    cfg_scale: float = 3.0  # classifier-free guidance scale (1: conditional, 0: unconditional)
    num_inference_steps: int = 50  # DDIM steps

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.cross_attention = tuple(bool(a) for a in self.cross_attention)
        self.keep_steps = tuple(sorted({int(s) for s in self.keep_steps}))
        self.betas = tuple(float(b) for b in self.betas)
        if not self.block_out_channels or len(self.cross_attention) != len(self.block_out_channels):
            raise CM3LeonError(f"LDMConfig: cross_attention needs one flag per level of block_out_channels, got "
                               f"{self.cross_attention} for {self.block_out_channels}")
        for c in self.block_out_channels:
            if c < 1 or c % self.norm_groups or c % self.attention_heads:
                raise CM3LeonError(f"LDMConfig: every level's channels must be divisible by norm_groups="
                                   f"{self.norm_groups} and attention_heads={self.attention_heads}, got {c}")
        for name in ("layers_per_block", "num_train_timesteps", "max_text_tokens", "steps", "batch_size",
                     "log_every", "keep_checkpoints", "num_inference_steps"):
            if int(getattr(self, name)) < 1:
                raise CM3LeonError(f"LDMConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "ckpt_every"):
            if int(getattr(self, name)) < 0:
                raise CM3LeonError(f"LDMConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise CM3LeonError(f"LDMConfig.caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if not (self.lr > 0 and self.min_seconds >= 0 and 0 < self.beta_start < self.beta_end < 1):
            raise CM3LeonError(f"LDMConfig: need lr > 0, min_seconds >= 0 and 0 < beta_start < beta_end < 1, got "
                               f"{self.lr}, {self.min_seconds}, {self.beta_start}, {self.beta_end}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise CM3LeonError(f"LDMConfig.prediction_type must be one of {PREDICTION_TYPES}, got "
                               f"{self.prediction_type!r}")
        if self.dtype not in DTYPES:
            raise CM3LeonError(f"LDMConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise CM3LeonError(f"LDMConfig.num_inference_steps must be <= num_train_timesteps, got "
                               f"{self.num_inference_steps}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists

    @classmethod
    def from_dict(cls, d: dict, where: str = "LDM config") -> "LDMConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise CM3LeonError(f"{where}: unknown field(s) {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "LDMConfig":
        return replace(self, **changes)


# ---- the denoiser and the noise schedule ---------------------------------------------------


def build_unet(config: LDMConfig, latent_channels: int, latent_side: int, text_width: int):
    """The denoiser: a `diffusers.UNet2DConditionModel` over [B, latent_channels, side, side]
    latents, cross-attending to text states of width `text_width`."""
    diffusers = _diffusers()
    levels = len(config.block_out_channels)
    if latent_side % 2 ** (levels - 1):
        raise CM3LeonError(f"LDMConfig: {levels} levels halve the latent side {levels - 1} times; a side of "
                           f"{latent_side} is not divisible by {2 ** (levels - 1)}")
    return diffusers.UNet2DConditionModel(
        sample_size=latent_side, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention)),
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        cross_attention_dim=text_width, attention_head_dim=config.attention_heads,  # diffusers' name for heads
        norm_num_groups=config.norm_groups)


def make_scheduler(config: LDMConfig):
    """The noise schedule: `diffusers.DDIMScheduler` with Stable Diffusion's DDIM settings
    (no clipping of the predicted latent, eta 0: sampling is deterministic given the start noise)."""
    diffusers = _diffusers()
    return diffusers.DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                                   beta_end=config.beta_end, beta_schedule=config.beta_schedule, clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1,
                                   prediction_type=config.prediction_type)


def drop_captions(states: torch.Tensor, mask: torch.Tensor, null_states: torch.Tensor, null_mask: torch.Tensor,
                  prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition dropout for classifier-free guidance (Ho & Salimans 2022, Sec. 3.2), a data
    transform: each caption's states [B, T, W] / mask [B, T] become the empty caption's
    ([1, T, W] / [1, T]) with probability `prob`."""
    drop = torch.rand(states.shape[0], generator=generator) < prob  # (B,)
    return (torch.where(drop[:, None, None], null_states, states), torch.where(drop[:, None], null_mask, mask))


def diffusion_loss(unet, scheduler, latents: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The DDPM objective (Ho et al. 2020, Eq. 14), || eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c) ||^2,
    with the scheduler's prediction type's target in place of eps (v or z0)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    kind = scheduler.config.prediction_type
    target = noise if kind == "epsilon" else latents if kind == "sample" else \
        scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float())


def latent_stats(latents: torch.Tensor) -> dict:
    """Shift and scale that give the training latents zero mean and unit variance (LDM's
    scale factor, Rombach et al. Sec. 4.3.2; with the shift of Stable Diffusion 3's autoencoder)."""
    return {"shift": float(latents.mean()), "scale": float(1.0 / latents.std().clamp_min(1e-8)),
            "channels": int(latents.shape[1]), "side": int(latents.shape[-1])}


def unet_flops_per_sample(unet, latent: dict, config: LDMConfig, text_width: int) -> float:
    """Training FLOPs of one latent (`cm3leon.train.flops.training_flops_per_sample`: 3x the
    counted forward of a batch of one, full-length text)."""
    from cm3leon.train.flops import training_flops_per_sample

    p = next(unet.parameters())
    z = torch.zeros(1, latent["channels"], latent["side"], latent["side"], device=p.device)
    states = torch.zeros(1, config.max_text_tokens, text_width, device=p.device)
    mask = torch.ones(1, config.max_text_tokens, dtype=torch.bool, device=p.device)
    return training_flops_per_sample(unet, z, torch.zeros(1, dtype=torch.long, device=p.device),
                                     encoder_hidden_states=states, encoder_attention_mask=mask)


# ---- the model ---------------------------------------------------------------------------------


class LatentDiffusion:
    """A latent-diffusion text->image model: U-Net, noise schedule, frozen text encoder and the
    image tokenizer's decoder. `text_to_image` (a list of prompts) is the interface the evaluation
    (`cm3leon.eval.evaluate.evaluate_model`) calls; `decoding_keys` are its options."""

    decoding_keys = ("cfg_scale", "num_inference_steps")

    def __init__(self, unet, config: LDMConfig, latent: dict, image_tokenizer, text_encoder, path: Path | None = None):
        self.unet = unet.eval()
        self.config = config
        self.latent = dict(latent)
        self.image_tokenizer = image_tokenizer.eval()
        self.text_encoder = text_encoder
        self.retriever = text_encoder  # the evaluation's default scorer when none is given
        self.path = path
        self.null_states, self.null_mask = text_encoder.embed_text_tokens([""], config.max_text_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def resolution(self) -> int:
        return self.image_tokenizer.config.resolution

    @property
    def decoding(self) -> dict:
        return {"cfg_scale": self.config.cfg_scale, "num_inference_steps": self.config.num_inference_steps}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (states [B, T, W], mask [B, T]) on the model's device."""
        states, mask = self.text_encoder.embed_text_tokens(list(prompts), self.config.max_text_tokens)
        return states.to(self.device), mask.to(self.device)

    def guided_prediction(self, latents: torch.Tensor, t, states: torch.Tensor, mask: torch.Tensor,
                          cfg_scale: float) -> torch.Tensor:
        """The U-Net's guided prediction (noise, v or z0, as `prediction_type` says), u + s (c - u)
        with both streams in one batch (`cfg_logits`, the formula CM3Leon applies to logits:
        s = 1 is the conditional prediction alone, s = 0 the unconditional one)."""
        from cm3leon.decode.guidance import cfg_logits

        if cfg_scale == 1.0:
            return self.unet(latents, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        b = latents.shape[0]
        null = self.null_states.to(self.device).expand(b, -1, -1)
        null_mask = self.null_mask.to(self.device).expand(b, -1)
        both = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([null, states]),
                         encoder_attention_mask=torch.cat([null_mask, mask])).sample  # (2B, C, h, w)
        uncond, cond = both.chunk(2)
        return cfg_logits(cond, uncond, cfg_scale)

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], seed: int = 0, cfg_scale: float | None = None,
                       num_inference_steps: int | None = None) -> torch.Tensor:
        """DDIM from Gaussian noise drawn with `seed`: latents [B, C, h, w] in the image
        tokenizer's own scale (before quantization)."""
        from cm3leon.decode.guidance import MAX_GUIDANCE

        cfg_scale = self.config.cfg_scale if cfg_scale is None else cfg_scale
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not 0 <= cfg_scale <= MAX_GUIDANCE:
            raise CM3LeonError(f"cfg_scale must be a number in [0, {MAX_GUIDANCE:g}], got {cfg_scale!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.config.num_train_timesteps:
            raise CM3LeonError(f"num_inference_steps must be an integer in [1, {self.config.num_train_timesteps}], "
                               f"got {steps!r}")
        states, mask = self.encode_prompts(prompts)
        c, side = self.latent["channels"], self.latent["side"]
        gen = torch.Generator().manual_seed(int(seed))
        z = torch.randn(len(prompts), c, side, side, generator=gen).to(self.device)  # DDIM's start: sigma 1
        scheduler = make_scheduler(self.config)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            z = scheduler.step(self.guided_prediction(z, t, states, mask, float(cfg_scale)), t, z).prev_sample
        return z / self.latent["scale"] + self.latent["shift"]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]; LDM-VQ quantizes first."""
        vq = self.image_tokenizer
        z = latents.to(next(vq.parameters()).dtype)
        if self.config.quantize_latents:
            z = vq.quantize(z)[0]
        return vq.decode_latents(z).clamp(-1, 1)

    def text_to_image(self, prompts: Sequence[str], seed: int = 0, decoding: dict | None = None) -> list:
        """One PIL image per prompt; decoding: some of `decoding_keys` (the config's otherwise)."""
        from cm3leon.tokenizers.image import tensor_to_images

        d = {**self.decoding, **(decoding or {})}
        return tensor_to_images(self.decode(self.sample_latents(prompts, seed, d["cfg_scale"],
                                                                d["num_inference_steps"])))


# ---- data --------------------------------------------------------------------------------------


@dataclass
class LatentData:
    """The training set as the denoiser sees it, encoded once (frozen encoders, as the code
    shards are tokenized once): latents before quantization and every caption's text states."""

    latents: torch.Tensor  # (N, C, h, w) float32
    states: torch.Tensor  # (N, T, W) float32, zero where padded
    mask: torch.Tensor  # (N, T) bool

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def encode_training_data(data, image_tokenizer, text_encoder, max_text_tokens: int, split: str = "train",
                         batch_size: int = 256) -> LatentData:
    """Read `split` of a dataset (any format the readers open, at the tokenizer's resolution)
    and encode it: the same (image, caption) pairs the code shards hold."""
    from cm3leon.data.readers import open_dataset
    from cm3leon.tokenizers.image import images_to_tensor
    from cm3leon.utils.logging import progress

    vq = image_tokenizer
    p = next(vq.parameters())
    latents, texts, images = [], [], []

    def flush() -> None:
        latents.append(vq.latents(images_to_tensor(images).to(p.device, p.dtype)).float().cpu())
        images.clear()

    with progress(desc=f"encoding {split}", unit="img") as bar:
        for rec in open_dataset(data, size=vq.config.resolution, split=split):
            images.append(rec.image)
            texts.append(rec.text)
            if len(images) == batch_size:
                flush()
            bar.update(1)
        if images:
            flush()
    if not texts:
        raise CM3LeonError(f"{data}: no readable records in split {split!r} to train the diffusion baseline on")
    states, mask = text_encoder.embed_text_tokens(texts, max_text_tokens)
    return LatentData(torch.cat(latents), states, mask)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Record indices of optimizer step `step`: epochs of seeded random permutations, read
    in order (a pure function of the step, so a resume needs no data state)."""
    first, out = step * batch_size, []
    while len(out) < batch_size:
        pos = first + len(out)
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += perm[offset:offset + batch_size - len(out)].tolist()
    return torch.tensor(out, dtype=torch.long)


# ---- training ----------------------------------------------------------------------------------


def train_ldm(data, out_dir, config: LDMConfig, image_tokenizer, text_encoder, device: str = "cpu") -> dict:
    """Train the baseline on `data`'s training split; returns (and writes) the summary.

    image_tokenizer: an image tokenizer directory (its latents are the diffusion space);
    text_encoder: a retriever directory (its frozen text encoder conditions the U-Net). Trains
    at least `config.steps` steps and on until the training steps took `config.min_seconds`;
    keeps the weights at `config.keep_steps` and at the step where `min_seconds` was reached
    in snapshots/. out_dir gets metrics.jsonl (step, loss, lr, samples, seconds, flops),
    checkpoints/ (resumed from automatically) and at the end the LDM directory. Seconds are
    those of the training steps alone (data included; not start-up, encoding or checkpoints)."""
    from cm3leon.retrieval.encoder import load_retriever
    from cm3leon.tokenizers.image import VQModel
    from cm3leon.train import checkpoint as ckpt
    from cm3leon.train.loop import build_optimizer
    from cm3leon.train.parallel import DistInfo
    from cm3leon.train.schedule import lr_at
    from cm3leon.utils.io import remove_stale_temporaries, write_json
    from cm3leon.utils.logging import MetricsLogger, progress, trim_metrics

    _diffusers()
    out, info = Path(out_dir), DistInfo(device=torch.device(device))
    vq = VQModel.from_pretrained(image_tokenizer, device=device)
    encoder = load_retriever(text_encoder, device=device)
    train = encode_training_data(data, vq, encoder, config.max_text_tokens)
    latent = latent_stats(train.latents)
    torch.manual_seed(config.seed)
    unet = build_unet(config, latent["channels"], latent["side"], encoder.text_width).to(device)
    flops_per_sample = unet_flops_per_sample(unet, latent, config, encoder.text_width)
    scheduler = make_scheduler(config)
    null_states, null_mask = encoder.embed_text_tokens([""], config.max_text_tokens)
    optimizer = build_optimizer(unet, config)
    arch = {k: v for k, v in config.to_dict().items() if k not in RESUME_MAY_CHANGE} | {"latent": latent}

    # --- resume ----------------------------------------------------------------------------
    root = out / CHECKPOINTS
    remove_stale_temporaries(root)
    step, samples, seconds, state = 0, 0, 0.0, None
    for _, path in reversed(ckpt.list_checkpoints(root)):
        try:
            state = ckpt.load_checkpoint(path, unet, optimizer, info, model_config=arch)
            break
        except ckpt.DamagedCheckpoint:
            continue
    if state is not None:
        step, samples, seconds = int(state["step"]), int(state["samples"]), float(state["seconds"])
    trim_metrics(out / METRICS, step)
    snapshots = _read_snapshots(out)
    for s in [s for s in snapshots if s["step"] > step]:  # saved after the checkpoint: trained again
        remove_tree(out / SNAPSHOTS / _step_name(s["step"]))  # whole or gone, even when killed
    snapshots = [s for s in snapshots if s["step"] <= step]

    def save_checkpoint() -> None:
        ckpt.save_checkpoint(root, step, unet, optimizer, {
            "tokens_seen": samples * latent["side"] ** 2,  # latent positions: the analogue of image tokens
            "samples": samples, "seconds": seconds, "model_config": arch}, info, keep=config.keep_checkpoints)

    autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if config.dtype == "bf16" \
        else nullcontext
    per_step = config.batch_size
    logger = MetricsLogger(out / METRICS)
    bar = progress(total=config.steps, desc="ldm", unit="step", initial=min(step, config.steps))
    unet.train()
    loss, start = float("nan"), step
    try:
        while step < config.steps or seconds < config.min_seconds:
            lr = lr_at(step, config.lr, config.warmup_steps, max(config.steps, step + 1), "linear", 1.0)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(config.seed * 7_919 + step)
            idx = batch_indices(step, len(train), per_step, config.seed)
            z0 = (train.latents[idx].to(device) - latent["shift"]) * latent["scale"]
            states, mask = drop_captions(train.states[idx], train.mask[idx], null_states, null_mask,
                                         config.caption_dropout, gen)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            t = torch.randint(0, config.num_train_timesteps, (per_step,), generator=gen).to(device)
            with autocast():
                loss_t = diffusion_loss(unet, scheduler, z0, states.to(device), mask.to(device), noise, t)
            loss_t.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_t.detach().item()
            if not math.isfinite(loss):
                raise CM3LeonError(f"diffusion loss is not finite at step {step + 1}; lower LDMConfig.lr")
            seconds += time.perf_counter() - t0
            step += 1
            samples += per_step
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", seconds=f"{seconds:.0f}")
            if step % config.log_every == 0:
                logger.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm, samples=samples,
                           seconds=round(seconds, 3), flops=flops_per_sample * samples)
            reasons = ["steps"] if step in config.keep_steps else []
            if config.min_seconds and seconds >= config.min_seconds and not any(
                    "seconds" in s["reasons"] for s in snapshots):
                reasons.append("seconds")  # the first step past the wall-time budget
            if reasons:
                snapshots.append(_save_snapshot(out, unet, {"step": step, "samples": samples, "seconds": seconds,
                                                            "flops": flops_per_sample * samples, "loss": loss,
                                                            "reasons": reasons}))
            if config.ckpt_every and step % config.ckpt_every == 0:
                save_checkpoint()
        if step > start and not (config.ckpt_every and step % config.ckpt_every == 0):
            save_checkpoint()
    finally:
        bar.close()
        logger.close()

    unet.eval()
    model = LatentDiffusion(unet, config, latent, vq, encoder)
    save_ldm(model, out, image_tokenizer, text_encoder)
    summary = {"steps": step, "samples": samples, "train_seconds": round(seconds, 3),
               "num_parameters": model.num_parameters, "flops_per_sample": flops_per_sample,
               "train_flops": flops_per_sample * samples,
               "final_train_loss": loss if step > start else _last_loss(out), "train_records": len(train),
               "latent": latent, "snapshots": snapshots, "config": config.to_dict()}
    write_json(out / SUMMARY, summary)
    return summary


def _last_loss(out: Path) -> float | None:
    from cm3leon.utils.logging import read_metrics

    rows = [r for r in read_metrics(out / METRICS) if "loss" in r]
    return rows[-1]["loss"] if rows else None


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _save_snapshot(out: Path, unet, info: dict) -> dict:
    from safetensors.torch import save_file

    from cm3leon.utils.io import atomic_path, write_json

    with atomic_path(out / SNAPSHOTS / _step_name(info["step"])) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().float().cpu().contiguous() for k, v in unet.state_dict().items()},
                  str(tmp / WEIGHTS_FILE))
        write_json(tmp / "snapshot.json", info)
    return info


def _read_snapshots(out: Path) -> list[dict]:
    from cm3leon.utils.io import read_json

    d = out / SNAPSHOTS
    found = sorted(d.glob("step-*/snapshot.json")) if d.is_dir() else []
    return [read_json(f, "snapshot") for f in found]


# ---- files -------------------------------------------------------------------------------------


def save_ldm(model: LatentDiffusion, out_dir, image_tokenizer, text_encoder) -> Path:
    """Write an LDM directory: unet.safetensors, copies of the image tokenizer and text-encoder
    directories, then config.json last (a directory with a config is complete)."""
    from safetensors.torch import save_file

    from cm3leon.utils.io import atomic_path, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.unet.state_dict().items()},
                  str(tmp), metadata={"format": FORMAT})
    for name, src in ((IMAGE_TOKENIZER, image_tokenizer), (TEXT_ENCODER, text_encoder)):
        if Path(src).resolve() != (out / name).resolve():
            with atomic_path(out / name) as tmp:
                shutil.copytree(src, tmp)
    write_json(out / CONFIG_FILE, {"format": FORMAT, "config": model.config.to_dict(), "latent": model.latent,
                                   "text_width": model.text_encoder.text_width})
    return out


def load_ldm(path, snapshot: int | None = None, device: str = "cpu") -> LatentDiffusion:
    """Open an LDM directory; `snapshot`: the weights kept at that training step instead of the final ones."""
    from cm3leon.retrieval.encoder import load_retriever
    from cm3leon.tokenizers.image import VQModel
    from cm3leon.utils.io import load_safetensors, read_json

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CM3LeonError(f"{path}: not a latent-diffusion directory (no {CONFIG_FILE}); train one with train_ldm")
    d = read_json(path / CONFIG_FILE, "LDM config")
    if d.get("format") != FORMAT:
        raise CM3LeonError(f"{path / CONFIG_FILE}: format {d.get('format')!r}, expected {FORMAT!r}")
    config = LDMConfig.from_dict(d["config"], str(path / CONFIG_FILE))
    latent = d["latent"]
    weights = path / WEIGHTS_FILE if snapshot is None else path / SNAPSHOTS / _step_name(snapshot) / WEIGHTS_FILE
    unet = build_unet(config, latent["channels"], latent["side"], int(d["text_width"]))
    try:
        unet.load_state_dict(load_safetensors(weights, "U-Net weights"))
    except RuntimeError as e:
        raise CM3LeonError(f"{weights}: U-Net weights do not fit {path / CONFIG_FILE} ({str(e)[:200]})") from None
    return LatentDiffusion(unet.to(device), config, latent, VQModel.from_pretrained(path / IMAGE_TOKENIZER, device),
                           load_retriever(path / TEXT_ENCODER, device=device), path=path)


__all__ = ["LDMConfig", "LatentDiffusion", "LatentData", "build_unet", "make_scheduler", "drop_captions",
           "diffusion_loss", "latent_stats", "unet_flops_per_sample", "encode_training_data", "batch_indices",
           "train_ldm", "save_ldm", "load_ldm"]
