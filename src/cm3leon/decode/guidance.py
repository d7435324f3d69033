"""Guidance as pure functions of logits: classifier-free guidance (CFG), InstructPix2Pix-style
two-scale guidance for editing, and contrastive decoding with the top-k plausibility set
(CD-K, CM3Leon paper Sec. 3, Eq. 3).

The streams (conditional, unconditional, ...) run through the model as rows of ONE batch;
`Guidance.combine` turns their logits (S, B, V) into one row of scores per sample (B, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cm3leon.errors import CM3LeonError

GUIDANCE_METHODS = ("cfg", "cdk", "edit")


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: `uncond + scale * (cond - uncond)` (paper Sec. 3).

    scale 1 returns `cond` itself, so CFG at 1 is exactly conditional sampling (the formula
    would round differently in floating point)."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def dual_cfg_logits(
    uncond: torch.Tensor, image_cond: torch.Tensor, full_cond: torch.Tensor, image_scale: float, text_scale: float
) -> torch.Tensor:
    """Two-scale guidance for editing (InstructPix2Pix, Brooks et al. 2023; CM3Leon uses image
    1.5, text 7.5): `uncond + s_I (image - uncond) + s_T (full - image)`.

    Streams: uncond = neither source image nor instruction, image_cond = source image only,
    full_cond = both. s_I = s_T = 1 returns `full_cond` exactly."""
    if image_scale == 1.0 and text_scale == 1.0:
        return full_cond
    return uncond + image_scale * (image_cond - uncond) + text_scale * (full_cond - image_cond)


def cdk_scores(expert: torch.Tensor, amateur: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """Contrastive decoding with the k-th-max plausibility set (paper Eq. 3).

    V = {x : p_exp(x) >= alpha * kmax_k p_exp}; score = log p_exp(x) - log p_ama(x) on V,
    -inf elsewhere. Expert = conditional, amateur = unconditional stream. Inputs are logits
    (B, V) (already masked with -inf where not allowed); the scores can be sampled with a
    temperature like any logits. The k-th max (instead of the max of the original CD) keeps
    more than one plausible token when image-token distributions are flat (paper Sec. 3)."""
    logp_exp = torch.log_softmax(expert.float(), dim=-1)
    logp_ama = torch.log_softmax(amateur.float(), dim=-1)
    k = min(k, logp_exp.size(-1))
    kth = torch.topk(logp_exp, k, dim=-1).values[..., -1:]  # (B, 1) log of k-th largest p_exp
    # p_exp >= alpha * p_k  <=>  log p_exp >= log alpha + log p_k (no underflow in log space).
    # Masked (-inf) ids never qualify; with fewer than k allowed ids, kth is -inf and every
    # allowed id is kept.
    keep = (logp_exp >= (math.log(alpha) + kth)) & torch.isfinite(logp_exp)
    score = logp_exp - logp_ama
    return torch.where(keep, score, torch.full_like(score, -math.inf))


MAX_GUIDANCE = 100.0  # beyond it the guided logits overflow float32 long before they mean anything


def validate_guidance(
    method: str, cfg_scale: float, cdk_alpha: float, cdk_k: int, image_scale: float, text_scale: float
) -> None:
    """Raise `CM3LeonError` naming the argument when a guidance setting is out of range."""
    if method not in GUIDANCE_METHODS:
        raise CM3LeonError(f"guidance method must be one of {GUIDANCE_METHODS}, got {method!r}")
    for name, v in (("cfg_scale", cfg_scale), ("image_guidance", image_scale), ("text_guidance", text_scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_GUIDANCE:
            raise CM3LeonError(f"{name} must be a number in [0, {MAX_GUIDANCE:g}] (1 = no guidance), got {v!r}")
    if isinstance(cdk_alpha, bool) or not isinstance(cdk_alpha, (int, float)) or not 0.0 < cdk_alpha <= 1.0:
        raise CM3LeonError(f"cdk_alpha must be in (0, 1], got {cdk_alpha!r}")
    if isinstance(cdk_k, bool) or not isinstance(cdk_k, int) or cdk_k < 1:
        raise CM3LeonError(f"cdk_k must be an integer >= 1, got {cdk_k!r}")


@dataclass(frozen=True)
class Guidance:
    """How the streams' logits become one row of scores.

    cfg:  streams (cond, uncond)              -> cfg_logits
    cdk:  streams (expert=cond, amateur=uncond) -> cdk_scores
    edit: streams (full, image-only, uncond)  -> dual_cfg_logits
    """

    method: str = "cfg"
    cfg_scale: float = 3.0  # CFG alpha; the paper sweeps it, 3 is a common text->image choice
    cdk_alpha: float = 0.1  # plausibility fraction alpha (CD's default, Li et al. 2022)
    cdk_k: int = 10  # k of the k-th max in CD-K; not given in the paper, 10 keeps a few candidates
    image_scale: float = 1.5  # editing: source-image guidance (paper: 1.5)
    text_scale: float = 7.5  # editing: instruction guidance (paper: 7.5)

    def __post_init__(self):
        validate_guidance(self.method, self.cfg_scale, self.cdk_alpha, self.cdk_k, self.image_scale, self.text_scale)

    @property
    def num_streams(self) -> int:
        return 3 if self.method == "edit" else 2

    def combine(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """logits (S, B, V) for the S streams, additive constraint mask (V,) or (B, V) -> (B, V)."""
        logits = logits.float()
        if self.method == "cfg":
            return cfg_logits(logits[0], logits[1], self.cfg_scale) + mask
        if self.method == "cdk":
            return cdk_scores(logits[0] + mask, logits[1] + mask, self.cdk_alpha, self.cdk_k)
        return dual_cfg_logits(logits[2], logits[1], logits[0], self.image_scale, self.text_scale) + mask

    def to_dict(self) -> dict:
        d = {"method": self.method}
        if self.method == "cfg":
            d["cfg_scale"] = self.cfg_scale
        elif self.method == "cdk":
            d.update(cdk_alpha=self.cdk_alpha, cdk_k=self.cdk_k)
        else:
            d.update(image_guidance=self.image_scale, text_guidance=self.text_scale)
        return d
