"""Losses of the VQ image tokenizer's training (taming VQGAN, Esser et al. 2021,
https://arxiv.org/abs/2012.09841): foreground-weighted L1 + L2 reconstruction, LPIPS (from
VGG weights the user supplies), a PatchGAN discriminator with taming's adaptive weight, and
the round-trip loss that keeps codes stable through encode -> decode -> 8 bits -> encode.
The training loop is `cm3leon.tokenizers.image_train`; the model is `cm3leon.tokenizers.image`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQModel, as_8bit


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, Isola et al. 2017; taming's NLayerDiscriminator)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class LPIPS(nn.Module):
    """LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features; names follow taming's
    `lpips.py` (`net.slice1.0.weight`, ..., `lin0.model.1.weight`). Weights come from a local
    file only (see `load_lpips`)."""

    CHANNELS = (64, 128, 256, 512, 512)
    # torchvision vgg16.features indices of each slice (conv = index of a Conv2d)
    SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
    CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
             14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}
    POOLS = (4, 9, 16, 23)

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.net = nn.Module()
        for s, (a, b) in enumerate(self.SLICES, 1):
            sl = nn.Sequential()
            for i in range(a, b):
                if i in self.CONVS:
                    sl.add_module(str(i), nn.Conv2d(*self.CONVS[i], 3, 1, 1))
                elif i in self.POOLS:
                    sl.add_module(str(i), nn.MaxPool2d(2, 2))
                else:
                    sl.add_module(str(i), nn.ReLU(inplace=False))
            setattr(self.net, f"slice{s}", sl)
        for k, c in enumerate(self.CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        self.requires_grad_(False)
        self.eval()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, feats = (x - self.shift) / self.scale, []
        for s in range(1, 6):
            h = getattr(self.net, f"slice{s}")(h)
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] between images in [-1, 1]."""
        total = 0
        for k, (a, b) in enumerate(zip(self._features(x), self._features(y))):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS from a local weights file (safetensors, or a plain torch state dict read with
    weights_only=True). Accepted key layouts: taming's (`net.sliceK.N.*`, `linK.model.1.weight`,
    optionally prefixed `loss.perceptual_loss.` or `perceptual_loss.`), or torchvision's VGG16
    (`features.N.*`) together with the LPIPS heads (`linK.model.1.weight`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CM3LeonError(f"{path}: not a plain torch state dict ({type(e).__name__}); "
                               "save the weights with torch.save(state_dict) or as safetensors") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CM3LeonError(f"{path}: expected a state dict of tensors")
    model = LPIPS()
    mapped = {}
    for k, v in state.items():
        for prefix in ("loss.perceptual_loss.", "perceptual_loss."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("features."):  # torchvision vgg16 -> the slice holding that index
            i = int(k.split(".")[1])
            s = next(n for n, (a, b) in enumerate(LPIPS.SLICES, 1) if a <= i < b)
            k = f"net.slice{s}.{k[len('features.'):]}"
        mapped[k] = v
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in mapped and k not in ("shift", "scale"))
    if missing:
        raise CM3LeonError(f"{path}: LPIPS needs the VGG16 trunk and the 5 linear heads; missing {len(missing)} "
                           f"tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: mapped.get(k, expected[k]) for k in expected}, strict=True)
    return model


def foreground_weights(x: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """Per-pixel loss weights [B,1,H,W]: 1 + weight where the pixel differs from the image's
    background colour (the median of its border pixels) by more than `threshold`."""
    if weight <= 0:
        return torch.ones_like(x[:, :1])
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)  # (B, C, 4W)
    background = border.median(dim=-1).values[:, :, None, None]  # (B, C, 1, 1)
    fg = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return 1.0 + weight * fg


def pixel_losses(recon: torch.Tensor, x: torch.Tensor, l1_weight: float, l2_weight: float,
                 foreground_weight: float, foreground_threshold: float,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reconstruction loss of training (l1_weight x L1 + l2_weight x L2, both
    foreground-weighted, see `foreground_weights`), and its L1 and L2."""
    w = foreground_weights(x, foreground_weight, foreground_threshold)
    l1 = ((recon - x).abs() * w).mean() / w.mean()
    l2 = (((recon - x) ** 2) * w).mean() / w.mean()
    return l1_weight * l1 + l2_weight * l2, l1, l2


def roundtrip_step(model: VQModel, teacher: VQModel, x: torch.Tensor, temperature: float,
                   decoder_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, float]:
    """Loss of the round-trip phase on a batch x, and the fraction of its codes that survive
    encode -> decode -> 8-bit -> encode before this step. The target codes are those of
    `teacher` (the model as the phase began), so that they cannot drift.

    decoder_loss None: only the encoder learns (the reconstruction is a constant). Otherwise
    the decoder learns too, from the re-encoding through straight-through 8-bit rounding and
    from decoder_loss(reconstruction, x), which keeps its pictures faithful; the codebook
    gets no gradient either way."""
    with torch.no_grad():
        codes = teacher.encode(x)
    target = codes.reshape(-1)
    if decoder_loss is None:
        with torch.no_grad():
            recon = as_8bit(model.decode(codes))
        anchor = None
    else:
        dec = model.decode_latents(model.quantize.lookup(codes).detach())
        anchor = decoder_loss(dec, x)
        # saved as 8 bits, straight through where the pixel is in range: past it the clamp makes
        # a change invisible, and a gradient there would push the decoder for nothing
        inside = dec.clamp(-1, 1)
        recon = inside + (as_8bit(dec) - inside).detach()
    logits_x = -model.quantize.code_distances(model.latents(x)) / temperature
    logits_recon = -model.quantize.code_distances(model.latents(recon)) / temperature
    kept = (logits_recon.argmax(1) == target).float().mean().item()
    loss = F.cross_entropy(logits_x, target) + F.cross_entropy(logits_recon, target)
    return (loss if anchor is None else loss + anchor), kept


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """taming: balance the GAN gradient against the reconstruction gradient at the last layer."""
    # taming: balance the GAN gradient against the reconstruction gradient at the last layer
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale
