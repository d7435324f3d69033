"""Measurements of a VQ image tokenizer: codebook usage and code stability through a
round trip (encode -> decode -> 8 bits -> encode). Used by training (`image_train`) and its
reports; the model itself is `cm3leon.tokenizers.image`."""

from __future__ import annotations

import math

import torch

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQModel, as_8bit, images_to_tensor


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of codes ever used) and perplexity (exp of the code entropy)."""
    counts = torch.bincount(torch.as_tensor(codes).reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"codebook_usage": round((counts > 0).float().mean().item(), 4),
            "codes_used": int((counts > 0).sum().item()),
            "perplexity": round(math.exp(entropy), 2)}


@torch.no_grad()
def code_stability(vq: VQModel, images, batch_size: int = 256, round_pixels: bool = True) -> float:
    """Fraction of codes that survive encode -> decode -> encode unchanged.

    A generated image is decoded from codes and may be tokenized again (editing, re-ranking,
    a saved picture fed back); codes that drift on the way make that lossy. `images`: a float
    tensor [B, C, H, W] in [-1, 1], a uint8 tensor [B, C, H, W] in [0, 255], or PIL images.
    `round_pixels` rounds decoded images to 8-bit values first, as a saved image would be."""
    if isinstance(images, (list, tuple)):
        images = images_to_tensor(images, size=vq.config.resolution)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CM3LeonError(f"code_stability: images must be a tensor [B, C, H, W] or a list of PIL images, got {shape}")
    if images.shape[0] == 0:
        raise CM3LeonError("code_stability: no images given")
    if batch_size < 1:
        raise CM3LeonError(f"code_stability: batch_size must be >= 1, got {batch_size}")
    was_training = vq.training
    vq.eval()  # training mode would update an EMA codebook while measuring
    same = total = 0
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            if x.dtype == torch.uint8:
                x = x.float() / 127.5 - 1.0
            codes = vq.encode(x)
            recon = vq.decode(codes)
            if round_pixels:
                recon = as_8bit(recon)
            same += (vq.encode(recon) == codes).sum().item()
            total += codes.numel()
    finally:
        vq.train(was_training)
    return same / total
