"""Fréchet distance between two image sets in the feature space of a pluggable extractor.

With the standard InceptionV3 (`pt_inception-2015-12-05` weights, pool3 2048-d features) the
number is the FID papers report (CM3Leon Table 1: zero-shot MS-COCO FID 4.88 for 7B); it is
then named "FID". Any other feature space (our retriever's image encoder, the tiny pixel
statistics used in tests) gives a different number on a different scale, named "FD-<name>"
so it is never mistaken for FID.

The distance itself is torchmetrics' implementation (`_compute_fid`); scipy's `sqrtm` is the
fallback where that private function is missing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from cm3leon.errors import CM3LeonError, MissingDependencyError

if TYPE_CHECKING:
    from PIL import Image

# The standard weights: the TF "2015-12-05" Inception graph converted to PyTorch. torch-fidelity
# publishes it as `weights-inception-2015-12-05-6726825d.pth`, pytorch-fid as
# `pt_inception-2015-12-05-6726825d.pth` (same hash prefix).
INCEPTION_WEIGHTS_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a list of PIL images to a float tensor of features (N, D).

    `name` names the feature space; the metric is reported as "FID" only for the standard
    InceptionV3 (an extractor with `is_inception_fid = True`), as "FD-<name>" otherwise."""

    name: str

    def __call__(self, images: list["Image.Image"]) -> torch.Tensor: ...


def metric_name(extractor: FeatureExtractor) -> str:
    """"FID" for the standard InceptionV3 features, "FD-<name>" for any other feature space."""
    return "FID" if getattr(extractor, "is_inception_fid", False) else f"FD-{extractor.name}"


