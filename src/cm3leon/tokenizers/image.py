"""Image tokenizer: a VQGAN (taming-transformers / Make-A-Scene family) that turns an image into
a grid of discrete codes and back.

"Taming Transformers for High-Resolution Image Synthesis" (Esser et al. 2021,
https://arxiv.org/abs/2012.09841); CM3Leon (arXiv 2309.02591, Sec. 2.1) uses the Make-A-Scene
tokenizer (https://arxiv.org/abs/2203.13131): 256x256 -> 32x32 = 1,024 codes from 8,192.

Parameter names follow the taming layout (`encoder.down.0.block.0.norm1.weight`,
`quantize.embedding.weight`, `quant_conv`, ...), so a taming checkpoint such as Chameleon's
released `vqgan.ckpt` loads without renaming (`cm3leon.convert.taming.load_taming_vqgan`), and the encoder matches
`transformers`' `ChameleonVQVAE` name for name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import atomic_path, load_safetensors, read_json, write_json
from cm3leon.utils.presets import lookup

FORMAT = "cm3leon-vq/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CODEBOOK_TYPES = ("nearest", "cosine", "ema")
ARCHITECTURES = ("vqgan", "patch")


@dataclass
class VQConfig:
    resolution: int = 256  # input side in pixels (square images)
    in_channels: int = 3  # RGB
    base_channels: int = 128  # taming `ch`: channels of the first level
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 4)  # one per level; f = 2 ** (levels - 1)
    num_res_blocks: int = 2  # ResNet blocks per level (the decoder uses one more, as taming)
    attn_resolutions: tuple[int, ...] = (32,)  # feature-map sides that get self-attention blocks
    z_channels: int = 256  # encoder output / decoder input channels
    embed_dim: int = 256  # codebook vector size (after quant_conv)
    codebook_size: int = 8192  # paper: 8,192 image codes
    beta: float = 0.25  # commitment weight (VQ-VAE, van den Oord et al. 2017)
    # "nearest": plain Euclidean nearest neighbour (taming / Chameleon, needed to load them);
    # "cosine": l2-normalised codes and latents (ViT-VQGAN), robust against collapse;
    # "ema": nearest neighbour with the codebook updated by exponential moving averages.
    codebook_type: str = "cosine"
    ema_decay: float = 0.99  # codebook_type="ema" only
    dead_code_steps: int = 0  # >0: re-seed a code from encoder outputs after this many unused training steps
    # Where k-means initialisation and dead-code restarts place codes: "random" encoder outputs
    # (uniform), or "error": outputs drawn with probability proportional to their squared
    # distance from the nearest code (k-means++, Arthur & Vassilvitskii 2007). On images with
    # large flat areas, "random" spends most codes on near-identical background latents.
    seeding: str = "random"
    norm_groups: int = 32  # GroupNorm groups (taming: 32); must divide every channel count
    dropout: float = 0.0
    # "vqgan": the convolutional encoder/decoder above (taming). "patch": no network at all; a
    # code stands for one patch_size x patch_size patch of pixels, the codebook is fitted by
    # k-means on the training patches and decoding pastes the codes' patches (the patch
    # version of ImageGPT's k-means colour palette, Chen et al. 2020). It fits in seconds on a
    # CPU; on data with few distinct patches (rendered scenes) it is lossless once
    # codebook_size reaches their number, and on photos it is blocky.
    architecture: str = "vqgan"
    patch_size: int = 8  # architecture="patch" only: pixels per code side

    def __post_init__(self):
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.attn_resolutions = tuple(int(r) for r in (self.attn_resolutions or ()))
        if self.architecture not in ARCHITECTURES:
            raise CM3LeonError(f"VQConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "patch":
            self._check_patch()
            return
        if self.seeding not in ("random", "error"):
            raise CM3LeonError(f"VQConfig.seeding must be 'random' or 'error', got {self.seeding!r}")
        if self.codebook_type not in CODEBOOK_TYPES:
            raise CM3LeonError(f"VQConfig.codebook_type must be one of {CODEBOOK_TYPES}, got {self.codebook_type!r}")
        if not self.channel_multipliers:
            raise CM3LeonError("VQConfig.channel_multipliers must not be empty")
        for name in ("resolution", "in_channels", "base_channels", "num_res_blocks", "z_channels", "embed_dim", "codebook_size", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise CM3LeonError(f"VQConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % self.downsample_factor:
            raise CM3LeonError(
                f"VQConfig.resolution={self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (from channel_multipliers={self.channel_multipliers})")
        for c in {self.base_channels * m for m in self.channel_multipliers} | {self.base_channels}:
            if c % self.norm_groups:
                raise CM3LeonError(f"VQConfig.norm_groups={self.norm_groups} does not divide {c} channels")

    def _check_patch(self) -> None:
        if int(self.patch_size) < 1 or int(self.codebook_size) < 1 or int(self.in_channels) < 1:
            raise CM3LeonError(f"VQConfig.patch_size, codebook_size and in_channels must be >= 1, got "
                               f"{self.patch_size}, {self.codebook_size}, {self.in_channels}")
        dim = self.in_channels * self.patch_size ** 2
        if self.embed_dim != dim or self.z_channels != dim:
            raise CM3LeonError(f"VQConfig: a patch tokenizer's embed_dim and z_channels must be in_channels x "
                               f"patch_size^2 = {dim} (the pixels of a patch), got {self.embed_dim}, {self.z_channels}")
        if self.codebook_type != "nearest":
            raise CM3LeonError(f"VQConfig: a patch tokenizer's codebook_type must be 'nearest' (its codes are "
                               f"pixel patches), got {self.codebook_type!r}")
        if self.resolution % self.patch_size:
            raise CM3LeonError(f"VQConfig.resolution={self.resolution} is not divisible by patch_size={self.patch_size}")

    @property
    def downsample_factor(self) -> int:
        if self.architecture == "patch":
            return self.patch_size
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.downsample_factor
        return side, side

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_multipliers"] = list(self.channel_multipliers)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "VQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"format", "grid", "tokens_per_image", "downsample_factor"})
        if unknown:
            raise CM3LeonError(f"{where}: unknown VQ config fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


# Presets by exact name. The paper's and Chameleon's are for GPUs; the small ones run on a CPU.
PRESETS: dict[str, VQConfig] = {
    # CM3Leon / Make-A-Scene: 256 px, f=8 -> 32x32 = 1,024 codes from 8,192.
    "cm3leon": VQConfig(resolution=256, base_channels=128, channel_multipliers=(1, 1, 2, 4), num_res_blocks=2,
                        attn_resolutions=(32,), z_channels=256, embed_dim=256, codebook_size=8192,
                        codebook_type="cosine", dead_code_steps=200),
    # Chameleon's released vqgan.yaml: 512 px, ch 128, ch_mult [1,1,2,2,4] (f=16), no extra
    # attention levels, z 256, embed 256, 8,192 codes, plain nearest-neighbour quantizer.
    "chameleon": VQConfig(resolution=512, base_channels=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                          attn_resolutions=(), z_channels=256, embed_dim=256, codebook_size=8192,
                          codebook_type="nearest"),
    # 32 px -> 8x8 = 64 codes: the CPU demo. Tuned for PSNR per minute on the shapes data:
    # most width at 8x8, EMA codes (beat cosine codes by ~3 dB and kept small objects' colours
    # at 800 steps), 1,024 entries. Error-weighted seeding (k-means++ init and restarts where
    # latents are badly quantized) instead of uniform: +0.8 dB PSNR, objects recovered by the
    # checker 65.5% -> 70.5%, codes kept by a round trip 67% -> 72% (1,000 steps): uniform
    # seeding spent ~800 of the 1,024 codes on the white background.
    "demo32": VQConfig(resolution=32, base_channels=16, channel_multipliers=(1, 2, 4), num_res_blocks=1,
                       attn_resolutions=(), z_channels=32, embed_dim=32, codebook_size=1024,
                       codebook_type="ema", dead_code_steps=30, seeding="error", norm_groups=8),
    # 64 px -> 8x8 = 64 codes (f=8): the same sequence budget as demo32 at twice the side.
    "demo64": VQConfig(resolution=64, base_channels=16, channel_multipliers=(1, 2, 4, 4), num_res_blocks=1,
                       attn_resolutions=(), z_channels=32, embed_dim=32, codebook_size=1024,
                       codebook_type="ema", dead_code_steps=30, seeding="error", norm_groups=8),
    # 48 px -> 6x6 = 36 codes of 8x8-pixel patches, fitted by k-means in seconds: the CPU
    # demo. On the built-in shapes at 48 px a cell of the 3x3 scene layout is 2x2 patches, so an
    # object is always the same four codes wherever it sits (241 distinct patches in 4,000
    # single-object scenes): lossless, the checker recovers 100% of objects from
    # reconstructions, where the demo32 VQGAN (1,000 steps, ~3 minutes) keeps ~70% of shapes.
    # At 32 px, 8-px patches cut objects at varying offsets (1,705 distinct patches; 2,048
    # codes for a lossless fit).
    "patch48": VQConfig(resolution=48, architecture="patch", patch_size=8, z_channels=192, embed_dim=192,
                        codebook_size=512, codebook_type="nearest", seeding="error"),
    # tests: 16 px -> 4x4 codes, a few thousand parameters.
    "tiny": VQConfig(resolution=16, base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                     attn_resolutions=(), z_channels=8, embed_dim=8, codebook_size=64,
                     codebook_type="cosine", dead_code_steps=10, norm_groups=4),
}


def get_preset(name: str, **overrides) -> VQConfig:
    """A copy of the named preset, with optional field overrides."""
    return replace(lookup(PRESETS, name, "image tokenizer"), **overrides)


# ---------------------------------------------------------------------------------------------
# Building blocks (taming `diffusionmodules/model.py` layout and names)


def _norm(cfg: VQConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=cfg.norm_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(cfg, out_channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the feature map's positions."""

    def __init__(self, cfg: VQConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (t(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q, self.k, self.v))  # (B, 1, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as taming
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, cfg: VQConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)  # attention at the lowest resolution
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.channel_multipliers
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, 1, 1)
        in_mult = (1,) + mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            ch_in, ch_out = cfg.base_channels * in_mult[i], cfg.base_channels * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, ch_in, ch_out))
                ch_in = ch_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cfg, ch_in))
            if i != len(mult) - 1:
                level.downsample = Downsample(ch_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(cfg, ch_in)
        self.norm_out = _norm(cfg, ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.channel_multipliers
        ch = cfg.base_channels * mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, 1, 1)
        self.mid = _Mid(cfg, ch)
        up = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            ch_out = cfg.base_channels * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, ch, ch_out))
                ch = ch_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cfg, ch))
            if i != 0:
                level.upsample = Upsample(ch)
                res *= 2
            up.insert(0, level)  # up[i] is level i, as taming indexes it
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the adaptive GAN loss weight is computed against (taming)."""
        return self.conv_out.weight


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances [N, M] between rows of a [N, D] and b [M, D]:
    ||a||^2 + ||b||^2 - 2 a.b, the same expression as taming / Chameleon (so codes match)."""
    return (a ** 2).sum(1, keepdim=True) + (b ** 2).sum(1) - 2 * (a @ b.t())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Losses follow VQ-VAE: codebook ||sg[z] - e||^2 and commitment beta * ||z - sg[e]||^2
    (taming's legacy code swaps beta between the two; only training differs, not the codes)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.embed_dim
        self.embedding = nn.Embedding(k, d)
        nn.init.uniform_(self.embedding.weight, -1.0 / k, 1.0 / k)  # taming's init
        if cfg.codebook_type == "ema":
            self.embedding.weight.requires_grad_(False)  # updated by moving averages, not gradients
            self.register_buffer("ema_cluster_size", torch.zeros(k))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        # training steps since each code was last chosen (dead-code restart); not saved
        self.register_buffer("unused_steps", torch.zeros(k, dtype=torch.long), persistent=False)

    def codebook(self) -> torch.Tensor:
        """The vectors the indices stand for, [K, D] (l2-normalised for the cosine type)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.codebook_type == "cosine" else w

    def _prepare(self, z_flat: torch.Tensor) -> torch.Tensor:
        return F.normalize(z_flat, dim=-1) if self.cfg.codebook_type == "cosine" else z_flat

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the closest code for each row of z_flat [N, D] (already prepared)."""
        return _sq_dist(z_flat, self.codebook()).argmin(1)

    def code_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B, D, h, w] -> squared distances to every code [B*h*w, K]; gradients
        reach z only, never the codebook."""
        z_flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())
        return _sq_dist(z_flat, self.codebook().detach())

    @torch.no_grad()
    def code_spacing(self) -> float:
        """Median squared distance from each code to its nearest other code."""
        e = self.codebook().float()
        d = _sq_dist(e, e)
        d.fill_diagonal_(float("inf"))
        return d.min(1).values.median().item()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> quantised latents [B, D, h, w]."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, update: bool = False):
        """z [B, D, h, w] -> (z_q with straight-through gradient, losses, indices [B, h, w]).

        `update=True` (training) applies EMA codebook updates and dead-code restarts."""
        b, d, h, w = z.shape
        z_flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, d).float())  # (B*h*w, D)
        with torch.no_grad():
            idx = self.nearest(z_flat)
        if update:
            self._update(z_flat.detach(), idx)
            with torch.no_grad():
                idx = self.nearest(z_flat)  # codes may have moved or been re-seeded
        e = self.codebook()[idx]
        commitment = F.mse_loss(z_flat, e.detach())
        codebook = z.new_zeros(()) if self.cfg.codebook_type == "ema" else F.mse_loss(e, z_flat.detach())
        zq_flat = z_flat + (e - z_flat).detach()
        z_q = zq_flat.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        losses = {"codebook": codebook, "commitment": commitment, "quant": codebook + self.cfg.beta * commitment}
        return z_q, losses, idx.reshape(b, h, w)

    @torch.no_grad()
    def _update(self, z_flat: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.cfg.codebook_size
        counts = torch.bincount(idx, minlength=k).to(z_flat.dtype)
        if self.cfg.codebook_type == "ema":
            decay = self.cfg.ema_decay
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, z_flat)
            self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing
            self.embedding.weight.copy_(self.ema_embed_sum / size.unsqueeze(1))
        if self.cfg.dead_code_steps > 0:
            self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
            dead = torch.nonzero(self.unused_steps >= self.cfg.dead_code_steps).flatten()
            if dead.numel():
                self._reseed(dead, z_flat)

    def _pick(self, z_flat: torch.Tensor, n: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of `n` rows of z_flat to seed codes on: uniform ("random") or with probability
        proportional to the squared distance to the nearest kept code ("error")."""
        if self.cfg.seeding == "error":
            keep = torch.ones(self.cfg.codebook_size, dtype=torch.bool, device=z_flat.device)
            if exclude is not None:
                keep[exclude] = False
            if keep.any():
                err = _sq_dist(z_flat, self.codebook()[keep]).min(1).values.clamp(min=0)
                if err.sum() > 0:
                    return torch.multinomial(err, n, replacement=n > err.count_nonzero().item())
        return torch.randint(0, z_flat.shape[0], (n,), device=z_flat.device)

    @torch.no_grad()
    def _reseed(self, codes: torch.Tensor, z_flat: torch.Tensor) -> None:
        """Move `codes` onto encoder outputs of the current batch (see `VQConfig.seeding`)."""
        pick = self._pick(z_flat, codes.numel(), exclude=codes)
        self.embedding.weight[codes] = z_flat[pick].to(self.embedding.weight.dtype)
        if self.cfg.codebook_type == "ema":
            self.ema_cluster_size[codes] = 1.0
            self.ema_embed_sum[codes] = z_flat[pick]
        self.unused_steps[codes] = 0

    def _kmeans_pp(self, z_flat: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
        """k-means++ seeding (in chunks of `chunk` centres drawn at once, to stay fast)."""
        pick = torch.randint(0, z_flat.shape[0], (1,), device=z_flat.device)
        best = _sq_dist(z_flat, z_flat[pick]).squeeze(1).clamp(min=0)
        while pick.numel() < k:
            n = min(chunk, k - pick.numel())
            if best.count_nonzero() < n:  # fewer distinct latents than codes: the rest at random
                extra = torch.randint(0, z_flat.shape[0], (k - pick.numel(),), device=z_flat.device)
                return torch.cat([pick, extra])
            new = torch.multinomial(best, n, replacement=False)
            pick = torch.cat([pick, new])
            best = torch.minimum(best, _sq_dist(z_flat, z_flat[new]).min(1).values.clamp(min=0))
        return pick

    @torch.no_grad()
    def kmeans_init_(self, z: torch.Tensor, iters: int = 10) -> None:
        """Initialise the codebook by k-means on encoder outputs z [B, D, h, w] (or [N, D]):
        every code starts where data lives, so none is dead from the start."""
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) if z.dim() == 4 else z
        z_flat = self._prepare(z_flat.float())
        k = self.cfg.codebook_size
        if self.cfg.seeding == "error" and z_flat.shape[0] >= k:
            pick = self._kmeans_pp(z_flat, k)
        else:
            pick = torch.randperm(z_flat.shape[0], device=z_flat.device)[:k]
        if pick.numel() < k:  # fewer latents than codes: repeat with jitter
            pick = pick[torch.randint(0, pick.numel(), (k,), device=z_flat.device)]
        centers = z_flat[pick] + 1e-3 * torch.randn(k, z_flat.shape[1], device=z_flat.device)
        centers = self._prepare(centers)
        for _ in range(iters):
            idx = _sq_dist(z_flat, centers).argmin(1)
            counts = torch.bincount(idx, minlength=k).float()
            sums = torch.zeros_like(centers).index_add_(0, idx, z_flat)
            live = counts > 0
            centers[live] = self._prepare(sums[live] / counts[live].unsqueeze(1))
        self.embedding.weight.copy_(centers.to(self.embedding.weight.dtype))
        if self.cfg.codebook_type == "ema":
            counts = torch.bincount(self.nearest(z_flat), minlength=k).float()
            # a small prior mass per code: the first training batches can still move the codes
            self.ema_cluster_size.copy_(counts.clamp(min=1.0) / max(1, z_flat.shape[0]) * 64)
            self.ema_embed_sum.copy_(self.embedding.weight * self.ema_cluster_size.unsqueeze(1))
        self.unused_steps.zero_()