def _as_features(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 2:
        raise CM3LeonError(f"{what}: expected features of shape (N, D), got {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise CM3LeonError(f"{what}: need at least 2 samples to estimate a covariance, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise CM3LeonError(f"{what}: features contain NaN or inf")
    return t


def feature_stats(features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = _as_features(features, "features")
    mu = f.mean(dim=0)
    centered = f - mu
    sigma = centered.T @ centered / (f.shape[0] - 1)  # (D, D)
    return mu, sigma


def frechet_distance_from_stats(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise CM3LeonError(
            f"feature dimensions differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}"
        )
    try:
        from torchmetrics.image.fid import _compute_fid
    except ImportError:
        _compute_fid = None
    if _compute_fid is not None:
        value = float(_compute_fid(mu1, sigma1, mu2, sigma2))
    else:
        from scipy import linalg

        covmean, _ = linalg.sqrtm(sigma1.numpy() @ sigma2.numpy(), disp=False)
        value = float(((mu1 - mu2) ** 2).sum()) + float(
            np.trace(sigma1.numpy()) + np.trace(sigma2.numpy()) - 2 * np.trace(covmean.real)
        )
    if not math.isfinite(value):
        raise CM3LeonError("Fréchet distance is not finite (degenerate features?)")
    # The true distance is >= 0; tiny negatives are round-off of a zero distance.
    return max(value, 0.0)


def frechet_distance(real_feats: Any, fake_feats: Any) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."""
    r = _as_features(real_feats, "real features")
    f = _as_features(fake_feats, "generated features")
    if r.shape[1] != f.shape[1]:
        raise CM3LeonError(f"feature dimensions differ: real {r.shape[1]} vs generated {f.shape[1]}")
    return frechet_distance_from_stats(*feature_stats(r), *feature_stats(f))


@torch.no_grad()
def extract_features(
    images: Sequence["Image.Image"], extractor: FeatureExtractor, batch_size: int = 64, desc: str = "features"
) -> torch.Tensor:
    """Run `extractor` over `images` in batches (with a progress bar); returns float64 (N, D)."""
    from cm3leon.utils.logging import progress

    if batch_size < 1:
        raise CM3LeonError(f"batch_size must be >= 1, got {batch_size}")
    images = list(images)
    out = []
    with progress(total=len(images), desc=desc, unit="img") as bar:
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            feats = torch.as_tensor(extractor(batch)).detach().to("cpu", torch.float64)
            if feats.ndim != 2 or feats.shape[0] != len(batch):
                raise CM3LeonError(
                    f"feature extractor {extractor.name!r} returned shape {tuple(feats.shape)} "
                    f"for {len(batch)} images; expected ({len(batch)}, D)"
                )
            out.append(feats)
            bar.update(len(batch))
    if not out:
        raise CM3LeonError("no images given")
    return torch.cat(out)


def compute_fd(
    real_images: Sequence["Image.Image"],
    fake_images: Sequence["Image.Image"],
    extractor: FeatureExtractor,
    batch_size: int = 64,
) -> dict:
    """Fréchet distance between real and generated images in `extractor`'s feature space.

    Returns {"name": "FID" | "FD-<name>", "value", "n_real", "n_fake", "feature_dim"}. With
    fewer samples than feature dimensions the covariances are singular and the value is
    biased upward: compare numbers only at equal sample counts."""
    if len(real_images) < 2 or len(fake_images) < 2:
        raise CM3LeonError(
            f"Fréchet distance needs at least 2 real and 2 generated images, "
            f"got {len(real_images)} and {len(fake_images)}"
        )
    real = extract_features(real_images, extractor, batch_size, desc="features (real)")
    fake = extract_features(fake_images, extractor, batch_size, desc="features (generated)")
    return {
        "name": metric_name(extractor),
        "value": frechet_distance(real, fake),
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
        "feature_dim": int(real.shape[1]),
    }


def _rgb_uint8(images: Sequence["Image.Image"], size: int | None = None) -> np.ndarray:
    """Stack PIL images as uint8 (N, H, W, 3), optionally resized to size x size."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            from PIL import Image

            im = im.resize((size, size), Image.BILINEAR)
        arrs.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise CM3LeonError(
            f"images in one batch have different sizes {sorted(shapes)}; resize them to one size first"
        )
    return np.stack(arrs)


class PixelStatsExtractor:
    """Deterministic, weight-free features for tests and smoke runs: per-channel colour
    histograms, channel means/stds and an edge-strength histogram of the image at 32x32.

    It sees colour and coarse texture only; its distances ("FD-pixelstats") are a sanity
    signal, not an image-quality metric."""

    name = "pixelstats"

    def __init__(self, bins: int = 8, size: int = 32):
        self.bins = bins
        self.size = size

    def __call__(self, images: list["Image.Image"]) -> torch.Tensor:
        x = torch.from_numpy(_rgb_uint8(images, self.size)).double() / 255.0  # (N, H, W, 3)
        n = x.shape[0]
        edges = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)[1:-1]  # inner bin edges
        onehot = torch.nn.functional.one_hot
        idx = torch.bucketize(x, edges)  # (N, H, W, 3) bin ids
        hist = onehot(idx, self.bins).double().mean(dim=(1, 2))  # (N, 3, bins) colour histograms
        mean = x.mean(dim=(1, 2))  # (N, 3)
        std = x.std(dim=(1, 2))  # (N, 3)
        gray = x.mean(dim=3)  # (N, H, W)
        gx = gray[:, :-1, 1:] - gray[:, :-1, :-1]
        gy = gray[:, 1:, :-1] - gray[:, :-1, :-1]
        mag = (gx**2 + gy**2).sqrt()  # (N, H-1, W-1) edge strength
        ehist = onehot(torch.bucketize(mag, edges), self.bins).double().mean(dim=(1, 2))  # (N, bins)
        return torch.cat([hist.reshape(n, -1), mean, std, ehist], dim=1)


class RetrieverExtractor:
    """The retriever's image encoder as the feature space (offline, no extra weights).

    Reported as "FD-<name>": "FD-CLIP" for a local CLIP retriever (`kind == "clip"`),
    "FD-retriever" for the bi-encoder trained here (or the `name` given). A CLIP-like space,
    but not Inception: never comparable with papers' FID."""

    def __init__(self, retriever: Any, name: str | None = None):
        if not hasattr(retriever, "embed_image"):
            raise CM3LeonError("retriever has no embed_image(images) method")
        self.retriever = retriever
        self.name = name or ("CLIP" if getattr(retriever, "kind", None) == "clip" else "retriever")

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> "RetrieverExtractor":
        """Load a saved retriever directory (as written by the retriever stage)."""
        from cm3leon.retrieval import load_retriever

        return cls(load_retriever(path), name=name)

    def __call__(self, images: list["Image.Image"]) -> torch.Tensor:
        with torch.no_grad():
            return torch.as_tensor(self.retriever.embed_image(list(images))).float()


class InceptionV3Extractor:
    """The standard FID feature space: InceptionV3 pool3 (2048-d) with the TF-compatible
    resize to 299 of torch-fidelity, loaded from a LOCAL weights file (never downloaded).

    Needs `pip install torch-fidelity` (it depends on torchvision: install it only where a
    matching torchvision build exists) and the weights file (see INCEPTION_WEIGHTS_URL),
    given by path."""

    name = "inception-v3-2015-12-05"
    is_inception_fid = True

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu"):
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise CM3LeonError(
                f"InceptionV3 weights not found: {weights_path}. Download "
                f"{INCEPTION_WEIGHTS_URL} once (or pytorch-fid's {INCEPTION_WEIGHTS_FILES[1]}) "
                "on a machine with network access and pass its path."
            )
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "Inception FID needs the 'torch-fidelity' package: pip install torch-fidelity "
                f"(weights: {weights_path}). Without it, use the retriever's feature space (FD-<name>)."
            ) from None
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.device = torch.device(device)
        self.model = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        ).to(self.device)
        self.model.eval()

    def __call__(self, images: list["Image.Image"]) -> torch.Tensor:
        # The network resizes to 299 itself (TF1-compatible bilinear); batch images must share a size.
        x = torch.from_numpy(_rgb_uint8(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        with torch.no_grad():
            return self.model(x.to(self.device)).float().cpu()


def make_extractor(spec: str) -> FeatureExtractor:
    """A feature extractor from a --features spec: inception:PATH, retriever:DIR or pixelstats."""
    kind, _, arg = spec.partition(":")
    if kind == "pixelstats" and not arg:
        return PixelStatsExtractor()
    if kind == "inception" and arg:
        return InceptionV3Extractor(arg)
    if kind == "retriever" and arg:
        return RetrieverExtractor.from_dir(arg)
    raise CM3LeonError(f"--features {spec!r}: expected 'inception:WEIGHTS.pth', 'retriever:DIR' or 'pixelstats'")


def retriever_name(retriever) -> str:
    """"CLIP" for a local CLIP retriever, "retriever" for the bi-encoder trained here."""
    return "CLIP" if getattr(retriever, "kind", None) == "clip" else "retriever"


def fd_extractor(spec: str, retriever) -> tuple[Any | None, str | None]:
    """(feature extractor, None) for --fid-features, or (None, why not): "retriever" = the
    scoring retriever, "retriever:DIR", "inception:WEIGHTS", "pixelstats"."""
    if spec == "retriever":
        if retriever is None:
            return None, ("no retriever to extract features with (the model directory has no retriever/); "
                          "pass fid_features='inception:WEIGHTS.pth' or 'pixelstats', or clip_retriever=DIR")
        return RetrieverExtractor(retriever, name=retriever_name(retriever)), None
    return make_extractor(spec), None


class FDScorer:
    """Fréchet distance of generated image sets against one real set, whose features are
    extracted once."""

    def __init__(self, extractor, real_images: Sequence[Any], batch_size: int = 64):
        self.extractor = extractor
        self.name = metric_name(extractor)
        self.batch_size = batch_size
        self.real = extract_features(real_images, extractor, batch_size, desc="features (real)")

    def __call__(self, fake_images: Sequence[Any]) -> dict:
        fake = extract_features(fake_images, self.extractor, self.batch_size, desc="features (generated)")
        return {"name": self.name, "value": frechet_distance(self.real, fake), "n_real": int(self.real.shape[0]),
                "n_fake": int(fake.shape[0]), "feature_dim": int(self.real.shape[1])}