# ---------------------------------------------------------------------------------------------


class VQModel(nn.Module):
    """Encoder -> quant_conv -> vector quantizer -> post_quant_conv -> decoder.

    Images are float tensors [B, C, H, W] in [-1, 1] with H = W = config.resolution; codes are
    integer grids [B, h, w] with (h, w) = config.grid."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        if config.architecture == "patch":  # pixels in, pixels out: (B, C, H, W) <-> (B, C*p*p, H/p, W/p)
            self.encoder = nn.PixelUnshuffle(config.patch_size)
            self.decoder = nn.PixelShuffle(config.patch_size)
            self.quantize = VectorQuantizer(config)
            self.quant_conv = self.post_quant_conv = nn.Identity()
            return
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    # --- checks --------------------------------------------------------------------------
    def _check_images(self, x) -> torch.Tensor:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CM3LeonError(f"images must be a float tensor [B, {cfg.in_channels}, H, W], got {shape}")
        if x.shape[1] != cfg.in_channels:
            raise CM3LeonError(
                f"images have {x.shape[1]} channels, the image tokenizer expects {cfg.in_channels} "
                f"(tensor shape {tuple(x.shape)}; channels come second: [B, C, H, W])")
        if tuple(x.shape[2:]) != (cfg.resolution, cfg.resolution):
            raise CM3LeonError(
                f"images are {x.shape[2]}x{x.shape[3]} px, the image tokenizer expects "
                f"{cfg.resolution}x{cfg.resolution}; resize them first (images_to_tensor(..., size={cfg.resolution}))")
        if not x.is_floating_point():
            raise CM3LeonError(f"images must be a float tensor in [-1, 1], got dtype {x.dtype}")
        if x.numel() and (x.min() < -1.5 or x.max() > 1.5):
            raise CM3LeonError(
                f"image values span [{x.min().item():.3g}, {x.max().item():.3g}], expected [-1, 1] "
                "(use images_to_tensor to convert PIL images)")
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def _check_codes(self, codes) -> torch.Tensor:
        cfg = self.config
        h, w = cfg.grid
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise CM3LeonError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.dim() == 2 and codes.shape[1] == h * w:
            codes = codes.reshape(-1, h, w)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            raise CM3LeonError(f"codes must have shape [B, {h}, {w}] or [B, {h * w}], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
            raise CM3LeonError(
                f"image codes must lie in [0, {cfg.codebook_size}), got min {codes.min().item()}, "
                f"max {codes.max().item()}")
        return codes.long().to(next(self.parameters()).device)

    # --- the tokenizer -----------------------------------------------------------------
    def encode_latents(self, x: torch.Tensor, update: bool = False):
        """Images (checked) -> (z_q [B, D, h, w], losses, codes [B, h, w])."""
        return self.quantize(self.latents(x), update=update)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images (checked) -> latents before quantization [B, D, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> codes LongTensor [B, h, w]."""
        return self.encode_latents(self._check_images(images))[2]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] or [B, h*w] -> images [B, C, H, W] in [-1, 1]."""
        z_q = self.quantize.lookup(self._check_codes(codes))
        return self.decode_latents(z_q.to(next(self.parameters()).dtype)).clamp(-1, 1)

    def forward(self, x: torch.Tensor):
        """Images -> (reconstruction, losses {"codebook", "commitment", "quant"}, codes).

        In training mode the quantizer also applies its codebook maintenance (EMA, restarts)."""
        z_q, losses, codes = self.encode_latents(self._check_images(x), update=self.training)
        return self.decode_latents(z_q), losses, codes

    # --- persistence -----------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` (each atomically) into `out_dir`."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        cfg = self.config
        write_json(out_dir / CONFIG_FILE, {"format": FORMAT, **cfg.to_dict(), "grid": list(cfg.grid),
                                           "tokens_per_image": cfg.tokens_per_image,
                                           "downsample_factor": cfg.downsample_factor})
        return out_dir

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "VQModel":
        """Load a directory written by `save_pretrained` (or by `cm3leon tokenizer image`)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"image tokenizer not found: {path} has no {CONFIG_FILE} "
                                    "(train one with `cm3leon tokenizer image`)")
        d = read_json(path / CONFIG_FILE, "image tokenizer config")
        if d.get("format") != FORMAT:
            raise CM3LeonError(f"{path / CONFIG_FILE}: format {d.get('format')!r}, expected {FORMAT!r}")
        model = cls(VQConfig.from_dict(d, where=str(path / CONFIG_FILE)))
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"image tokenizer weights not found: {weights}")
        load_weights(model, load_safetensors(weights, "image tokenizer weights"), str(weights))
        return model.to(device).eval()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_weights(model: VQModel, state: dict, where: str) -> None:
    """Load `state` into `model`, or name what does not match (`where`: the file)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CM3LeonError(
            f"{where}: weights do not match the config (missing {len(missing)}: {missing[:4]}, "
            f"unexpected {len(unexpected)}: {unexpected[:4]})")
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CM3LeonError(f"{where}: {len(bad)} tensors have the wrong shape, e.g. {k}: "
                           f"{tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} from the config")
    model.load_state_dict({k: v for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# PIL <-> tensors


def images_to_tensor(images: Sequence, size: int | None = None) -> torch.Tensor:
    """PIL images -> float tensor [B, 3, H, W] in [-1, 1] (resized to `size` if given)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise CM3LeonError(f"images[{i}] is a {type(im).__name__}, expected a PIL image")
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not arrays:
        raise CM3LeonError("images_to_tensor: no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CM3LeonError(f"images have different sizes {sorted(shapes)}; pass size= to resize them")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list:
    """Float tensor [B, 3, H, W] (or [3, H, W]) in [-1, 1] -> PIL RGB images."""
    from PIL import Image

    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise CM3LeonError(f"expected a tensor [B, 3, H, W], got {tuple(x.shape)}")
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in a]


def as_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as they come back from an 8-bit file (clamped, rounded to 1/255)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0


__all__ = ["VQConfig", "VQModel", "PRESETS", "get_preset", "load_weights", "images_to_tensor", "tensor_to_images",
           "as_8bit"]
